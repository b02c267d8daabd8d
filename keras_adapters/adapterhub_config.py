"""Map bottleneck adapter configs between AdapterHub and keras_adapters.

AdapterHub's `adapters` library (PyTorch) describes a bottleneck adapter with
a `BnConfig` and stores it as the `"config"` entry of `adapter_config.json`.
keras_adapters describes one with `AdapterConfig`. The two overlap where
both compute the same function. This module maps what overlaps and rejects,
with the reason, what does not. The mapping follows `adapters` 1.3.0:
`configuration/adapter_config.py` for the fields and `methods/modeling.py`
(`Adapter`, `ParallelAdapter`) for what they compute.
"""

import math
import numbers

import keras

from keras_adapters.configs import AdapterConfig
from keras_adapters.configs import get_adapter_config
from keras_adapters.layers import DEFAULT_REDUCTION_FACTOR

# Every field of `BnConfig` in adapters 1.3.0 with its default, so that an
# exported config is complete and loads with `AdapterConfig.load`.
BN_CONFIG_DEFAULTS = {
    "original_ln_before": False,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "init_weights": "bert",
    "init_weights_seed": None,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "leave_out": [],
    "dropout": 0.0,
    "phm_layer": False,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "stochastic_depth": 0.0,
}

# AdapterHub activation name -> Keras activation name. AdapterHub resolves
# names with `transformers.activations.get_activation`, where "gelu" is the
# exact GELU and "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are its tanh
# approximation, which keras-hub registers as "keras_hub>gelu_approximate".
_ACTIVATIONS_FROM_HUB = {
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "gelu": "gelu",
    "gelu_new": "keras_hub>gelu_approximate",
    "gelu_fast": "keras_hub>gelu_approximate",
    "gelu_pytorch_tanh": "keras_hub>gelu_approximate",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "linear",
}

# Serialized Keras activation name -> the AdapterHub name written on export.
_ACTIVATIONS_TO_HUB = {
    "relu": "relu",
    "silu": "swish",
    "gelu": "gelu",
    "keras_hub>gelu_approximate": "gelu_new",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "linear",
}

# Files written before AdapterHub recorded a `"version"` used other names for
# the two GELUs, and AdapterHub renames them on load.
_LEGACY_ACTIVATION_RENAMES = {"gelu": "gelu_new", "gelu_orig": "gelu"}


def config_from_adapterhub(config, hidden_size=None):
    """Return the `AdapterConfig` that computes what an AdapterHub config does.

    The result reproduces the adapter of a post-LN BERT-style block at
    inference. Fields that only change initialisation or training
    (`init_weights`, `init_weights_seed`, `dropout`, `stochastic_depth`)
    are ignored.

    Args:
        config: dict. Either the whole `adapter_config.json` of an AdapterHub
            adapter, or only its `"config"` entry, the `BnConfig` fields.
        hidden_size: int or `None`. The model's hidden size `d`. Needed only
            when the reduction factor does not divide into an integer
            bottleneck size, which `AdapterConfig.reduction_factor` cannot
            express. Defaults to the `"hidden_size"` of a whole
            `adapter_config.json`.

    Returns:
        An `AdapterConfig`.

    Raises:
        ValueError: for a config that keras_adapters cannot compute, such as
            Pfeiffer's `original_ln_before=True`, gating, PHM layers,
            invertible adapters, learned scaling or a non-bottleneck method.
            The message names the field and its value.
    """
    fields = _bn_config_fields(config)
    if hidden_size is None and "config" in config:
        hidden_size = config.get("hidden_size")

    _check_supported(fields)
    placements = []
    if fields["mh_adapter"]:
        placements.append("attention")
    if fields["output_adapter"]:
        placements.append("feedforward")

    return AdapterConfig(
        placements=tuple(placements),
        mode="parallel" if fields["is_parallel"] else "sequential",
        activation=_activation_from_hub(fields["non_linearity"]),
        scaling=float(fields["scaling"]),
        layer_norm=_layer_norm_from_hub(fields),
        residual=True,
        skip_blocks=_skip_blocks_from_hub(fields["leave_out"]),
        **_size_from_hub(fields["reduction_factor"], hidden_size),
    )


def config_to_adapterhub(config, hidden_size=None):
    """Return the AdapterHub `BnConfig` fields that compute what `config` does.

    The result is the `"config"` entry of an `adapter_config.json`, with
    every `BnConfig` field of adapters 1.3.0 set. `AdapterConfig.load` in
    AdapterHub reads it. Initializers are not carried over, because a loaded
    adapter's weights replace its initial values.

    Args:
        config: an `AdapterConfig` or an alias such as `"houlsby"`.
        hidden_size: int or `None`. The model's hidden size `d`, needed when
            `config` sets `bottleneck_size`, because AdapterHub stores only a
            reduction factor.

    Returns:
        A JSON-serializable dict.

    Raises:
        ValueError: for a config that AdapterHub cannot express, such as a
            cross-attention placement, an activation without an AdapterHub
            name, or `residual=False`.
    """
    if isinstance(config, str):
        config = get_adapter_config(config)
    _check_exportable(config)

    fields = dict(BN_CONFIG_DEFAULTS)
    fields.update(
        {
            "mh_adapter": "attention" in config.placements,
            "output_adapter": "feedforward" in config.placements,
            "reduction_factor": _reduction_factor_to_hub(config, hidden_size),
            "non_linearity": _activation_to_hub(config.activation),
            "is_parallel": config.mode == "parallel",
            "scaling": float(config.scaling),
            "ln_before": config.layer_norm == "before",
            "ln_after": config.layer_norm == "after",
            "leave_out": list(range(config.skip_blocks)),
        }
    )
    return fields


