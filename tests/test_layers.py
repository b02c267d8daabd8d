import glob
import math
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adapters import AdapterFusion
from keras_adapters import AdapterLayer


def _relative_error(received, expected):
    return np.linalg.norm(received - expected) / np.linalg.norm(expected)


def test_output_shape_and_weights():
    layer = AdapterLayer(bottleneck_size=4)
    outputs = layer(np.ones((2, 3, 16), "float32"))

    assert tuple(outputs.shape) == (2, 3, 16)
    shapes = {weight.name: tuple(weight.shape) for weight in layer.weights}
    assert shapes == {
        "down_kernel": (16, 4),
        "down_bias": (4,),
        "up_kernel": (4, 16),
        "up_bias": (16,),
    }


def test_parameter_count_formula():
    hidden_size, bottleneck_size = 384, 64
    layer = AdapterLayer(bottleneck_size=bottleneck_size)
    layer.build((None, hidden_size))

    expected = 2 * hidden_size * bottleneck_size + hidden_size + bottleneck_size
    assert layer.count_params() == expected


def test_identity_at_initialisation():
    # Houlsby initialisation: std 1e-3 kernels and zero biases leave the
    # output within 1e-3 relative error of the input.
    keras.utils.set_random_seed(0)
    hidden = np.random.default_rng(0).normal(size=(8, 32, 384)).astype("float32")
    outputs = keras.ops.convert_to_numpy(AdapterLayer(bottleneck_size=64)(hidden))

    assert _relative_error(outputs, hidden) < 1e-3


def test_default_initializers_follow_houlsby():
    layer = AdapterLayer()
    for initializer in (layer.down_kernel_initializer, layer.up_kernel_initializer):
        assert isinstance(initializer, keras.initializers.TruncatedNormal)
        assert initializer.stddev == pytest.approx(1e-3)
    for initializer in (layer.down_bias_initializer, layer.up_bias_initializer):
        assert isinstance(initializer, keras.initializers.Zeros)


def test_formula_with_known_weights():
    layer = AdapterLayer(
        bottleneck_size=2,
        activation="relu",
        down_kernel_initializer="ones",
        up_kernel_initializer="ones",
        up_bias_initializer="ones",
    )
    hidden = np.array([[1.0, -3.0, 0.5]], "float32")
    outputs = keras.ops.convert_to_numpy(layer(hidden))

    # W_down·h = -1.5 in both bottleneck units, relu gives 0, W_up·0 + 1 = 1.
    np.testing.assert_allclose(outputs, hidden + 1.0)


def test_without_residual():
    layer = AdapterLayer(bottleneck_size=2, residual=False)
    hidden = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    outputs = keras.ops.convert_to_numpy(layer(hidden))

    assert np.abs(outputs).max() < 1e-3


def test_reduction_factor_sets_bottleneck():
    layer = AdapterLayer(reduction_factor=8)
    layer.build((None, 64))

    assert layer.units == 8
    assert layer.count_params() == 2 * 64 * 8 + 64 + 8


def test_default_reduction_factor_is_16():
    layer = AdapterLayer()
    layer.build((None, 384))

    assert layer.units == 24


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"bottleneck_size": 0}, "bottleneck_size=0"),
        ({"bottleneck_size": -3}, "bottleneck_size=-3"),
        ({"bottleneck_size": 2.5}, "bottleneck_size=2.5"),
        ({"reduction_factor": 0}, "reduction_factor=0"),
        ({"bottleneck_size": 4, "reduction_factor": 2}, "reduction_factor=2"),
        ({"activation": "no_such_activation"}, "activation='no_such_activation'"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdapterLayer(**kwargs)


def test_bottleneck_larger_than_hidden_size():
    layer = AdapterLayer(bottleneck_size=32)
    with pytest.raises(ValueError, match="bottleneck_size=32"):
        layer.build((None, 16))


def test_reduction_factor_leaving_no_bottleneck():
    layer = AdapterLayer(reduction_factor=32)
    with pytest.raises(ValueError, match="reduction_factor=32"):
        layer.build((None, 16))


def test_config_round_trip():
    layer = AdapterLayer(
        bottleneck_size=8,
        activation="relu",
        residual=False,
        up_kernel_initializer=keras.initializers.Constant(0.5),
        name="my_adapter",
    )
    restored = AdapterLayer.from_config(layer.get_config())

    assert restored.get_config() == layer.get_config()
    assert restored.name == "my_adapter"
    assert restored.residual is False
    assert restored.activation is keras.activations.relu


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5, 12)),
            keras.layers.Dense(12),
            AdapterLayer(bottleneck_size=3, up_kernel_initializer="glorot_uniform"),
        ]
    )
    inputs = np.random.default_rng(0).normal(size=(2, 5, 12)).astype("float32")
    expected = model.predict(inputs, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    # No custom_objects: the layer is registered with Keras.
    loaded = keras.models.load_model(path)

    assert isinstance(loaded.layers[-1], AdapterLayer)
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), expected, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("layer_norm", [None, "before", "after"])
def test_mixed_precision_dtypes(policy, layer_norm):
    layer = AdapterLayer(bottleneck_size=4, layer_norm=layer_norm, dtype=policy)
    outputs = layer(np.ones((2, 16), "float32"))

    compute_dtype = policy.split("_")[1]
    assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
    for weight in layer.weights:
        assert weight.dtype == "float32"


