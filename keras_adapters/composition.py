"""Combine trained adapters: AdapterFusion and weight averaging.

Stacking needs no function here: `set_active_adapters(model, ["a", "b"])`
runs adapters "a" and "b" one after the other in every block.
"""

import logging
import numbers

import keras
import numpy as np

from keras_adapters import configs
from keras_adapters import rewriting
from keras_adapters.layers import AdapterFusion

logger = logging.getLogger(__name__)


def add_fusion(model, adapter_names, name=None, temperature=1.0):
    """Add an AdapterFusion layer over trained adapters, and activate it.

    In every branch that has all of `adapter_names`, an `AdapterFusion`
    layer learns an attention over the adapters' outputs. The fusion is
    made the only active entry, so the fused adapters run inside it and stay
    frozen. The fusion weights train, and the layer norms and head train
    when the model's adapter settings enable them.

    Args:
        model: a model that has the adapters in `adapter_names`.
        adapter_names: list of strings. The adapters to fuse, at least two.
            They must sit in the same branches.
        name: string or `None`. Name of the fusion. Defaults to "fusion_"
            followed by the adapter names joined by "_".
        temperature: float. The softmax temperature. Defaults to `1.0`.

    Returns:
        The fusion's name.
    """
    adapter_names = list(adapter_names)
    name = name or "fusion_" + "_".join(map(str, adapter_names))
    rewriting._check_name(name)
    present = rewriting.adapter_names(model)
    missing = [n for n in adapter_names if n not in present]
    if missing:
        raise ValueError(
            f"Cannot fuse adapters {missing}: the model has no adapters of "
            f"those names. Adapters present: {present}"
        )
    if name in present or name in rewriting.fusion_names(model):
        raise ValueError(
            f"The model already has adapters or a fusion named '{name}'. "
            "Pass another `name`."
        )
    # Validates the names and temperature before any block changes.
    template = AdapterFusion(adapter_names, temperature=temperature)
    targets = _fusion_targets(model, adapter_names)

    for block, placement_name, wrapper in targets:
        fusion = AdapterFusion.from_config(
            {**template.get_config(), "name": name, "dtype": block.dtype_policy}
        )
        with keras.name_scope(block.name), keras.name_scope(placement_name):
            wrapper.add_fusion(
                name, fusion, (None, None, rewriting._hidden_size(block))
            )

    state = rewriting._get_state(model)
    state.fusions[name] = {
        "adapter_names": adapter_names,
        "temperature": template.temperature,
    }
    rewriting.set_active_adapters(model, [name])
    logger.info(
        "Added fusion '%s' of %s at %d insertion points; %s",
        name,
        adapter_names,
        len(targets),
        rewriting.count_parameters(model),
    )
    return name


def remove_fusion(model, name):
    """Remove the fusion called `name`; its adapters stay."""
    if name not in rewriting.fusion_names(model):
        raise ValueError(
            f"The model has no fusion named '{name}'. Fusions present: "
            f"{rewriting.fusion_names(model)}"
        )
    for block_path, block in rewriting.find_blocks(model):
        for placement_name, wrapper in rewriting._wrappers_of(block):
            if name in wrapper.fusions:
                wrapper.remove_fusion(name)
    rewriting._get_state(model).fusions.pop(name, None)
    rewriting.update_trainable(model)
    rewriting.reset_compiled_functions(model)


def fusion_settings(model, name):
    """Return the recorded settings of the fusion `name`."""
    state = rewriting._get_state(model)
    if state is None or name not in state.fusions:
        raise ValueError(
            f"The model has no fusion named '{name}'. Fusions present: "
            f"{rewriting.fusion_names(model)}"
        )
    return state.fusions[name]


def iter_fusions(model, name):
    """Yield `(key, fusion)` for the fusion `name`, keyed like adapters."""
    for block_path, block in rewriting.find_blocks(model):
        for placement_name, wrapper in rewriting._wrappers_of(block):
            if name in wrapper.fusions:
                yield f"{block_path}/{placement_name}", wrapper.fusions[name]


def average_adapters(model, adapter_names, name, weights=None):
    """Add new adapters whose weights are the average of existing ones.

    The adapters must have the same settings, so that their weights have
    the same shapes and mean the same thing. The new adapters are inactive,
    so the active set is unchanged. Activate them with `set_active_adapters`
    and save them with `save_adapters` like any adapters.

    Args:
        model: a model that has the adapters in `adapter_names`.
        adapter_names: list of strings. The adapters to average, at least
            two.
        name: string. Name of the new adapters.
        weights: list of floats or `None`. One weight per adapter, summing
            to 1. Defaults to equal weights.

    Returns:
        The new adapters' name.
    """
    adapter_names = list(adapter_names)
    weights = _check_average_weights(adapter_names, weights)
    state = rewriting._get_state(model)
    present = rewriting.adapter_names(model)
    missing = [n for n in adapter_names if n not in present]
    if missing:
        raise ValueError(
            f"Cannot average adapters {missing}: the model has no adapters "
            f"of those names. Adapters present: {present}"
        )
    settings = [state.settings[n] for n in adapter_names]
    for other_name, other in zip(adapter_names[1:], settings[1:]):
        if other != settings[0]:
            raise ValueError(
                f"Adapters '{adapter_names[0]}' and '{other_name}' have "
                f"different settings, so their weights cannot be averaged: "
                f"{settings[0]} and {other}."
            )

    active = rewriting.active_adapters(model)
    config, layer_kwargs = configs.config_from_settings(settings[0])
    rewriting.add_adapters(
        model,
        name=name,
        config=config,
        train_adapters=state.train_adapters,
        train_layer_norms=state.train_layer_norms,
        train_head=state.train_head,
        **layer_kwargs,
    )
    sources = [dict(rewriting.iter_adapters(model, n)) for n in adapter_names]
    for key, adapter in rewriting.iter_adapters(model, name):
        for index, variable in enumerate(adapter.weights):
            values = [
                keras.ops.convert_to_numpy(source[key].weights[index])
                for source in sources
            ]
            average = sum(w * v for w, v in zip(weights, values))
            variable.assign(average.astype(np.float32))
    rewriting.set_active_adapters(model, active)
    return name


def _check_average_weights(adapter_names, weights):
    if len(adapter_names) < 2 or len(set(adapter_names)) != len(adapter_names):
        raise ValueError(
            "`adapter_names` must list at least two distinct adapters. "
            f"Received: adapter_names={adapter_names!r}"
        )
    if weights is None:
        return [1.0 / len(adapter_names)] * len(adapter_names)
    weights = list(weights)
    if (
        len(weights) != len(adapter_names)
        or not all(isinstance(w, numbers.Real) for w in weights)
        or abs(sum(weights) - 1.0) > 1e-6
    ):
        raise ValueError(
            "`weights` must give one number per adapter, summing to 1. "
            f"Received: weights={weights!r} for {len(adapter_names)} adapters"
        )
    return [float(w) for w in weights]


def _fusion_targets(model, adapter_names):
    """Return `[(block, placement, wrapper)]` for the branches to fuse in."""
    targets = []
    for block_path, block in rewriting.find_blocks(model):
        for placement_name, wrapper in rewriting._wrappers_of(block):
            found = [n for n in adapter_names if n in wrapper.adapters]
            if not found:
                continue
            if len(found) != len(adapter_names):
                raise ValueError(
                    f"Branch '{block_path}/{placement_name}' has only the "
                    f"adapters {found} of {adapter_names}. Fused adapters "
                    "must sit in the same branches."
                )
            targets.append((block, placement_name, wrapper))
    return targets
