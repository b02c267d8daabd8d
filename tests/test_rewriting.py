import keras
import keras_hub
import numpy as np
import pytest
from conftest import FAMILIES
from conftest import HIDDEN_SIZE
from conftest import changed_weight_groups
from conftest import fit_briefly
from conftest import layers_from_first_block
from conftest import make_backbone
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs

import keras_adapters
from keras_adapters import AdaptedSublayer

BOTTLENECK_SIZE = 4
PER_ADAPTER = 2 * HIDDEN_SIZE * BOTTLENECK_SIZE + HIDDEN_SIZE + BOTTLENECK_SIZE

# An up-projection bias that moves each branch's output visibly. The branch
# outputs of a random tiny backbone are small, so near-zero adapters barely
# show in the model's outputs.
_LARGE_BIAS = keras.initializers.RandomNormal(stddev=1.0, seed=1)


def _num_blocks(family):
    return FAMILIES[family][3]


def _size(weights):
    return sum(int(np.prod(weight.shape)) for weight in weights)


def _layer_norm_weights(model):
    """Return the weights of the layer norms in the blocks and above them."""
    return [
        weight
        for top_layer in layers_from_first_block(model)
        for layer in top_layer._flatten_layers()
        if isinstance(layer, keras.layers.LayerNormalization)
        for weight in layer.weights
    ]


def _head_weights(model):
    backbone = keras_adapters.rewriting.find_backbone(model)
    backbone_ids = {id(weight) for weight in backbone.weights}
    head = [weight for weight in model.weights if id(weight) not in backbone_ids]
    pooler = [layer for layer in backbone.layers if layer.name == "pooled_dense"]
    return head + [weight for layer in pooler for weight in layer.weights]


def test_identity_at_initialisation(family):
    model = make_classifier(family)
    inputs = make_inputs(family)
    expected = model_outputs(model, inputs)

    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    received = model_outputs(model, inputs)

    # Each adapter adds about std(W_up)·sqrt(r)·|σ(W_down·h)|, near 1e-5
    # here, so the outputs may move by at most 1e-3 relative to their scale.
    scale = np.abs(expected).max()
    assert np.abs(received - expected).max() <= 1e-3 * scale


def test_adapters_change_outputs_once_trained(family):
    # Guards the identity test: adapters that did not run would pass it too.
    model = make_classifier(family)
    inputs = make_inputs(family)
    expected = model_outputs(model, inputs)
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )

    scale = np.abs(expected).max()
    assert np.abs(model_outputs(model, inputs) - expected).max() > 0.1 * scale


def test_adapters_only_parameter_count(family):
    model = make_classifier(family)
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        train_layer_norms=False,
        train_head=False,
    )
    counts = keras_adapters.count_parameters(model)

    expected = 2 * _num_blocks(family) * PER_ADAPTER
    assert _size(model.trainable_weights) == expected
    assert counts.trainable == expected
    assert counts.adapters == expected


def test_default_parameter_count(family):
    model = make_classifier(family)
    total_before = _size(model.weights)
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    counts = keras_adapters.count_parameters(model)

    adapters = 2 * _num_blocks(family) * PER_ADAPTER
    layer_norms = _size(_layer_norm_weights(model))
    head = _size(_head_weights(model))
    assert layer_norms > 0
    assert counts.trainable == adapters + layer_norms + head
    assert _size(model.trainable_weights) == adapters + layer_norms + head
    assert counts.total == total_before + adapters


def test_pfeiffer_placement(family):
    model = make_classifier(family)
    keras_adapters.add_adapters(
        model,
        placement="pfeiffer",
        bottleneck_size=BOTTLENECK_SIZE,
        train_layer_norms=False,
        train_head=False,
    )

    keys = [key for key, adapter in keras_adapters.rewriting.iter_adapters(model)]
    assert len(keys) == _num_blocks(family)
    assert all(key.endswith("/feedforward") for key in keys)
    assert keras_adapters.count_parameters(model).trainable == (
        _num_blocks(family) * PER_ADAPTER
    )


def test_houlsby_wraps_dropouts_before_residual():
    model = make_backbone("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    block = model.get_layer("transformer_layer_0")

    # The adapters wrap the last sublayer of each branch, the dropout that
    # runs right before the block adds its residual.
    attention = block._self_attention_dropout
    feedforward = block._feedforward_dropout
    assert isinstance(attention, AdaptedSublayer)
    assert isinstance(feedforward, AdaptedSublayer)
    assert isinstance(attention.sublayer, keras.layers.Dropout)
    assert isinstance(feedforward.sublayer, keras.layers.Dropout)
    assert list(attention.adapters) == ["adapter"]


def test_adapter_runs_before_residual_and_layer_norm():
    # With the adapter as the zero map (no residual, zero weights), each
    # branch adds nothing, so every block returns LayerNorm(LayerNorm(x)).
    model = make_backbone("bert")
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        residual=False,
        down_kernel_initializer="zeros",
        up_kernel_initializer="zeros",
    )
    block = model.get_layer("transformer_layer_0")
    hidden = np.random.default_rng(0).normal(size=(2, 8, HIDDEN_SIZE))
    hidden = hidden.astype("float32")

    outputs = block(hidden, training=False)
    expected = block._feedforward_layer_norm(block._self_attention_layer_norm(hidden))

    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs),
        keras.ops.convert_to_numpy(expected),
        atol=1e-5,
    )


