"""Named bottleneck adapter variants: Houlsby, Pfeiffer and parallel."""

import dataclasses
import numbers

import keras

from keras_adapters import registry

MODES = ("sequential", "parallel")
LAYER_NORM_POSITIONS = (None, "before", "after")


@keras.saving.register_keras_serializable(package="keras_adapters")
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Settings of one set of bottleneck adapters: where they go and their shape.

    A sequential adapter computes `h + s · W_up · σ(W_down · h)` on the
    output `h` of a branch, before the block's residual add. A parallel
    adapter reads the branch's input `x` instead and adds
    `s · W_up · σ(W_down · x)` to the branch output, as in the scaled
    parallel adapter of He et al. (2022).

    `keras_adapters.get_adapter_config` returns the named variants:

    - `"houlsby"`: sequential adapters on the attention and feed-forward
      branches (Houlsby et al., 2019).
    - `"pfeiffer"`: one sequential adapter on the feed-forward branch
      (Pfeiffer et al., 2021).
    - `"parallel"`: one parallel adapter beside the feed-forward branch,
      with scaling `s = 4` (He et al., 2022).

    Args:
        placements: tuple of strings. Branches that get adapters, drawn from
            `"attention"`, `"feedforward"` and `"cross_attention"`, or a
            preset name such as `"houlsby"` or `"pfeiffer"`. Defaults to
            `("attention", "feedforward")`.
        mode: string. `"sequential"` (the default) or `"parallel"`. Parallel
            adapters can only sit on the `"feedforward"` branch.
        bottleneck_size: int or `None`. The bottleneck size `r`.
        reduction_factor: int or `None`. Sets `r = d // reduction_factor`.
            Defaults to `16` when `bottleneck_size` is `None`.
        activation: string or callable. A Keras activation, applied in the
            bottleneck. Defaults to `"gelu"`.
        scaling: float. The factor `s` on the bottleneck output. Defaults
            to `1.0`.
        layer_norm: `None`, `"before"` or `"after"`. Adds a layer norm inside
            the adapter, on its input before the down-projection or on the
            up-projection's output before the residual add. Defaults to
            `None`.
        residual: bool. Whether a sequential adapter adds its input to its
            output. Defaults to `True`. Parallel adapters never do, because
            the block's own residual already carries the input.
        skip_blocks: int. AdapterDrop (Rücklé et al., 2021): leave the
            lowest `skip_blocks` blocks without adapters, and freeze their
            layer norms and those below them, so that backpropagation stops
            at the first adapted block. Defaults to `0`.

    Example:

    ```python
    config = keras_adapters.get_adapter_config("parallel")
    config = config.replace(bottleneck_size=32, skip_blocks=2)
    keras_adapters.add_adapters(classifier, name="task", config=config)
    ```

    References:
        - Houlsby et al., 2019. Parameter-Efficient Transfer Learning for NLP.
          https://arxiv.org/abs/1902.00751
        - Pfeiffer et al., 2021. AdapterFusion: Non-Destructive Task
          Composition for Transfer Learning. https://arxiv.org/abs/2005.00247
        - He et al., 2022. Towards a Unified View of Parameter-Efficient
          Transfer Learning. https://arxiv.org/abs/2110.04366
        - Rücklé et al., 2021. AdapterDrop: On the Efficiency of Adapters in
          Transformers. https://arxiv.org/abs/2010.11918
    """

    placements: tuple = ("attention", "feedforward")
    mode: str = "sequential"
    bottleneck_size: int = None
    reduction_factor: int = None
    activation: str = "gelu"
    scaling: float = 1.0
    layer_norm: str = None
    residual: bool = True
    skip_blocks: int = 0

    def __post_init__(self):
        placements = registry.resolve_placements(self.placements)
        object.__setattr__(self, "placements", tuple(placements))
        if self.mode not in MODES:
            raise ValueError(
                f"`mode` must be one of {MODES}. Received: mode={self.mode!r}"
            )
        if self.mode == "parallel":
            if self.placements != ("feedforward",):
                raise ValueError(
                    "Parallel adapters sit beside the feed-forward branch "
                    "only, so `placements` must be ('feedforward',). "
                    f"Received: placements={self.placements!r}"
                )
            object.__setattr__(self, "residual", False)
        if self.layer_norm not in LAYER_NORM_POSITIONS:
            raise ValueError(
                f"`layer_norm` must be one of {LAYER_NORM_POSITIONS}. "
                f"Received: layer_norm={self.layer_norm!r}"
            )
        if isinstance(self.scaling, bool) or not isinstance(
            self.scaling, numbers.Real
        ):
            raise ValueError(
                f"`scaling` must be a number. Received: scaling={self.scaling!r}"
            )
        object.__setattr__(self, "scaling", float(self.scaling))
        if (
            isinstance(self.skip_blocks, bool)
            or not isinstance(self.skip_blocks, numbers.Integral)
            or self.skip_blocks < 0
        ):
            raise ValueError(
                "`skip_blocks` must be a non-negative integer. Received: "
                f"skip_blocks={self.skip_blocks!r}"
            )
        object.__setattr__(self, "residual", bool(self.residual))

    def replace(self, **changes):
        """Return a copy of this config with the given fields changed."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ValueError(
                f"Unknown `AdapterConfig` fields {unknown}. Fields: "
                f"{list(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    @property
    def is_parallel(self):
        return self.mode == "parallel"

    def layer_kwargs(self):
        """Return the `AdapterLayer` arguments that this config sets."""
        return {
            "bottleneck_size": self.bottleneck_size,
            "reduction_factor": self.reduction_factor,
            "activation": self.activation,
            "scaling": self.scaling,
            "layer_norm": self.layer_norm,
            "residual": self.residual,
        }

    def get_config(self):
        config = dataclasses.asdict(self)
        config["placements"] = list(self.placements)
        if not isinstance(self.activation, str):
            config["activation"] = keras.activations.serialize(self.activation)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