def _bn_config_fields(config):
    """Return the `BnConfig` fields of `config`, with legacy names updated."""
    if not isinstance(config, dict):
        raise ValueError(
            "The AdapterHub config must be a dict: the contents of "
            "`adapter_config.json` or its 'config' entry. Received: "
            f"config={config!r}"
        )
    fields = config
    legacy = False
    if "config" in config:
        fields = config["config"]
        # AdapterHub itself renames the GELUs of files without a version.
        legacy = "version" not in config
    if not isinstance(fields, dict):
        raise ValueError(
            "The 'config' entry of the AdapterHub config must be a dict. "
            f"Received: config={fields!r}"
        )

    architecture = fields.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise ValueError(
            "Only bottleneck adapters can be loaded into keras_adapters. "
            f"Received: architecture={architecture!r}"
        )
    missing = [
        key
        for key in (
            "mh_adapter",
            "output_adapter",
            "reduction_factor",
            "non_linearity",
        )
        if key not in fields
    ]
    if missing:
        raise ValueError(
            f"The AdapterHub config lacks the required fields {missing}. "
            f"Received: config={fields!r}"
        )

    fields = {**BN_CONFIG_DEFAULTS, **fields}
    activation = fields["non_linearity"]
    if legacy and isinstance(activation, str):
        fields["non_linearity"] = _LEGACY_ACTIVATION_RENAMES.get(
            activation, activation
        )
    return fields


def _check_supported(fields):
    """Raise for every `BnConfig` setting that keras_adapters cannot compute."""
    reasons = {
        "original_ln_before": (
            not fields["is_parallel"] and fields["original_ln_before"],
            "The adapter reads the block's output after its residual add and "
            "layer norm, and keras_adapters adapters read the branch output "
            "before them. AdapterHub's 'seq_bn' (Pfeiffer) config sets this. "
            "A keras_adapters 'pfeiffer' adapter is an adapter with "
            "original_ln_before=False.",
        ),
        "original_ln_after": (
            not fields["original_ln_after"],
            "keras_adapters keeps each block's residual add and layer norm "
            "after the adapter.",
        ),
        "use_gating": (fields["use_gating"], "Gating is not supported."),
        "phm_layer": (
            fields["phm_layer"],
            "PHM (Compacter) projections are not supported.",
        ),
        "inv_adapter": (
            fields["inv_adapter"] is not None,
            "Invertible adapters on the embeddings are not supported.",
        ),
        "cross_adapter": (
            fields["cross_adapter"],
            "Cross-attention adapters are not supported.",
        ),
        "ln_before": (
            fields["ln_before"] and fields["ln_after"],
            "An adapter has at most one layer norm in keras_adapters, "
            "before or after the bottleneck, and this config sets both "
            "ln_before and ln_after.",
        ),
        "adapter_residual_before_ln": (
            fields["ln_after"]
            and not fields["is_parallel"]
            and fields["adapter_residual_before_ln"],
            "keras_adapters normalizes the up-projection output and then "
            "adds the residual, and this config normalizes their sum.",
        ),
        "scaling": (
            isinstance(fields["scaling"], str)
            or not isinstance(fields["scaling"], numbers.Real),
            "Only a constant scaling factor is supported, not a learned one.",
        ),
        "mh_adapter": (
            fields["is_parallel"] and fields["mh_adapter"],
            "Parallel adapters in keras_adapters sit beside the feed-forward "
            "branch only, and this config also puts one beside the "
            "attention branch.",
        ),
        "ln_after": (
            fields["ln_after"] and _is_scaled(fields["scaling"]),
            "With a layer norm after the up-projection, AdapterHub scales "
            "before that norm and keras_adapters after it, which agree only "
            "for scaling=1.0.",
        ),
    }
    for key, (unsupported, reason) in reasons.items():
        if unsupported:
            raise ValueError(
                f"keras_adapters cannot compute this AdapterHub adapter. "
                f"{reason} Received: {key}={fields[key]!r}"
            )
    if not (fields["mh_adapter"] or fields["output_adapter"]):
        raise ValueError(
            "The AdapterHub config places no adapter: mh_adapter and "
            "output_adapter are both false. Received: mh_adapter=False, "
            "output_adapter=False"
        )


def _is_scaled(scaling):
    return not isinstance(scaling, numbers.Real) or float(scaling) != 1.0