def test_fit_changes_only_trainable_weights(family):
    model = make_classifier(family)
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    inputs = make_inputs(family)
    before = [keras.ops.convert_to_numpy(weight).copy() for weight in model.weights]

    fit_briefly(model, inputs, learning_rate=1e-2)

    changed_groups = changed_weight_groups(model, before)
    assert changed_groups == {"adapters", "layer_norms", "head"}


@pytest.mark.parametrize(
    "option, group",
    [
        ("train_adapters", "adapters"),
        ("train_layer_norms", "layer_norms"),
        ("train_head", "head"),
    ],
)
def test_turning_off_a_group(option, group):
    model = make_classifier("bert")
    keras_adapters.add_adapters(
        model, bottleneck_size=BOTTLENECK_SIZE, **{option: False}
    )
    groups = keras_adapters.rewriting.weight_groups(model)
    trainable_groups = {groups.get(id(weight)) for weight in model.trainable_weights}

    assert group not in trainable_groups
    assert None not in trainable_groups
    assert len(trainable_groups) == 2


def test_backbone_weights_frozen():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    trainable = {weight.path for weight in model.trainable_weights}

    assert "token_embedding/embeddings" not in trainable
    assert "transformer_layer_0/feedforward_output_dense/kernel" not in trainable
    assert "transformer_layer_0/self_attention_layer/query/kernel" not in trainable
    assert "transformer_layer_0/self_attention_layer_norm/gamma" in trainable
    assert "pooled_dense/kernel" in trainable
    assert "logits/kernel" in trainable


def test_same_name_twice_raises():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)
    with pytest.raises(ValueError, match="already has adapters or a fusion named 'task'"):
        keras_adapters.add_adapters(
            model, name="task", bottleneck_size=BOTTLENECK_SIZE
        )


def test_second_name_stacks_adapters():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="first", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(model, name="second", bottleneck_size=BOTTLENECK_SIZE)

    assert keras_adapters.adapter_names(model) == ["first", "second"]
    block = model.backbone.get_layer("transformer_layer_1")
    assert list(block._feedforward_dropout.adapters) == ["first", "second"]


def test_remove_restores_base_model():
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    expected = model_outputs(model, inputs)
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )
    keras_adapters.remove_adapters(model, "adapter")

    np.testing.assert_array_equal(model_outputs(model, inputs), expected)
    block = model.backbone.get_layer("transformer_layer_0")
    assert isinstance(block._self_attention_dropout, keras.layers.Dropout)
    assert keras_adapters.adapter_names(model) == []


def test_rewrite_after_predict_uses_new_graph():
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    expected = model.predict(inputs, verbose=0)
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )

    scale = np.abs(expected).max()
    assert np.abs(model.predict(inputs, verbose=0) - expected).max() > 0.1 * scale


def test_albert_adapters_shared_across_depth():
    model = make_backbone("albert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)

    keys = [key for key, adapter in keras_adapters.rewriting.iter_adapters(model)]
    assert keys == [
        "backbone/group_0_inner_layer_0/attention",
        "backbone/group_0_inner_layer_0/feedforward",
    ]


def test_mixed_precision_backbone():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make_classifier("bert")
    finally:
        keras.config.set_dtype_policy("float32")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)

    adapter = next(keras_adapters.rewriting.iter_adapters(model))[1]
    assert adapter.compute_dtype == "float16"
    assert all(weight.dtype == "float32" for weight in adapter.weights)
    assert np.isfinite(model.predict(make_inputs("bert"), verbose=0)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"placement": "sideways"}, "placement='sideways'"),
        ({"placement": ["attention", "attention"]}, "placement="),
        ({"name": ""}, "name=''"),
        ({"name": "a/b"}, "name='a/b'"),
        ({"bottleneck_size": 0}, "bottleneck_size=0"),
        ({"bottleneck_size": HIDDEN_SIZE + 1}, f"bottleneck_size={HIDDEN_SIZE + 1}"),
        ({"reduction_factor": HIDDEN_SIZE + 1}, "reduction_factor="),
        ({"activation": "nope"}, "activation='nope'"),
    ],
)
def test_invalid_arguments_change_nothing(kwargs, message):
    model = make_classifier("bert")
    trainable_before = [weight.trainable for weight in model.weights]

    with pytest.raises(ValueError, match=message):
        keras_adapters.add_adapters(model, **kwargs)

    assert keras_adapters.adapter_names(model) == []
    assert [weight.trainable for weight in model.weights] == trainable_before


def test_model_without_blocks_raises():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="register_block"):
        keras_adapters.add_adapters(model)