ADAPTER_CONFIGS = {
    "houlsby": AdapterConfig(),
    "pfeiffer": AdapterConfig(placements=("feedforward",)),
    "parallel": AdapterConfig(
        placements=("feedforward",), mode="parallel", scaling=4.0
    ),
}


def get_adapter_config(config):
    """Return the `AdapterConfig` for a variant name, a config or a dict.

    Args:
        config: `"houlsby"`, `"pfeiffer"` or `"parallel"`, an
            `AdapterConfig`, or a dict from `AdapterConfig.get_config`.
    """
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, dict):
        return AdapterConfig.from_config(config)
    if isinstance(config, str) and config in ADAPTER_CONFIGS:
        return ADAPTER_CONFIGS[config]
    raise ValueError(
        f"Unknown adapter config. Expected one of {sorted(ADAPTER_CONFIGS)}, "
        f"an `AdapterConfig` or its dict. Received: config={config!r}"
    )


def config_from_settings(settings):
    """Return `(config, layer_kwargs)` rebuilt from recorded adapter settings.

    `settings` is what `add_adapters` records and adapter files store: the
    placements, mode and skipped blocks, and the `AdapterLayer` config under
    `"adapter"`. The layer arguments that no config field covers, such as
    initializers, come back in `layer_kwargs`.
    """
    layer_kwargs = dict(settings["adapter"])
    fields = {
        key: layer_kwargs.pop(key)
        for key in AdapterConfig().layer_kwargs()
        if key in layer_kwargs
    }
    config = AdapterConfig(
        placements=tuple(settings["placements"]),
        mode=settings.get("mode", "sequential"),
        skip_blocks=settings.get("skip_blocks", 0),
        **fields,
    )
    return config, layer_kwargs


def config_settings(config, adapter_settings):
    """Return the settings that `config_from_settings` reads back."""
    return {
        "placements": list(config.placements),
        "mode": config.mode,
        "skip_blocks": config.skip_blocks,
        "adapter": adapter_settings,
    }


def field_names():
    return tuple(field.name for field in dataclasses.fields(AdapterConfig))