def _activation_from_hub(name):
    key = name.lower() if isinstance(name, str) else name
    if key not in _ACTIVATIONS_FROM_HUB:
        raise ValueError(
            "The AdapterHub activation has no exact Keras equivalent. "
            f"Supported: {sorted(_ACTIVATIONS_FROM_HUB)}. Received: "
            f"non_linearity={name!r}"
        )
    activation = _ACTIVATIONS_FROM_HUB[key]
    if activation == "keras_hub>gelu_approximate":
        # `keras.activations.get` does not look up registered names, so the
        # function itself is returned. It serializes under that name.
        # NOTE: the module path is private to keras-hub 0.32.
        from keras_hub.src.utils.keras_utils import gelu_approximate

        return gelu_approximate
    return activation


def _activation_to_hub(activation):
    serialized = keras.activations.serialize(keras.activations.get(activation))
    if isinstance(serialized, dict):
        # Registered functions such as keras-hub's `gelu_approximate`
        # serialize to a dict with their registered name as the config.
        serialized = serialized.get("config")
    if serialized not in _ACTIVATIONS_TO_HUB:
        raise ValueError(
            "The activation has no AdapterHub name, so the `adapters` "
            "library could not run it. Use one of "
            f"{sorted(_ACTIVATIONS_TO_HUB)}. Received: "
            f"activation={activation!r}"
        )
    return _ACTIVATIONS_TO_HUB[serialized]


def _layer_norm_from_hub(fields):
    if fields["ln_before"]:
        return "before"
    if fields["ln_after"]:
        return "after"
    return None


def _skip_blocks_from_hub(leave_out):
    leave_out = sorted(int(index) for index in leave_out or [])
    if leave_out != list(range(len(leave_out))):
        raise ValueError(
            "keras_adapters can leave out only the lowest blocks, as "
            "`skip_blocks`, so `leave_out` must be 0, 1, ..., k - 1. "
            f"Received: leave_out={leave_out}"
        )
    return len(leave_out)


def _size_from_hub(reduction_factor, hidden_size):
    """Return `{"reduction_factor": k}` or `{"bottleneck_size": r}`.

    AdapterHub computes `r = int(d // reduction_factor)` in floating point.
    """
    if isinstance(reduction_factor, dict):
        factors = set(reduction_factor.values())
        if len(factors) != 1:
            raise ValueError(
                "Per-layer reduction factors are not supported: every "
                "adapter in keras_adapters has one bottleneck size. "
                f"Received: reduction_factor={reduction_factor!r}"
            )
        reduction_factor = factors.pop()
    if (
        isinstance(reduction_factor, bool)
        or not isinstance(reduction_factor, numbers.Real)
        or reduction_factor <= 0
    ):
        raise ValueError(
            "The AdapterHub reduction factor must be a positive number. "
            f"Received: reduction_factor={reduction_factor!r}"
        )

    if float(reduction_factor).is_integer() and reduction_factor >= 1:
        return {"reduction_factor": int(reduction_factor)}
    if hidden_size is None:
        raise ValueError(
            "A reduction factor that is not an integer needs the hidden size "
            "to find the bottleneck size. Pass `hidden_size`. Received: "
            f"reduction_factor={reduction_factor!r}"
        )
    return {"bottleneck_size": int(hidden_size // reduction_factor)}


def _reduction_factor_to_hub(config, hidden_size):
    """Return the factor from which AdapterHub computes the bottleneck size."""
    if config.bottleneck_size is None:
        return config.reduction_factor or DEFAULT_REDUCTION_FACTOR
    if hidden_size is None:
        raise ValueError(
            "AdapterHub stores a reduction factor, not a bottleneck size, so "
            "exporting `bottleneck_size` needs the hidden size. Pass "
            f"`hidden_size`. Received: bottleneck_size={config.bottleneck_size}"
        )

    bottleneck_size = config.bottleneck_size
    if hidden_size % bottleneck_size == 0:
        return hidden_size // bottleneck_size
    # `d / r` may round so that `int(d // factor)` is `r - 1`, so the factor
    # is nudged down by one ulp at a time until it gives `r`.
    factor = hidden_size / bottleneck_size
    for _ in range(4):
        if int(hidden_size // factor) == bottleneck_size:
            return factor
        factor = math.nextafter(factor, 0.0)
    raise ValueError(
        "No reduction factor gives this bottleneck size in AdapterHub. "
        f"Received: bottleneck_size={bottleneck_size}, "
        f"hidden_size={hidden_size}"
    )


def _check_exportable(config):
    if "cross_attention" in config.placements:
        raise ValueError(
            "AdapterHub has no cross-attention adapters for BERT-style "
            f"encoders. Received: placements={config.placements!r}"
        )
    if not config.residual and config.mode == "sequential":
        raise ValueError(
            "AdapterHub's sequential adapters always add their input back. "
            "Received: residual=False"
        )
    if config.layer_norm == "after" and config.scaling != 1.0:
        raise ValueError(
            "With a layer norm after the up-projection, keras_adapters "
            "scales after that norm and AdapterHub before it, which agree "
            f"only for scaling=1.0. Received: scaling={config.scaling}"
        )