def test_mask_passes_through():
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 8, mask_zero=True)(inputs)
    adapted = AdapterLayer(bottleneck_size=2)(embedded)
    pooled = keras.layers.GlobalAveragePooling1D()(adapted)
    model = keras.Model(inputs, pooled)

    padded = np.array([[1, 2, 0, 0]], "int32")
    trimmed = np.array([[1, 2]], "int32")
    np.testing.assert_allclose(
        model.predict(padded, verbose=0), model.predict(trimmed, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fusion_mixed_precision_dtypes(policy):
    fusion = AdapterFusion(["a", "b"], dtype=policy)
    hidden = np.ones((2, 3, 16), "float32")
    outputs = fusion(hidden, [hidden, -hidden])

    compute_dtype = policy.split("_")[1]
    assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
    for weight in fusion.weights:
        assert weight.dtype == "float32"


def test_scaling_multiplies_bottleneck_output():
    inputs = np.random.default_rng(0).normal(size=(2, 16)).astype("float32")
    plain = AdapterLayer(bottleneck_size=4, residual=False)
    scaled = AdapterLayer.from_config({**plain.get_config(), "scaling": 4.0})
    plain.build(inputs.shape)
    scaled.build(inputs.shape)
    scaled.set_weights(plain.get_weights())

    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(scaled(inputs)),
        4.0 * keras.ops.convert_to_numpy(plain(inputs)),
        rtol=1e-5,
    )


def test_layer_norm_before_normalizes_input():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, 16)).astype("float32")
    layer = AdapterLayer(bottleneck_size=4, layer_norm="before", residual=False)
    layer.build(inputs.shape)

    # Shifting and scaling the input leaves a normalized input unchanged.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(3.0 * inputs + 5.0)),
        keras.ops.convert_to_numpy(layer(inputs)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "argument, value", [("scaling", "2"), ("layer_norm", "middle")]
)
def test_bad_variant_argument_raises(argument, value):
    with pytest.raises(ValueError, match=argument):
        AdapterLayer(**{argument: value})


def _numpy_adapter(layer, hidden):
    """Return the adapter formula on `hidden`, computed in NumPy from `layer`'s weights."""
    down_kernel, down_bias, up_kernel, up_bias = layer.get_weights()
    bottleneck = hidden @ down_kernel + down_bias
    # Exact GELU, written with the standard library's erf.
    erf = np.vectorize(math.erf)
    bottleneck = 0.5 * bottleneck * (1.0 + erf(bottleneck / math.sqrt(2.0)))
    return hidden + bottleneck @ up_kernel + up_bias


def _layer_with_random_weights(input_shape, rng):
    """Return a built adapter whose weights are far from the identity."""
    layer = AdapterLayer(bottleneck_size=4)
    layer.build(input_shape)
    layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    return layer


@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 16), (2, 2, 3, 16)])
def test_matches_numpy_formula_for_any_rank(shape):
    rng = np.random.default_rng(0)
    layer = _layer_with_random_weights(shape, rng)
    hidden = rng.normal(size=shape).astype("float32")

    outputs = keras.ops.convert_to_numpy(layer(hidden))

    assert outputs.shape == shape
    np.testing.assert_allclose(outputs, _numpy_adapter(layer, hidden), rtol=1e-5, atol=1e-5)


def test_unknown_batch_and_sequence_sizes():
    rng = np.random.default_rng(0)
    layer = _layer_with_random_weights((None, None, 16), rng)
    traced = tf.function(layer, input_signature=[tf.TensorSpec((None, None, 16))])

    for shape in [(2, 3, 16), (1, 5, 16)]:
        hidden = rng.normal(size=shape).astype("float32")
        np.testing.assert_allclose(
            traced(hidden).numpy(), _numpy_adapter(layer, hidden), rtol=1e-5, atol=1e-5
        )


def _executed_op_types(function, *args):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    function(*args)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            function(*args)
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as file:
            space.ParseFromString(file.read())

    # TensorFlow names each executed op's event "<op name>:<op type>".
    op_types = []
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                op_type = name.rpartition(":")[2]
                if ":" in name and " " not in name and op_type.isidentifier():
                    op_types.append(op_type)
    return op_types


def test_projections_fuse_with_their_biases():
    # Grappler fuses a matrix product with a following BiasAdd, on CPU with
    # or without oneDNN. The fused kernel is `_FusedMatMul`, or
    # `_MklNativeFusedMatMul` with oneDNN.
    layer = AdapterLayer(bottleneck_size=4)
    hidden = tf.random.normal((2, 8, 16))
    layer(hidden)

    op_types = _executed_op_types(tf.function(layer), hidden)

    fused = [op_type for op_type in op_types if op_type.endswith("FusedMatMul")]
    assert len(fused) == 2, op_types
    assert not [op_type for op_type in op_types if "BiasAdd" in op_type], op_types
