"""Insert adapters into keras-hub models and choose what trains."""

import dataclasses
import logging
import re

import keras
from keras.src.utils.naming import to_snake_case

from keras_adapters import registry
from keras_adapters import serialization
from keras_adapters.layers import AdaptedSublayer
from keras_adapters.layers import AdapterLayer
from keras_adapters.layers import unlocked_state

logger = logging.getLogger(__name__)

# Backbone layers that belong to the task head. keras-hub's BERT, ALBERT and
# ELECTRA classifiers read the backbone's pooled output, so the pooler is
# trained with the head.
POOLER_LAYER_NAMES = ("pooled_dense",)

# The path segment that stands for the backbone in weight keys, whatever the
# backbone's own name is.
BACKBONE_PATH = "backbone"

_STATE_ATTRIBUTE = "_keras_adapters_state"


@dataclasses.dataclass
class _AdapterState:
    """Settings that `add_adapters` records on an adapted model."""

    train_adapters: bool = True
    train_layer_norms: bool = True
    train_head: bool = True
    settings: dict = dataclasses.field(default_factory=dict)
    # `trainable` of each weight in `model.weights` before the first
    # adapters were added, restored when the last adapters are removed.
    base_trainable: list = None


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model, by training group.

    Args:
        trainable: number of trainable parameters.
        total: number of parameters, trainable or not.
        adapters: trainable parameters in adapters.
        layer_norms: trainable parameters in layer norms.
        head: trainable parameters in the task head and pooler.
    """

    trainable: int
    total: int
    adapters: int
    layer_norms: int
    head: int

    @property
    def trainable_fraction(self):
        return self.trainable / self.total if self.total else 0.0

    def __str__(self):
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable_fraction:.2f}%): adapters "
            f"{self.adapters:,}, layer norms {self.layer_norms:,}, head "
            f"{self.head:,}"
        )


def add_adapters(
    model,
    name="adapter",
    placement="houlsby",
    bottleneck_size=None,
    reduction_factor=None,
    activation="gelu",
    train_adapters=True,
    train_layer_norms=True,
    train_head=True,
    print_summary=False,
    **adapter_kwargs,
):
    """Insert bottleneck adapters into every block of a keras-hub model.

    The model is changed in place. Each adapter wraps the last sublayer of a
    branch, after its output projection and dropout and before the block's
    residual add and layer norm. Afterwards the backbone's other weights are
    frozen, and only the adapters, the layer norms and the task head train.
    Compile the model after this call, so that the optimizer tracks the new
    trainable weights.

    The model's class is replaced by a subclass of the same name that saves
    the adapter settings in its config, so that `model.save` and
    `keras.models.load_model` keep the adapters. `isinstance` checks against
    the keras-hub class still hold, but `type(model) is BertTextClassifier`
    does not until the last adapters are removed.

    Args:
        model: a keras-hub backbone, or a task model that contains one, such as
            `keras_hub.models.BertTextClassifier`.
        name: string. Name of the adapters. Defaults to `"adapter"`.
        placement: string or list of strings. `"houlsby"` (the default)
            adds adapters on the attention and feed-forward branches,
            `"pfeiffer"` on the feed-forward branch only. A list such as
            `["feedforward"]` picks branches by name.
        bottleneck_size: int or `None`. The bottleneck size `r`.
        reduction_factor: int or `None`. Sets `r = d // reduction_factor`.
            Defaults to `16` when `bottleneck_size` is `None`.
        activation: the adapters' activation. Defaults to `"gelu"`.
        train_adapters: bool. Whether the new adapters train.
        train_layer_norms: bool. Whether the backbone's layer norms train.
        train_head: bool. Whether the task head and the backbone's pooler
            train.
        print_summary: bool. Print the parameter counts. They are logged at
            INFO level either way.
        **adapter_kwargs: further `AdapterLayer` arguments, such as
            `residual` or `up_kernel_initializer`.

    Returns:
        The model that was passed in.

    Example:

    ```python
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        "bert_tiny_en_uncased", num_classes=2
    )
    keras_adapters.add_adapters(classifier, bottleneck_size=64)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), ...)
    ```
    """
    _check_name(name)
    placements = registry.resolve_placements(placement)
    # Build one adapter up front so that bad arguments fail before any
    # block is changed.
    template = AdapterLayer(
        bottleneck_size=bottleneck_size,
        reduction_factor=reduction_factor,
        activation=activation,
        **adapter_kwargs,
    )
    blocks = find_blocks(model)
    if name in adapter_names(model):
        raise ValueError(
            f"The model already has adapters named '{name}'. Pick another "
            "name, or call `keras_adapters.remove_adapters(model, "
            f"'{name}')` first."
        )
    _check_hidden_sizes(blocks, template)
    base_trainable = [variable.trainable for variable in model.weights]
    _prepare_blocks(blocks)
    targets = _insertion_targets(blocks, placements)

    for block_path, block, placement_name in targets:
        _insert_adapter(block, placement_name, name, template)

    state = _get_state(model) or _AdapterState()
    if state.base_trainable is None:
        state.base_trainable = base_trainable
    state.train_adapters = train_adapters
    state.train_layer_norms = train_layer_norms
    state.train_head = train_head
    state.settings[name] = {
        "placements": list(placements),
        "adapter": adapter_settings(template),
    }
    object.__setattr__(model, _STATE_ATTRIBUTE, state)
    serialization.mark_adapted(model)

    update_trainable(model)
    reset_compiled_functions(model)

    counts = count_parameters(model)
    logger.info(
        "Added adapters '%s' at %d insertion points in %d blocks; %s",
        name,
        len(targets),
        len(blocks),
        counts,
    )
    if print_summary:
        print(counts)
    return model


def adapter_settings(adapter):
    """Return the `AdapterLayer` config that rebuilds `adapter` elsewhere."""
    config = adapter.get_config()
    for key in ("name", "dtype", "trainable"):
        config.pop(key, None)
    return config


def remove_adapters(model, name):
    """Remove the adapters called `name` from `model`.

    A sublayer left with no adapters is put back in its block. When the last
    adapters are removed, each weight's `trainable` flag is set back to its
    value before the first `add_adapters` call, so the model runs and trains
    exactly as before `add_adapters`. Otherwise the remaining active adapters
    keep training as before.
    """
    if name not in adapter_names(model):
        raise ValueError(
            f"The model has no adapters named '{name}'. Adapters present: "
            f"{adapter_names(model)}"
        )
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            if name not in wrapper.adapters:
                continue
            wrapper.remove_adapter(name)
            if not wrapper.adapters:
                attribute = _attribute_of(block, placement_name)
                _replace_sublayer(block, attribute, wrapper.sublayer)

    state = _get_state(model)
    if state is not None:
        state.settings.pop(name, None)
    if adapter_names(model):
        update_trainable(model)
    else:
        _restore_base_model(model, state)
    reset_compiled_functions(model)


def _restore_base_model(model, state):
    base_trainable = state.base_trainable if state is not None else None
    if base_trainable is not None and len(base_trainable) == len(model.weights):
        for variable, trainable in zip(model.weights, base_trainable):
            variable.trainable = trainable
    # Adapters may have been added to the backbone before its task model
    # was built, so both can hold the state and the adapted class.
    for owner in (model, find_backbone(model)):
        if owner is None:
            continue
        if _STATE_ATTRIBUTE in owner.__dict__:
            object.__delattr__(owner, _STATE_ATTRIBUTE)
        serialization.unmark_adapted(owner)


def adapters_config(model):
    """Return the JSON-serializable settings that `restore_adapters` replays.

    The settings list every set of adapters in the order it was added, with
    its placements and `AdapterLayer` settings, which adapters are active,
    which weight groups train, and each weight's `trainable` flag before the
    first adapters were added.
    """
    state = _get_state(model) or _AdapterState()
    wrappers = [
        wrapper
        for block_path, block in find_blocks(model)
        for placement_name, wrapper in _wrappers_of(block)
    ]
    all_active = all(wrapper.active_adapters is None for wrapper in wrappers)
    return {
        "adapters": [
            {"name": name, **state.settings[name]}
            for name in adapter_names(model)
            if name in state.settings
        ],
        "active_adapters": None if all_active else active_adapters(model),
        "train_adapters": state.train_adapters,
        "train_layer_norms": state.train_layer_norms,
        "train_head": state.train_head,
        "base_trainable": state.base_trainable,
    }


def restore_adapters(model, config):
    """Add the adapters described by `adapters_config` to a base model.

    Adapters already present are kept, as happens when a task model's
    backbone was itself restored with them.
    """
    for settings in config["adapters"]:
        if settings["name"] in adapter_names(model):
            continue
        add_adapters(
            model,
            name=settings["name"],
            placement=settings["placements"],
            train_adapters=config["train_adapters"],
            train_layer_norms=config["train_layer_norms"],
            train_head=config["train_head"],
            **settings["adapter"],
        )
    if config["active_adapters"] is not None:
        set_active_adapters(model, config["active_adapters"])

    state = _get_state(model)
    if state is not None and config.get("base_trainable") is not None:
        state.base_trainable = list(config["base_trainable"])
    update_trainable(model)


def set_active_adapters(model, names):
    """Choose which adapters run, and so which adapters train.

    Args:
        model: an adapted model.
        names: a name, a list of names to run stacked in that order, or
            `None` or `[]` to turn all adapters off. With all adapters off
            the model computes exactly what the base model computes.
    """
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    present = adapter_names(model)
    unknown = [name for name in names if name not in present]
    if unknown:
        raise ValueError(
            f"Unknown adapter names {unknown}. Adapters present: {present}"
        )

    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            wrapper.active_adapters = [
                name for name in names if name in wrapper.adapters
            ]
    update_trainable(model)
    reset_compiled_functions(model)


def active_adapters(model):
    """Return the names of the adapters that run, in the order they run."""
    names = []
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            for adapter in _active_adapter_names(wrapper):
                if adapter not in names:
                    names.append(adapter)
    return names


def adapter_names(model):
    """Return the names of the adapters in `model`, in the order added."""
    names = []
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            for name in wrapper.adapters:
                if name not in names:
                    names.append(name)
    return names


def iter_adapters(model, name=None):
    """Yield `(key, adapter)` for each adapter, optionally of one name.

    The key is `"<block path>/<placement>"`, such as
    `"backbone/transformer_layer_0/attention"`. It does not depend on the
    adapter's name, so adapter files can be loaded under another name.
    """
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            for adapter_name, adapter in wrapper.adapters.items():
                if name is None or adapter_name == name:
                    yield f"{block_path}/{placement_name}", adapter


def find_backbone(model):
    """Return the keras-hub backbone in `model`, or `None`."""
    from keras_hub.models import Backbone

    if isinstance(model, Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Backbone):
        return backbone
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, Backbone):
            return layer
    return None


def find_blocks(model):
    """Return `[(path, block)]` for the registered blocks in `model`.

    Each block appears once, even when the backbone calls it at several
    depths, as ALBERT does. Paths join layer names with "/", and the
    backbone's name is replaced by "backbone".
    """
    blocks = []
    unregistered = set()
    for path, layer in named_layers(model):
        if registry.get_insertion_points(type(layer)) is not None:
            blocks.append((path, layer))
        elif _looks_like_block(layer):
            unregistered.add(type(layer))

    if not blocks:
        classes = sorted(f"{cls.__module__}.{cls.__name__}" for cls in unregistered)
        raise ValueError(
            f"Found no registered transformer block in {model.name!r} "
            f"({type(model).__name__}). Unregistered layer classes with "
            f"sublayers: {classes or 'none'}. Register a block class with "
            "`keras_adapters.register_block(BlockClass, attention=..., "
            "feedforward=...)`."
        )
    return blocks


def named_layers(model):
    """Yield `(path, layer)` for every layer under `model`, once each."""
    from keras_hub.models import Backbone

    seen = set()

    def visit(layer, prefix):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, Backbone):
                path = BACKBONE_PATH
            else:
                name = _stable_name(layer, child)
                path = f"{prefix}/{name}" if prefix else name
            yield path, child
            yield from visit(child, path)

    if isinstance(model, Backbone):
        seen.add(id(model))
        yield from visit(model, BACKBONE_PATH)
    else:
        yield from visit(model, "")


def _stable_name(parent, child):
    """Return a name for `child` that is the same in every build of `parent`.

    Keras numbers the names it makes up, such as "t5_layer_norm_74", by how
    many layers of that class were created before, so they differ between
    two builds of one model. A child with such a name is named by the
    attribute of `parent` that refers to it, where there is one.
    """
    automatic = re.fullmatch(
        rf"{re.escape(to_snake_case(type(child).__name__))}(_\d+)?", child.name
    )
    if not automatic:
        return child.name
    for attribute, value in vars(parent).items():
        if value is child and not attribute.startswith("__"):
            return attribute.lstrip("_")
    return child.name


def update_trainable(model):
    """Set which weights of `model` train, from its recorded settings.

    Active adapters train when `train_adapters` was set, layer norms inside
    the backbone (layers of the classes that
    `keras_adapters.register_layer_norm` lists) when `train_layer_norms` was
    set, and the head and pooler
    when `train_head` was set. Every other weight is frozen.
    """
    state = _get_state(model) or _AdapterState()
    groups = weight_groups(model)
    for variable in model.weights:
        group = groups.get(id(variable))
        if group == "adapters":
            trainable = state.train_adapters
        elif group == "layer_norms":
            trainable = state.train_layer_norms
        elif group == "head":
            trainable = state.train_head
        else:
            trainable = False
        variable.trainable = trainable


def weight_groups(model):
    """Map `id(variable)` to `"adapters"`, `"layer_norms"` or `"head"`.

    Inactive adapters and frozen weights are left out of the map.
    """
    backbone = find_backbone(model)
    groups = {}

    for path, layer in named_layers(model):
        if isinstance(layer, AdaptedSublayer):
            for adapter in _active_adapters(layer):
                for variable in adapter.weights:
                    groups[id(variable)] = "adapters"
        elif registry.is_layer_norm(layer):
            if path.startswith(BACKBONE_PATH + "/") or backbone is None:
                for variable in layer.weights:
                    groups.setdefault(id(variable), "layer_norms")

    for layer in head_layers(model):
        for variable in layer.weights:
            groups.setdefault(id(variable), "head")
    return groups


def head_layers(model):
    """Return the task head's layers: those outside the backbone, and its pooler."""
    backbone = find_backbone(model)
    if backbone is None:
        return []

    layers = []
    if backbone is not model:
        inside = {id(layer) for layer in backbone._flatten_layers()}
        for layer in model._flatten_layers(include_self=False):
            if id(layer) not in inside and layer.weights:
                layers.append(layer)
    for layer in backbone._flatten_layers(include_self=False, recursive=False):
        if layer.name in POOLER_LAYER_NAMES:
            layers.append(layer)
    return layers


