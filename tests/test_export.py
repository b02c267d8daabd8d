"""SavedModel export of adapted models, reloaded two ways."""

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from conftest import VOCABULARY_SIZE
from conftest import SEQUENCE_LENGTH
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs

import keras_adapters

# Float32 graphs reloaded from a SavedModel may fuse or reorder operations,
# so outputs are compared to within this absolute tolerance.
EXPORT_TOLERANCE = 1e-5


def _adapted_classifier():
    model = make_classifier("bert")
    for name, seed in (("first", 1), ("second", 2)):
        keras_adapters.add_adapters(
            model,
            name=name,
            bottleneck_size=4,
            up_bias_initializer=keras.initializers.RandomNormal(1.0, seed=seed),
        )
    keras_adapters.set_active_adapters(model, "second")
    return model


def _serving_inputs(inputs):
    # The exported signature takes every input, the padding mask too, as
    # int32, as keras-hub's BERT backbone declares them.
    return {key: tf.constant(value.astype("int32")) for key, value in inputs.items()}


def test_export_reloads_with_saved_model_load(tmp_path):
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    expected = model_outputs(model, inputs)
    path = keras_adapters.export_saved_model(model, tmp_path / "exported")
    reloaded = tf.saved_model.load(path)
    received = reloaded.serve(_serving_inputs(inputs)).numpy()

    base = model_outputs(make_classifier("bert"), inputs)
    assert np.abs(expected - base).max() > 1e-3
    np.testing.assert_allclose(received, expected, atol=EXPORT_TOLERANCE, rtol=0)


def test_export_reloads_with_tfsm_layer(tmp_path):
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    received = keras.ops.convert_to_numpy(layer(_serving_inputs(inputs)))

    np.testing.assert_allclose(
        received, model_outputs(model, inputs), atol=EXPORT_TOLERANCE, rtol=0
    )


def test_export_fixes_active_adapters(tmp_path):
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    path = keras_adapters.export_saved_model(model, tmp_path / "exported")
    exported = model_outputs(model, inputs)
    keras_adapters.set_active_adapters(model, "first")
    reloaded = tf.saved_model.load(path)

    received = reloaded.serve(_serving_inputs(inputs)).numpy()
    np.testing.assert_allclose(received, exported, atol=EXPORT_TOLERANCE, rtol=0)
    assert np.abs(received - model_outputs(model, inputs)).max() > 1e-3


def _tiny_preprocessor():
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"word{index}" for index in range(VOCABULARY_SIZE - len(special))]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=special + words)
    return keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )


def test_export_with_preprocessor_takes_strings(tmp_path):
    model = _adapted_classifier()
    preprocessor = _tiny_preprocessor()
    texts = tf.constant(["word1 word2 word3", "word7 unknown", "word40"])
    expected = keras.ops.convert_to_numpy(model(preprocessor(texts), training=False))
    path = keras_adapters.export_saved_model(
        model, tmp_path / "exported", preprocessor=preprocessor
    )
    reloaded = tf.saved_model.load(path)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")

    received = reloaded.serve(texts).numpy()
    np.testing.assert_allclose(received, expected, atol=EXPORT_TOLERANCE, rtol=0)
    received = keras.ops.convert_to_numpy(layer(texts))
    np.testing.assert_allclose(received, expected, atol=EXPORT_TOLERANCE, rtol=0)