def test_registered_custom_block():
    @keras.saving.register_keras_serializable(package="keras_adapters_tests")
    class TinyBlock(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.projection = keras.layers.Dense(8)
            self.output_dropout = keras.layers.Dropout(0.0)

        def build(self, inputs_shape):
            self.projection.build(inputs_shape)

        def call(self, inputs):
            return inputs + self.output_dropout(self.projection(inputs))

    keras_adapters.register_block(TinyBlock, feedforward="output_dropout")
    inputs = keras.Input((3, 8))
    model = keras.Model(inputs, TinyBlock(name="block")(inputs))
    keras_adapters.add_adapters(model, placement="pfeiffer", bottleneck_size=2)

    assert keras_adapters.count_parameters(model).adapters == 2 * 8 * 2 + 8 + 2
    assert isinstance(model.get_layer("block").output_dropout, AdaptedSublayer)


def test_set_active_adapters():
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    base = model_outputs(model, inputs)
    for name, seed in (("first", 1), ("second", 2)):
        keras_adapters.add_adapters(
            model,
            name=name,
            bottleneck_size=BOTTLENECK_SIZE,
            up_bias_initializer=keras.initializers.RandomNormal(1.0, seed=seed),
        )
    both = model_outputs(model, inputs)

    keras_adapters.set_active_adapters(model, None)
    assert keras_adapters.active_adapters(model) == []
    np.testing.assert_array_equal(model_outputs(model, inputs), base)
    groups = keras_adapters.rewriting.weight_groups(model)
    assert "adapters" not in {groups.get(id(w)) for w in model.trainable_weights}

    keras_adapters.set_active_adapters(model, "second")
    assert keras_adapters.active_adapters(model) == ["second"]
    second = model_outputs(model, inputs)
    assert np.abs(second - base).max() > 1e-3
    assert np.abs(second - both).max() > 1e-3
    trainable = {weight.path for weight in model.trainable_weights}
    assert "transformer_layer_0/attention/second/down_kernel" in trainable
    assert "transformer_layer_0/attention/first/down_kernel" not in trainable

    keras_adapters.set_active_adapters(model, ["first", "second"])
    np.testing.assert_allclose(model_outputs(model, inputs), both, atol=1e-6)

    with pytest.raises(ValueError, match="Unknown adapter names"):
        keras_adapters.set_active_adapters(model, "third")


def test_add_after_set_active_runs_new_adapters():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="first", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(model, name="second", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.set_active_adapters(model, "second")
    keras_adapters.add_adapters(model, name="third", bottleneck_size=BOTTLENECK_SIZE)

    assert keras_adapters.active_adapters(model) == ["second", "third"]
    trainable = {weight.path for weight in model.trainable_weights}
    assert "transformer_layer_0/attention/third/down_kernel" in trainable
    assert "transformer_layer_0/attention/first/down_kernel" not in trainable


def test_remove_one_keeps_other_training():
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    keras_adapters.add_adapters(model, name="first", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(
        model,
        name="second",
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )
    keras_adapters.set_active_adapters(model, "second")
    second_only = model_outputs(model, inputs)
    keras_adapters.remove_adapters(model, "first")

    assert keras_adapters.adapter_names(model) == ["second"]
    assert keras_adapters.active_adapters(model) == ["second"]
    np.testing.assert_array_equal(model_outputs(model, inputs), second_only)
    paths = {weight.path for weight in model.weights}
    assert not any("/first/" in path for path in paths)
    trainable = {weight.path for weight in model.trainable_weights}
    assert "transformer_layer_0/attention/second/down_kernel" in trainable
    assert "token_embedding/embeddings" not in trainable
    state = keras_adapters.rewriting._get_state(model)
    assert list(state.settings) == ["second"]


def test_remove_active_adapter_leaves_none_active():
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    base = model_outputs(model, inputs)
    keras_adapters.add_adapters(
        model,
        name="first",
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )
    keras_adapters.add_adapters(model, name="second", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.set_active_adapters(model, "second")
    keras_adapters.remove_adapters(model, "second")

    assert keras_adapters.adapter_names(model) == ["first"]
    assert keras_adapters.active_adapters(model) == []
    np.testing.assert_array_equal(model_outputs(model, inputs), base)
    groups = keras_adapters.rewriting.weight_groups(model)
    assert "adapters" not in {groups.get(id(w)) for w in model.trainable_weights}


def test_remove_last_restores_trainable_flags():
    model = make_classifier("bert")
    model.get_layer("logits").trainable = False
    before = [weight.trainable for weight in model.weights]
    keras_adapters.add_adapters(model, name="first", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(model, name="second", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.remove_adapters(model, "second")
    keras_adapters.remove_adapters(model, "first")

    assert [weight.trainable for weight in model.weights] == before
    assert keras_adapters.rewriting._get_state(model) is None
    assert type(model) is keras_hub.models.BertTextClassifier


def test_remove_unknown_name_raises():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)
    with pytest.raises(ValueError, match=r"no adapters named 'other'.*\['task'\]"):
        keras_adapters.remove_adapters(model, "other")
    assert keras_adapters.adapter_names(model) == ["task"]
