"""Training groups: which weights of an adapted model train, and counts.

Every weight of an adapted model belongs to at most one group: the active
adapters and fusions, the backbone's layer norms, or the task head. The
model's recorded adapter settings decide which groups train, and all other
weights are frozen.
"""

import dataclasses

from keras_adapters import registry
from keras_adapters import rewriting
from keras_adapters.layers import AdaptedSublayer

# Backbone layers that belong to the task head. keras-hub's BERT, ALBERT and
# ELECTRA classifiers read the backbone's pooled output, so the pooler is
# trained with the head.
POOLER_LAYER_NAMES = ("pooled_dense",)


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


def update_trainable(model):
    """Set which weights of `model` train, from its recorded settings.

    Active adapters train when `train_adapters` was set, layer norms inside
    the backbone (layers of the classes that
    `keras_adapters.register_layer_norm` lists) when `train_layer_norms` was
    set, and the head and pooler
    when `train_head` was set. Every other weight is frozen.
    """
    state = rewriting._get_state(model) or rewriting._AdapterState()
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

    Active fusions count as adapters, and the adapters they fuse do not.
    Inactive adapters, frozen weights and the layer norms below the lowest
    block with active adapters are left out of the map, so that
    backpropagation can stop at that block. With adapters in the first
    block, this leaves out the embeddings' layer norm: training it would
    take a backward pass through the first block's attention for a few
    hundred weights. With AdapterDrop, it also leaves out the layer norms
    of the skipped blocks.
    """
    backbone = rewriting.find_backbone(model)
    below = _layers_below_adapters(model)
    groups = {}

    for path, layer in rewriting.named_layers(model):
        if isinstance(layer, AdaptedSublayer):
            for adapter in _active_adapters(layer):
                for variable in adapter.weights:
                    groups[id(variable)] = "adapters"
        elif registry.is_layer_norm(layer) and id(layer) not in below:
            if path.startswith(rewriting.BACKBONE_PATH + "/") or backbone is None:
                for variable in layer.weights:
                    groups.setdefault(id(variable), "layer_norms")

    for layer in head_layers(model):
        for variable in layer.weights:
            groups.setdefault(id(variable), "head")
    return groups


def head_layers(model):
    """Return the task head's layers: those outside the backbone, and its pooler."""
    backbone = rewriting.find_backbone(model)
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
    """Count the parameters of `model`, in total and by training group.

    Returns a `ParameterCounts`. Its `adapters`, `layer_norms` and `head`
    fields count trainable weights only, so frozen layer norms, such as the
    embeddings' layer norm, count in `total` but not in `layer_norms`.
    """
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


def _active_adapter_names(wrapper):
    if wrapper.active_adapters is None:
        return list(wrapper.adapters)
    return list(wrapper.active_adapters)


def _active_adapters(wrapper):
    """Return the active adapters and fusions of `wrapper`, which train."""
    layers = []
    for name in _active_adapter_names(wrapper):
        if name in wrapper.fusions:
            layers.append(wrapper.fusions[name])
        else:
            layers.append(wrapper.adapters[name])
    return layers


def _layers_below_adapters(model):
    """Return the ids of the layers below the lowest block with adapters.

    The layers are those of the blocks below it and the backbone's own
    layers that its graph runs before that block, such as the embeddings
    and their layer norm. Empty when no block has active adapters.
    """
    blocks = rewriting.find_blocks(model)
    lowest = None
    for index, (block_path, block) in enumerate(blocks):
        if any(_active_adapters(w) for _, w in rewriting._wrappers_of(block)):
            lowest = index
            break
    if lowest is None:
        return set()

    below = set()
    for block_path, block in blocks[:lowest]:
        below.update(id(layer) for layer in block._flatten_layers())
    backbone = rewriting.find_backbone(model)
    lowest_block = blocks[lowest][1]
    for layer in getattr(backbone, "layers", []):
        if layer is lowest_block:
            break
        below.update(id(inner) for inner in layer._flatten_layers())
    return below


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size