def count_parameters(model):
    """Return the `ParameterCounts` of `model`."""
    groups = weight_groups(model)
    totals = {"adapters": 0, "layer_norms": 0, "head": 0}
    trainable = 0
    total = 0
    for variable in model.weights:
        size = _size(variable)
        total += size
        if not variable.trainable:
            continue
        trainable += size
        group = groups.get(id(variable))
        if group in totals:
            totals[group] += size
    return ParameterCounts(trainable=trainable, total=total, **totals)


def reset_compiled_functions(model):
    """Drop the model's cached train, test, predict and generate functions.

    Keras and keras-hub cache traced functions on a model that has run once,
    and those keep running the graph from before the model was changed.
    """
    for attribute in (
        "train_function",
        "test_function",
        "predict_function",
        "generate_function",
    ):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)


def _get_state(model):
    state = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        # When adapters were added to the backbone before a task model was
        # built around it, their state is on the backbone.
        backbone = find_backbone(model)
        if backbone is not None and backbone is not model:
            state = getattr(backbone, _STATE_ATTRIBUTE, None)
    return state


def _active_adapter_names(wrapper):
    if wrapper.active_adapters is None:
        return list(wrapper.adapters)
    return list(wrapper.active_adapters)


def _active_adapters(wrapper):
    return [wrapper.adapters[name] for name in _active_adapter_names(wrapper)]


