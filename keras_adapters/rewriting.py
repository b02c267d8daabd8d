"""Insert adapters into keras-hub models and choose what trains."""

import dataclasses
import logging
import re

import keras
from keras.src.utils.naming import to_snake_case

from keras_adapters import configs
from keras_adapters import registry
from keras_adapters import serialization
from keras_adapters.layers import AdaptedSublayer
from keras_adapters.layers import AdapterLayer
from keras_adapters.layers import BranchInputTap

# The training groups live in `groups`. The names below stay importable from
# here, where they were first defined.
from keras_adapters.groups import POOLER_LAYER_NAMES  # noqa: F401
from keras_adapters.groups import ParameterCounts  # noqa: F401
from keras_adapters.groups import _active_adapter_names
from keras_adapters.groups import _active_adapters  # noqa: F401
from keras_adapters.groups import count_parameters
from keras_adapters.groups import head_layers  # noqa: F401
from keras_adapters.groups import update_trainable
from keras_adapters.groups import weight_groups  # noqa: F401
from keras_adapters.layers import unlocked_state

logger = logging.getLogger(__name__)

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
    # Fusion name -> {"adapter_names": [...], "temperature": float}.
    fusions: dict = dataclasses.field(default_factory=dict)
    # `trainable` of each weight in `model.weights` before the first
    # adapters were added, restored when the last adapters are removed.
    base_trainable: list = None


