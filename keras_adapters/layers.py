"""The bottleneck adapter layer."""

import numbers

import keras

_PACKAGE = "keras_adapters"

DEFAULT_REDUCTION_FACTOR = 16


def default_projection_initializer():
    """Return the Houlsby initializer: truncated normal with std 1e-3."""
    return keras.initializers.TruncatedNormal(stddev=1e-3)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdapterLayer(keras.layers.Layer):
    """Bottleneck adapter: `h + W_up · σ(W_down · h)` over the last axis.

    The down-projection maps the hidden size `d` to the bottleneck size `r`,
    the activation σ runs in the bottleneck, and the up-projection maps back
    to `d`. With near-zero up-projection weights the layer starts close to
    the identity, so inserting it into a pretrained model keeps that model's
    outputs.

    Args:
        bottleneck_size: int or `None`. The bottleneck size `r`. Give either
            this or `reduction_factor`.
        reduction_factor: int or `None`. Sets `r = d // reduction_factor`,
            with `d` read from the input shape at build time. Defaults to
            `16` when `bottleneck_size` is `None`.
        activation: string or callable. Any Keras activation, applied in the
            bottleneck. Defaults to `"gelu"`, as in the released Houlsby code.
        residual: bool. Whether to add the input to the bottleneck output.
            Defaults to `True`.
        down_kernel_initializer, up_kernel_initializer: initializers of the
            projection kernels. Default to a truncated normal with standard
            deviation `1e-3`.
        down_bias_initializer, up_bias_initializer: initializers of the
            projection biases. Default to `"zeros"`.
        **kwargs: base layer arguments, such as `name` and `dtype`.

    Input shape:
        `(..., d)`.

    Output shape:
        `(..., d)`.

    Example:

    ```python
    adapter = keras_adapters.AdapterLayer(bottleneck_size=8)
    hidden = keras.random.normal((2, 16, 64))
    outputs = adapter(hidden)  # Close to `hidden` at initialisation.
    ```

    References:
        - Houlsby et al., 2019. Parameter-Efficient Transfer Learning for NLP.
          https://arxiv.org/abs/1902.00751
    """

    def __init__(
        self,
        bottleneck_size=None,
        reduction_factor=None,
        activation="gelu",
        residual=True,
        down_kernel_initializer=None,
        down_bias_initializer="zeros",
        up_kernel_initializer=None,
        up_bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_sizes(bottleneck_size, reduction_factor)
        if bottleneck_size is None and reduction_factor is None:
            reduction_factor = DEFAULT_REDUCTION_FACTOR

        self.bottleneck_size = bottleneck_size
        self.reduction_factor = reduction_factor
        self.activation = _get_activation(activation)
        self.residual = bool(residual)
        self.down_kernel_initializer = keras.initializers.get(
            down_kernel_initializer or default_projection_initializer()
        )
        self.down_bias_initializer = keras.initializers.get(
            down_bias_initializer
        )
        self.up_kernel_initializer = keras.initializers.get(
            up_kernel_initializer or default_projection_initializer()
        )
        self.up_bias_initializer = keras.initializers.get(up_bias_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        hidden_size = input_shape[-1]
        if hidden_size is None:
            raise ValueError(
                "AdapterLayer needs a known last dimension (the hidden size). "
                f"Received: input_shape={input_shape}"
            )
        self.hidden_size = int(hidden_size)
        self.units = self.resolve_bottleneck_size(self.hidden_size)

        self.down_kernel = self.add_weight(
            name="down_kernel",
            shape=(self.hidden_size, self.units),
            initializer=self.down_kernel_initializer,
        )
        self.down_bias = self.add_weight(
            name="down_bias",
            shape=(self.units,),
            initializer=self.down_bias_initializer,
        )
        self.up_kernel = self.add_weight(
            name="up_kernel",
            shape=(self.units, self.hidden_size),
            initializer=self.up_kernel_initializer,
        )
        self.up_bias = self.add_weight(
            name="up_bias",
            shape=(self.hidden_size,),
            initializer=self.up_bias_initializer,
        )

    def resolve_bottleneck_size(self, hidden_size):
        """Return the bottleneck size `r` for hidden size `d`, checking it."""
        if self.bottleneck_size is not None:
            if self.bottleneck_size > hidden_size:
                raise ValueError(
                    "`bottleneck_size` must not exceed the hidden size "
                    f"{hidden_size}. Received: bottleneck_size="
                    f"{self.bottleneck_size}"
                )
            return int(self.bottleneck_size)

        units = hidden_size // self.reduction_factor
        if units < 1:
            raise ValueError(
                f"`reduction_factor` leaves a bottleneck size below 1 for "
                f"hidden size {hidden_size}. Use a factor of at most "
                f"{hidden_size}. Received: reduction_factor="
                f"{self.reduction_factor}"
            )
        return units

    def call(self, inputs):
        hidden = keras.ops.matmul(inputs, self.down_kernel) + self.down_bias
        hidden = self.activation(hidden)
        outputs = keras.ops.matmul(hidden, self.up_kernel) + self.up_bias
        if self.residual:
            outputs = outputs + inputs
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bottleneck_size": self.bottleneck_size,
                "reduction_factor": self.reduction_factor,
                "activation": keras.activations.serialize(self.activation),
                "residual": self.residual,
                "down_kernel_initializer": keras.initializers.serialize(
                    self.down_kernel_initializer
                ),
                "down_bias_initializer": keras.initializers.serialize(
                    self.down_bias_initializer
                ),
                "up_kernel_initializer": keras.initializers.serialize(
                    self.up_kernel_initializer
                ),
                "up_bias_initializer": keras.initializers.serialize(
                    self.up_bias_initializer
                ),
            }
        )
        return config