def _insert_adapter(block, placement_name, name, template):
    attribute = _attribute_of(block, placement_name)
    current = getattr(block, attribute)
    if isinstance(current, AdaptedSublayer):
        wrapper = current
    else:
        wrapper = AdaptedSublayer(
            current,
            placement=placement_name,
            name=f"{current.name}_adapted",
        )
        _replace_sublayer(block, attribute, wrapper)

    config = template.get_config()
    config["name"] = name
    config["dtype"] = block.dtype_policy
    adapter = AdapterLayer.from_config(config)
    # The name scopes give the adapter's variables paths such as
    # "transformer_layer_0/attention/<name>/down_kernel".
    with keras.name_scope(block.name), keras.name_scope(placement_name):
        wrapper.add_adapter(name, adapter, (None, None, _hidden_size(block)))


def _replace_sublayer(block, attribute, new_layer):
    old_layer = getattr(block, attribute)
    with unlocked_state(block):
        # Swap the layer in the block's own list first, so the block keeps
        # its layer order and lists each layer once.
        if block._tracker.is_in_store("layers", old_layer):
            block._tracker.replace_tracked_value("layers", old_layer, new_layer)
        setattr(block, attribute, new_layer)


def _wrappers_of(block):
    for placement_name in registry.PLACEMENTS:
        attribute = _attribute_of(block, placement_name)
        if attribute is None:
            continue
        layer = getattr(block, attribute)
        if isinstance(layer, AdaptedSublayer):
            yield placement_name, layer