def add_adapters(
    model,
    name="adapter",
    config="houlsby",
    train_adapters=True,
    train_layer_norms=True,
    train_head=True,
    print_summary=False,
    **kwargs,
):
    """Insert bottleneck adapters into every block of a keras-hub model.

    The model is changed in place. A sequential adapter wraps the last
    sublayer of a branch, after its output projection and dropout and
    before the block's residual add and layer norm. A parallel adapter also
    records the input of the feed-forward branch and adds its output beside
    the branch. Afterwards the backbone's other weights are frozen, and only
    the adapters, the layer norms and the task head train. Compile the model
    after this call, so that the optimizer tracks the new trainable weights.

    The model's class is replaced by a subclass of the same name that saves
    the adapter settings in its config, so that `model.save` and
    `keras.models.load_model` keep the adapters. `isinstance` checks against
    the keras-hub class still hold, but `type(model) is BertTextClassifier`
    does not until the last adapters are removed.

    Args:
        model: a keras-hub backbone, or a task model that contains one, such as
            `keras_hub.models.BertTextClassifier`.
        name: string. Name of the adapters. Defaults to `"adapter"`.
        config: a `keras_adapters.AdapterConfig`, or the name of a variant:
            `"houlsby"` (the default), `"pfeiffer"` or `"parallel"`.
        train_adapters: bool. Whether the new adapters train.
        train_layer_norms: bool. Whether the layer norms of the blocks with
            adapters, and those above them, train. The layer norms below
            the lowest adapted block, such as the embeddings' layer norm,
            stay frozen, so that the backward pass stops at that block.
        train_head: bool. Whether the task head and the backbone's pooler
            train.
        print_summary: bool. Print the parameter counts. They are logged at
            INFO level either way.
        **kwargs: `AdapterConfig` fields that replace those of `config`,
            such as `bottleneck_size`, `activation` or `skip_blocks`;
            `placement`, a preset name such as `"pfeiffer"` or a list of
            branches such as `["feedforward"]`, for the `placements` field;
            and further `AdapterLayer` arguments, such as
            `up_kernel_initializer`.

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
    config, layer_kwargs = _resolve_config(config, kwargs)
    # Build one adapter up front so that bad arguments fail before any
    # block is changed.
    template = AdapterLayer(**config.layer_kwargs(), **layer_kwargs)
    blocks = find_blocks(model)
    if name in adapter_names(model) or name in fusion_names(model):
        raise ValueError(
            f"The model already has adapters or a fusion named '{name}'. "
            "Pick another name, or call `keras_adapters.remove_adapters("
            f"model, '{name}')` first."
        )
    _check_hidden_sizes(blocks, template)
    adapted_blocks = _adapted_blocks(blocks, config)
    base_trainable = [variable.trainable for variable in model.weights]
    _prepare_blocks(blocks)
    targets = _insertion_targets(adapted_blocks, config.placements)
    if config.is_parallel:
        _check_parallel_inputs(adapted_blocks)

    for block_path, block, placement_name in targets:
        _insert_adapter(block, placement_name, name, template, config)

    state = _get_state(model) or _AdapterState()
    if state.base_trainable is None:
        state.base_trainable = base_trainable
    state.train_adapters = train_adapters
    state.train_layer_norms = train_layer_norms
    state.train_head = train_head
    state.settings[name] = configs.config_settings(
        config, adapter_settings(template)
    )
    object.__setattr__(model, _STATE_ATTRIBUTE, state)
    serialization.mark_adapted(model)

    update_trainable(model)
    reset_compiled_functions(model)

    counts = count_parameters(model)
    logger.info(
        "Added adapters '%s' at %d insertion points in %d blocks; %s",
        name,
        len(targets),
        len(adapted_blocks),
        counts,
    )
    if print_summary:
        print(counts)
    return model


def _resolve_config(config, kwargs):
    """Split `add_adapters` keyword arguments into a config and layer kwargs."""
    config = configs.get_adapter_config(config)
    kwargs = dict(kwargs)
    changes = {}
    if "placement" in kwargs:
        changes["placements"] = kwargs.pop("placement")
    for field in configs.field_names():
        if field in kwargs:
            changes[field] = kwargs.pop(field)
    if changes:
        config = config.replace(**changes)
    return config, kwargs


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
    state = _get_state(model)
    fused_in = [
        fusion
        for fusion, settings in (state.fusions if state else {}).items()
        if name in settings["adapter_names"]
    ]
    if fused_in:
        raise ValueError(
            f"Adapters '{name}' are part of the fusions {fused_in}. Remove "
            "those first with `keras_adapters.remove_fusion`."
        )
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            if name not in wrapper.adapters:
                continue
            wrapper.remove_adapter(name)
            if not wrapper.adapters:
                attribute = _attribute_of(block, placement_name)
                _replace_sublayer(block, attribute, wrapper.sublayer)
        _remove_unused_tap(block)

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
        "fusions": [
            {"name": name, **state.fusions[name]}
            for name in fusion_names(model)
            if name in state.fusions
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
        adapter_config, layer_kwargs = configs.config_from_settings(settings)
        add_adapters(
            model,
            name=settings["name"],
            config=adapter_config,
            train_adapters=config["train_adapters"],
            train_layer_norms=config["train_layer_norms"],
            train_head=config["train_head"],
            **layer_kwargs,
        )
    for settings in config.get("fusions", []):
        if settings["name"] not in fusion_names(model):
            from keras_adapters import composition

            composition.add_fusion(
                model,
                settings["adapter_names"],
                name=settings["name"],
                temperature=settings["temperature"],
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
            `None` or `[]` to turn all adapters off. A name may be that of a
            fusion, which runs its adapters and combines their outputs. With all adapters off
            the model computes exactly what the base model computes.
    """
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    present = adapter_names(model) + fusion_names(model)
    unknown = [name for name in names if name not in present]
    if unknown:
        raise ValueError(
            f"Unknown adapter names {unknown}. Adapters and fusions present: "
            f"{present}"
        )

    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            wrapper.active_adapters = [
                name
                for name in names
                if name in wrapper.adapters or name in wrapper.fusions
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


def fusion_names(model):
    """Return the names of the fusions in `model`, in the order added."""
    names = []
    for block_path, block in find_blocks(model):
        for placement_name, wrapper in _wrappers_of(block):
            for name in wrapper.fusions:
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


def _insert_adapter(block, placement_name, name, template, config):
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

    if config.is_parallel and wrapper.branch_input is None:
        wrapper.branch_input = _tap_feedforward_input(block).branch_input

    layer_config = template.get_config()
    layer_config["name"] = name
    layer_config["dtype"] = block.dtype_policy
    adapter = AdapterLayer.from_config(layer_config)
    # The name scopes give the adapter's variables paths such as
    # "transformer_layer_0/attention/<name>/down_kernel".
    with keras.name_scope(block.name), keras.name_scope(placement_name):
        wrapper.add_adapter(
            name,
            adapter,
            (None, None, _hidden_size(block)),
            parallel=config.is_parallel,
        )


def _tap_feedforward_input(block):
    """Wrap the first feed-forward sublayer of `block` in a `BranchInputTap`."""
    attribute = _attribute_of(block, "feedforward_input")
    current = getattr(block, attribute)
    if isinstance(current, BranchInputTap):
        return current
    tap = BranchInputTap(current, name=f"{current.name}_tap")
    _replace_sublayer(block, attribute, tap)
    return tap


def _remove_unused_tap(block):
    """Put back the first feed-forward sublayer once no adapter reads it."""
    attribute = _attribute_of(block, "feedforward_input")
    if attribute is None:
        return
    tap = getattr(block, attribute)
    if not isinstance(tap, BranchInputTap):
        return
    for placement_name, wrapper in _wrappers_of(block):
        if wrapper.parallel_adapters:
            return
        wrapper.branch_input = None
    _replace_sublayer(block, attribute, tap.sublayer)


def _adapted_blocks(blocks, config):
    """Return the blocks that get adapters: all but the lowest skipped ones."""
    if config.skip_blocks >= len(blocks):
        raise ValueError(
            f"`skip_blocks` must be less than the number of blocks, "
            f"{len(blocks)}, so that some block gets adapters. Received: "
            f"skip_blocks={config.skip_blocks}"
        )
    return blocks[config.skip_blocks :]


def _check_parallel_inputs(blocks):
    for block_path, block in blocks:
        if _attribute_of(block, "feedforward_input") is None:
            raise ValueError(
                f"Block '{block_path}' ({type(block).__name__}) has no "
                "registered feed-forward input, so parallel adapters cannot "
                "read it. Use a sequential config, or register the block "
                "with `keras_adapters.register_block(..., "
                "feedforward_input=...)`."
            )


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
    # Adapter and fusion names become layer names and TensorFlow name
    # scopes, which allow only these characters.
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(
            "`name` must be a non-empty string of letters, digits, '_', '.' "
            f"and '-'. Received: name={name!r}"
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

