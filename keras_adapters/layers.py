"""The bottleneck adapter layer."""

import numbers
import threading

import keras

_PACKAGE = "keras_adapters"

DEFAULT_REDUCTION_FACTOR = 16


def default_projection_initializer():
    """Return the Houlsby initializer: truncated normal with std 1e-3."""
    return keras.initializers.TruncatedNormal(stddev=1e-3)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdapterLayer(keras.layers.Layer):
    """Bottleneck adapter: `h + s · W_up · σ(W_down · h)` over the last axis.

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
        scaling: float. The factor `s` on the bottleneck output. Defaults to
            `1.0`.
        layer_norm: `None`, `"before"` or `"after"`. Adds a layer norm on the
            input before the down-projection, or on the up-projection's
            output before the residual add. An `"after"` norm starts with a
            zero scale, so that the layer still starts as the identity.
            Defaults to `None`.
        layer_norm_epsilon: float. Epsilon of that layer norm. Defaults to
            `1e-5`, PyTorch's default.
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
        scaling=1.0,
        layer_norm=None,
        layer_norm_epsilon=1e-5,
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
        self.scaling = _check_scaling(scaling)
        self.layer_norm = _check_layer_norm(layer_norm)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
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
        if self.layer_norm is not None:
            self.layer_norm_gamma = self.add_weight(
                name="layer_norm_gamma",
                shape=(self.hidden_size,),
                initializer="ones" if self.layer_norm == "before" else "zeros",
            )
            self.layer_norm_beta = self.add_weight(
                name="layer_norm_beta",
                shape=(self.hidden_size,),
                initializer="zeros",
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

    def call(self, inputs, add_residual=True):
        # On rank-2 inputs, TensorFlow's Grappler fuses each product with its
        # bias, and with oneDNN also with the GELU and the residual add.
        hidden = keras.ops.reshape(inputs, (-1, self.hidden_size))
        outputs = hidden
        if self.layer_norm == "before":
            outputs = self._normalize(outputs)
        outputs = _project(outputs, self.down_kernel, self.down_bias)
        outputs = self.activation(outputs)
        outputs = _project(outputs, self.up_kernel, self.up_bias)
        if self.layer_norm == "after":
            outputs = self._normalize(outputs)
        if self.scaling != 1.0:
            outputs = outputs * keras.ops.cast(self.scaling, outputs.dtype)
        if self.residual and add_residual:
            outputs = outputs + hidden
        return keras.ops.reshape(outputs, keras.ops.shape(inputs))

    def _normalize(self, inputs):
        # Statistics in float32, also under mixed precision.
        values = keras.ops.cast(inputs, "float32")
        mean = keras.ops.mean(values, axis=-1, keepdims=True)
        variance = keras.ops.var(values, axis=-1, keepdims=True)
        values = (values - mean) * keras.ops.rsqrt(
            variance + self.layer_norm_epsilon
        )
        values = keras.ops.cast(values, inputs.dtype)
        return values * self.layer_norm_gamma + self.layer_norm_beta

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
                "scaling": self.scaling,
                "layer_norm": self.layer_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
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


def _check_scaling(scaling):
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(
            f"`scaling` must be a number. Received: scaling={scaling!r}"
        )
    return float(scaling)


def _check_layer_norm(layer_norm):
    if layer_norm not in (None, "before", "after"):
        raise ValueError(
            "`layer_norm` must be `None`, 'before' or 'after'. Received: "
            f"layer_norm={layer_norm!r}"
        )
    return layer_norm


def _project(inputs, kernel, bias):
    """Return `inputs @ kernel + bias` for rank-2 `inputs`."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # With `+` instead of a BiasAdd op, Grappler regroups the bias and
        # residual adds and leaves the up-projection unfused.
        return tf.nn.bias_add(tf.matmul(inputs, kernel), bias)
    return keras.ops.matmul(inputs, kernel) + bias


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
    active adapters run in order, each on the previous one's output. A
    parallel adapter reads the branch's input, recorded by a
    `BranchInputTap`, and adds its output to the running output. An active
    fusion combines the outputs of its adapters. When the sublayer returns a
    tuple, such as `(outputs, cache)`, the adapters act on the first element
    and the other elements pass through unchanged.

    Args:
        sublayer: the wrapped `keras.layers.Layer`.
        placement: string. The branch the sublayer ends, such as
            `"attention"` or `"feedforward"`.
        adapters: dict mapping adapter names to `AdapterLayer`s. Defaults to
            no adapters.
        active_adapters: list of adapter and fusion names to apply, in
            order. `None` applies all adapters in the order they were added.
        parallel_adapters: list of the names of adapters that read the
            branch's input. Defaults to none.
        fusions: dict mapping fusion names to `AdapterFusion` layers.
            Defaults to no fusions.
        **kwargs: base layer arguments.
    """

    def __init__(
        self,
        sublayer,
        placement,
        adapters=None,
        active_adapters=None,
        parallel_adapters=None,
        fusions=None,
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
        self.parallel_adapters = list(parallel_adapters or [])
        self.fusions = dict(fusions or {})
        self.supports_masking = True
        self._sublayer_takes_training = _call_takes_training(sublayer)
        # The `BranchInput` that parallel adapters read, set by
        # `add_adapters` when it inserts the first one.
        self.branch_input = None

    def build(self, *args, **kwargs):
        # The sublayer was built by its block, and adapters are built when
        # they are added, so there is nothing left to create here.
        self.built = True

    def add_adapter(self, name, adapter, input_shape, parallel=False):
        """Build `adapter` for `input_shape` and add it under `name`.

        The new adapter is active: when only some adapters were chosen to
        run, it runs after them. A `parallel` adapter reads the branch's
        input, so `branch_input` must be set first.
        """
        self._check_free(name)
        if parallel and self.branch_input is None:
            raise ValueError(
                f"Layer '{self.name}' has no recorded branch input, so it "
                "cannot take a parallel adapter."
            )
        adapter.build(input_shape)
        with unlocked_state(self):
            self.adapters[name] = adapter
        if parallel:
            self.parallel_adapters.append(name)
        if self.active_adapters is not None:
            self.active_adapters.append(name)

    def remove_adapter(self, name):
        """Remove the adapter called `name` and return it."""
        adapter = self.adapters[name]
        with unlocked_state(self):
            del self.adapters[name]
            self._tracker.untrack(adapter)
        if name in self.parallel_adapters:
            self.parallel_adapters.remove(name)
        self._deactivate(name)
        return adapter

    def add_fusion(self, name, fusion, input_shape):
        """Build `fusion` for `input_shape` and add it under `name`."""
        self._check_free(name)
        missing = [n for n in fusion.adapter_names if n not in self.adapters]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' has no adapters named {missing}, so it "
                "cannot fuse them."
            )
        fusion.build(input_shape)
        with unlocked_state(self):
            self.fusions[name] = fusion

    def remove_fusion(self, name):
        """Remove the fusion called `name` and return it."""
        fusion = self.fusions[name]
        with unlocked_state(self):
            del self.fusions[name]
            self._tracker.untrack(fusion)
        self._deactivate(name)
        return fusion

    def _check_free(self, name):
        if name in self.adapters or name in self.fusions:
            raise ValueError(
                f"Layer '{self.name}' already has an adapter or fusion named "
                f"'{name}'."
            )

    def _deactivate(self, name):
        if self.active_adapters is not None and name in self.active_adapters:
            self.active_adapters.remove(name)

    def __call__(self, *args, **kwargs):
        # Keras's Layer.__call__ rejects a `**kwargs` argument that mixes
        # tensors and other values, such as the cache tensor and integer
        # index that cached decoding passes, so the wrapper calls `call`
        # itself. The sublayer and the adapters still go through their own
        # `__call__`, which handles dtypes, masks and the training flag.
        self.built = True
        return self.call(*args, **kwargs)

    def call(self, inputs=None, *args, training=None, **kwargs):
        try:
            return self._call_with_adapters(inputs, args, training, kwargs)
        finally:
            # The branch input is needed only within this call. Dropping it
            # here keeps the tensor, and a traced graph behind it, from
            # staying alive until the next call.
            if self.branch_input is not None:
                self.branch_input.clear()

    def _call_with_adapters(self, inputs, args, training, kwargs):
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
            hidden = self._apply(name, hidden)
        if rest is None:
            return hidden
        return (hidden,) + rest

    def _apply(self, name, hidden):
        if name in self.fusions:
            fusion = self.fusions[name]
            adapter_outputs = []
            for adapter_name in fusion.adapter_names:
                inputs = self._adapter_input(adapter_name, hidden)
                adapter = self.adapters[adapter_name]
                adapter_outputs.append(adapter(inputs, add_residual=False))
            return fusion(hidden, adapter_outputs)

        adapter = self.adapters[name]
        if name in self.parallel_adapters:
            return hidden + adapter(self.branch_input.read(self.name))
        return adapter(hidden)

    def _adapter_input(self, name, hidden):
        if name in self.parallel_adapters:
            return self.branch_input.read(self.name)
        return hidden

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
                "parallel_adapters": self.parallel_adapters,
                "fusions": {
                    name: keras.saving.serialize_keras_object(fusion)
                    for name, fusion in self.fusions.items()
                },
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
        config["fusions"] = {
            name: keras.saving.deserialize_keras_object(fusion)
            for name, fusion in config.get("fusions", {}).items()
        }
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdapterFusion(keras.layers.Layer):
    """Attention over the outputs of several adapters.

    For the branch output `h` and the bottleneck outputs `o_1 … o_n` of the
    fused adapters (each adapter's output before its residual add), the layer
    computes

    `h + Σ_i softmax_i((h W_q + b_q) · (o_i W_k + b_k) / T) · (o_i W_v + b_v)`.

    `W_v` starts as the identity and the query and key kernels start small,
    so at initialisation the layer adds the mean of the adapter outputs.
    The fused adapters stay frozen, and only these weights train.

    Args:
        adapter_names: list of strings. Names of the fused adapters, at
            least two.
        temperature: float. The softmax temperature `T`. Defaults to `1.0`.
        **kwargs: base layer arguments.

    Input shape:
        `h`: `(..., d)`; adapter outputs: a list of `n` tensors `(..., d)`.

    Output shape:
        `(..., d)`.

    References:
        - Pfeiffer et al., 2021. AdapterFusion: Non-Destructive Task
          Composition for Transfer Learning. https://arxiv.org/abs/2005.00247
    """

    def __init__(self, adapter_names, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        adapter_names = list(adapter_names)
        if len(adapter_names) < 2 or len(set(adapter_names)) != len(
            adapter_names
        ):
            raise ValueError(
                "`adapter_names` must list at least two distinct adapters. "
                f"Received: adapter_names={adapter_names!r}"
            )
        if isinstance(temperature, bool) or not isinstance(
            temperature, numbers.Real
        ) or temperature <= 0:
            raise ValueError(
                "`temperature` must be a positive number. Received: "
                f"temperature={temperature!r}"
            )
        self.adapter_names = adapter_names
        self.temperature = float(temperature)

    def build(self, input_shape):
        hidden_size = int(input_shape[-1])
        projection = keras.initializers.TruncatedNormal(stddev=0.02)
        for role in ("query", "key", "value"):
            initializer = "identity" if role == "value" else projection
            kernel = self.add_weight(
                name=f"{role}_kernel",
                shape=(hidden_size, hidden_size),
                initializer=initializer,
            )
            bias = self.add_weight(
                name=f"{role}_bias", shape=(hidden_size,), initializer="zeros"
            )
            setattr(self, f"{role}_kernel", kernel)
            setattr(self, f"{role}_bias", bias)

    def call(self, inputs, adapter_outputs):
        outputs = keras.ops.stack(adapter_outputs, axis=-2)
        query = keras.ops.matmul(inputs, self.query_kernel) + self.query_bias
        keys = keras.ops.matmul(outputs, self.key_kernel) + self.key_bias
        values = keras.ops.matmul(outputs, self.value_kernel) + self.value_bias

        scores = keras.ops.einsum("...d,...nd->...n", query, keys)
        # Softmax in float32, also under mixed precision.
        scores = keras.ops.cast(scores, "float32") / self.temperature
        weights = keras.ops.cast(keras.ops.softmax(scores, axis=-1), inputs.dtype)
        return inputs + keras.ops.einsum("...n,...nd->...d", weights, values)

    def compute_output_shape(self, input_shape, adapter_outputs_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "adapter_names": list(self.adapter_names),
                "temperature": self.temperature,
            }
        )
        return config


class BranchInput:
    """The input of a block's feed-forward branch, recorded on each call.

    A `BranchInputTap` records the tensor when the block calls the branch's
    first sublayer, and the parallel adapters at the branch's end read it
    later in the same block call. Their wrapper clears it at the end of that
    call. Each thread keeps its own value, because `tf.distribute` may trace
    replicas in separate threads.
    """

    def __init__(self):
        self._local = threading.local()

    def record(self, value):
        self._local.value = value

    def clear(self):
        self._local.value = None

    def read(self, reader_name):
        value = getattr(self._local, "value", None)
        if value is None:
            raise RuntimeError(
                f"Layer '{reader_name}' runs parallel adapters, but the block "
                "did not call its feed-forward input sublayer first, so the "
                "branch input is unknown. Check the block's "
                "`feedforward_input` registration."
            )
        return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BranchInputTap(keras.layers.Layer):
    """A block's sublayer that records its input for parallel adapters.

    `add_adapters` puts this wrapper in place of the first sublayer of the
    feed-forward branch, such as BERT's intermediate dense layer. It calls
    the sublayer unchanged.

    Args:
        sublayer: the wrapped `keras.layers.Layer`.
        **kwargs: base layer arguments.
    """

    def __init__(self, sublayer, **kwargs):
        kwargs.setdefault("dtype", sublayer.dtype_policy)
        super().__init__(**kwargs)
        self.sublayer = sublayer
        self.branch_input = BranchInput()

    def build(self, *args, **kwargs):
        self.built = True

    def __call__(self, *args, **kwargs):
        # Called directly, like `AdaptedSublayer`, so that the wrapper adds
        # nothing to the sublayer's own `__call__`.
        self.built = True
        return self.call(*args, **kwargs)

    def call(self, inputs=None, *args, **kwargs):
        if inputs is None:
            self.branch_input.record(next(iter(kwargs.values())))
            return self.sublayer(*args, **kwargs)
        self.branch_input.record(inputs)
        return self.sublayer(inputs, *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        return self.sublayer.compute_output_spec(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["sublayer"] = keras.saving.serialize_keras_object(self.sublayer)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["sublayer"] = keras.saving.deserialize_keras_object(
            config["sublayer"]
        )
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