def _attribute_of(block, placement_name):
    points = registry.get_insertion_points(type(block))
    return points.attribute(block, placement_name)


def _prepare_blocks(blocks):
    prepared = set()
    for block_path, block in blocks:
        points = registry.get_insertion_points(type(block))
        if points.prepare is not None and id(block) not in prepared:
            points.prepare(block)
            prepared.add(id(block))


def _hidden_size(block):
    shapes = getattr(block, "_build_shapes_dict", None)
    if shapes:
        shape = next(iter(shapes.values()))
        if shape and shape[-1] is not None:
            return int(shape[-1])
    raise ValueError(
        f"Block '{block.name}' ({type(block).__name__}) has not been built, "
        "so its hidden size is unknown. Build the model, for example by "
        "calling it once, before adding adapters."
    )


def _check_name(name):
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            "`name` must be a non-empty string without '/'. Received: "
            f"name={name!r}"
        )


def _insertion_targets(blocks, placements):
    """Return `[(path, block, placement)]` for every adapter to insert.

    Every block must have the "attention" and "feedforward" placements it is
    asked for. "cross_attention" goes into the blocks that have it, such as
    the decoder blocks of an encoder-decoder model, and at least one must.
    """
    targets = []
    for placement_name in placements:
        found = 0
        for block_path, block in blocks:
            if _attribute_of(block, placement_name) is not None:
                targets.append((block_path, block, placement_name))
                found += 1
            elif placement_name != "cross_attention":
                raise ValueError(
                    f"Block '{block_path}' ({type(block).__name__}) has no "
                    f"'{placement_name}' insertion point. Choose placements "
                    "that every block has, or register the sublayer with "
                    "`keras_adapters.register_block`."
                )
        if not found:
            raise ValueError(
                f"No block of {sorted({type(b).__name__ for _, b in blocks})} "
                f"has a '{placement_name}' insertion point. Cross-attention "
                "exists only in the decoder blocks of encoder-decoder models "
                "such as BART and T5."
            )

    # Insert block by block, in the order the blocks appear in the model.
    block_order = {id(block): index for index, (_, block) in enumerate(blocks)}
    targets.sort(key=lambda target: block_order[id(target[1])])
    return targets


def _check_hidden_sizes(blocks, template):
    for block_path, block in blocks:
        template.resolve_bottleneck_size(_hidden_size(block))


def _looks_like_block(layer):
    return (
        not isinstance(layer, keras.Model)
        and len(layer._flatten_layers(include_self=False, recursive=False)) > 2
    )


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size