def _check_sizes(bottleneck_size, reduction_factor):
    if bottleneck_size is not None and reduction_factor is not None:
        raise ValueError(
            "Pass either `bottleneck_size` or `reduction_factor`, not both. "
            f"Received: bottleneck_size={bottleneck_size}, "
            f"reduction_factor={reduction_factor}"
        )
    for name, value in (
        ("bottleneck_size", bottleneck_size),
        ("reduction_factor", reduction_factor),
    ):
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or value <= 0
        ):
            raise ValueError(
                f"`{name}` must be a positive integer. Received: "
                f"{name}={value!r}"
            )


def _get_activation(activation):
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`activation` must be the name of a Keras activation, such as "
            f"'gelu' or 'relu', or a callable. Received: "
            f"activation={activation!r}"
        ) from error


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdaptedSublayer(keras.layers.Layer):
    """A block's sublayer followed by its named adapters.

    `add_adapters` puts this wrapper in place of the last sublayer of a
    block's branch, such as the dropout after the attention output
    projection, so the adapters run before the block's residual add. The
    active adapters run in order, each on the previous one's output. When the
    sublayer returns a tuple, such as `(outputs, cache)`, the adapters act on
    the first element and the other elements pass through unchanged.

    Args:
        sublayer: the wrapped `keras.layers.Layer`.
        placement: string. The branch the sublayer ends, such as
            `"attention"` or `"feedforward"`.
        adapters: dict mapping adapter names to `AdapterLayer`s. Defaults to
            no adapters.
        active_adapters: list of adapter names to apply, in order. `None`
            applies all of them in the order they were added.
        **kwargs: base layer arguments.
    """

    def __init__(
        self,
        sublayer,
        placement,
        adapters=None,
        active_adapters=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", sublayer.dtype_policy)
        super().__init__(**kwargs)
        self.sublayer = sublayer
        self.placement = placement
        self.adapters = dict(adapters or {})
        self.active_adapters = (
            None if active_adapters is None else list(active_adapters)
        )
        self.supports_masking = True
        self._sublayer_takes_training = _call_takes_training(sublayer)

    def build(self, *args, **kwargs):
        # The sublayer was built by its block, and adapters are built when
        # they are added, so there is nothing left to create here.
        self.built = True

    def add_adapter(self, name, adapter, input_shape):
        """Build `adapter` for `input_shape` and add it under `name`.

        The new adapter is active: when only some adapters were chosen to
        run, it runs after them.
        """
        if name in self.adapters:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter named '{name}'."
            )
        adapter.build(input_shape)
        with unlocked_state(self):
            self.adapters[name] = adapter
        if self.active_adapters is not None:
            self.active_adapters.append(name)

    def remove_adapter(self, name):
        """Remove the adapter called `name` and return it."""
        adapter = self.adapters[name]
        with unlocked_state(self):
            del self.adapters[name]
            self._tracker.untrack(adapter)
        if self.active_adapters is not None and name in self.active_adapters:
            self.active_adapters.remove(name)
        return adapter

    def __call__(self, *args, **kwargs):
        # Keras's Layer.__call__ rejects a `**kwargs` argument that mixes
        # tensors and other values, such as the cache tensor and integer
        # index that cached decoding passes, so the wrapper calls `call`
        # itself. The sublayer and the adapters still go through their own
        # `__call__`, which handles dtypes, masks and the training flag.
        self.built = True
        return self.call(*args, **kwargs)

    def call(self, inputs=None, *args, training=None, **kwargs):
        if self._sublayer_takes_training and training is not None:
            kwargs["training"] = training
        if inputs is None:
            # The block passed the sublayer's inputs by keyword, as SmolLM3
            # passes `hidden_states=` to its attention.
            outputs = self.sublayer(*args, **kwargs)
        else:
            outputs = self.sublayer(inputs, *args, **kwargs)

        names = (
            list(self.adapters)
            if self.active_adapters is None
            else self.active_adapters
        )
        if not names:
            return outputs

        if isinstance(outputs, (tuple, list)):
            hidden, rest = outputs[0], tuple(outputs[1:])
        else:
            hidden, rest = outputs, None
        for name in names:
            hidden = self.adapters[name](hidden)
        if rest is None:
            return hidden
        return (hidden,) + rest

    def compute_output_spec(self, inputs, *args, **kwargs):
        return self.sublayer.compute_output_spec(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sublayer": keras.saving.serialize_keras_object(self.sublayer),
                "placement": self.placement,
                "adapters": {
                    name: keras.saving.serialize_keras_object(adapter)
                    for name, adapter in self.adapters.items()
                },
                "active_adapters": self.active_adapters,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["sublayer"] = keras.saving.deserialize_keras_object(
            config["sublayer"]
        )
        config["adapters"] = {
            name: keras.saving.deserialize_keras_object(adapter)
            for name, adapter in config.get("adapters", {}).items()
        }
        return cls(**config)


def _call_takes_training(layer):
    return bool(getattr(layer, "_call_has_training_arg", False))


class unlocked_state:
    """Context manager that lets a built layer track new state."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.was_locked = self.layer._tracker.locked
        self.layer._tracker.unlock()

    def __exit__(self, *exc_info):
        if self.was_locked:
            self.layer._tracker.lock()
