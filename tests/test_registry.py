import keras
import keras_hub
import numpy as np
import pytest

import keras_adapters
from keras_adapters import AdaptedSublayer
from keras_adapters import registry


class Block(keras.layers.Layer):
    """A residual block whose output dropout exists only when `dropout > 0`."""

    def __init__(self, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.projection = keras.layers.Dense(8)
        self.norm = ScaleNorm()
        self.extra = keras.layers.Dense(8)
        self.output_dropout = keras.layers.Dropout(dropout) if dropout else None

    def build(self, inputs_shape):
        self.projection.build(inputs_shape)
        self.norm.build(inputs_shape)
        self.extra.build(inputs_shape)

    def call(self, inputs):
        outputs = self.projection(self.norm(inputs))
        if self.output_dropout is not None:
            outputs = self.output_dropout(outputs)
        return inputs + outputs


class ScaleNorm(keras.layers.Layer):
    def build(self, inputs_shape):
        self.scale = self.add_weight(shape=(inputs_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


class UnregisteredBlock(Block):
    pass


def _model(block_class, **kwargs):
    inputs = keras.Input((3, 8))
    return keras.Model(inputs, block_class(name="block", **kwargs)(inputs))


@pytest.fixture(autouse=True)
def _restore_registry():
    blocks = dict(registry._REGISTRY)
    norms = list(registry._LAYER_NORM_CLASSES)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(blocks)
    registry._LAYER_NORM_CLASSES[:] = norms


def test_unregistered_block_error_names_class():
    model = _model(UnregisteredBlock)

    with pytest.raises(ValueError) as error:
        keras_adapters.add_adapters(model, bottleneck_size=2)

    assert "UnregisteredBlock" in str(error.value)
    assert "keras_adapters.register_block(" in str(error.value)


@pytest.mark.parametrize("dropout, sublayer", [(0.1, "Dropout"), (0.0, "Dense")])
def test_first_existing_candidate_is_used(dropout, sublayer):
    keras_adapters.register_block(
        Block, feedforward=["output_dropout", "projection"]
    )
    model = _model(Block, dropout=dropout)

    keras_adapters.add_adapters(model, placement="pfeiffer", bottleneck_size=2)

    block = model.get_layer("block")
    wrappers = [
        layer
        for layer in (block.output_dropout, block.projection)
        if isinstance(layer, AdaptedSublayer)
    ]
    assert len(wrappers) == 1
    assert type(wrappers[0].sublayer).__name__ == sublayer


def test_missing_placement_raises():
    keras_adapters.register_block(Block, feedforward="projection")
    model = _model(Block)

    with pytest.raises(ValueError, match="no 'attention' insertion point"):
        keras_adapters.add_adapters(model, bottleneck_size=2)


def test_cross_attention_without_decoder_raises():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )

    with pytest.raises(ValueError, match="'cross_attention' insertion point"):
        keras_adapters.add_adapters(
            backbone, placement=["cross_attention"], bottleneck_size=2
        )
    assert keras_adapters.adapter_names(backbone) == []


def test_registered_layer_norm_trains():
    keras_adapters.register_block(Block, feedforward="projection")
    model = _model(Block)
    keras_adapters.add_adapters(model, placement="pfeiffer", bottleneck_size=2)
    scale = model.get_layer("block").norm.scale
    assert not scale.trainable

    keras_adapters.register_layer_norm(ScaleNorm)
    keras_adapters.rewriting.update_trainable(model)

    assert scale.trainable


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one"),
        ({"attention": ["a", ""]}, "attention="),
        ({"feedforward": 3}, "feedforward="),
        ({"attention": "a", "prepare": "not callable"}, "prepare="),
    ],
)
def test_invalid_registration(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        keras_adapters.register_block(Block, **kwargs)


def test_invalid_layer_norm_class():
    with pytest.raises(ValueError, match="layer_class="):
        keras_adapters.register_layer_norm(np.ndarray)


def _tiny_gemma(dropout):
    keras.utils.set_random_seed(0)
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        dropout=dropout,
    )


@pytest.mark.parametrize("dropout, sublayer", [(0.1, "Dropout"), (0, "CachedGemmaAttention")])
def test_gemma_attention_adapter_before_residual(dropout, sublayer):
    # With dropout the adapter follows the dropout; without one, it follows
    # the attention layer. Either way it runs before the residual add.
    backbone = _tiny_gemma(dropout)
    keras_adapters.add_adapters(backbone, bottleneck_size=2)

    block = backbone.get_layer("decoder_block_0")
    wrapper = block.attention_dropout if dropout else block.attention
    assert isinstance(wrapper, AdaptedSublayer)
    assert type(wrapper.sublayer).__name__ == sublayer
    assert isinstance(block.ffw_linear, AdaptedSublayer)
