"""Whole-model saving of adapted models: `.keras` files and weight files."""

import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
from conftest import fit_briefly
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs

import keras_adapters

BOTTLENECK_SIZE = 4


def _add_two_adapters(model):
    """Add adapters "first" and "second" to `model`, with only "second" active.

    The up-projection biases are large, so each adapter moves the outputs
    visibly without the cost of training.
    """
    for name, placement, size, seed in (
        ("first", "houlsby", BOTTLENECK_SIZE, 1),
        ("second", "pfeiffer", 2 * BOTTLENECK_SIZE, 2),
    ):
        keras_adapters.add_adapters(
            model,
            name=name,
            placement=placement,
            bottleneck_size=size,
            train_layer_norms=False,
            up_bias_initializer=keras.initializers.RandomNormal(1.0, seed=seed),
        )
    keras_adapters.set_active_adapters(model, "second")
    return model


def _adapted_classifier(family="bert", seed=0):
    return _add_two_adapters(make_classifier(family, seed=seed))


def _trainable_paths(model):
    return sorted(weight.path for weight in model.trainable_weights)


def test_keras_file_round_trip(family, tmp_path):
    model = _adapted_classifier(family)
    inputs = make_inputs(family)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    base = model_outputs(make_classifier(family), inputs)
    assert np.abs(model_outputs(model, inputs) - base).max() > 1e-4
    np.testing.assert_array_equal(
        model_outputs(loaded, inputs), model_outputs(model, inputs)
    )
    assert type(loaded).__name__ == type(model).__name__
    assert keras_adapters.adapter_names(loaded) == ["first", "second"]
    assert keras_adapters.active_adapters(loaded) == ["second"]
    assert _trainable_paths(loaded) == _trainable_paths(model)


def test_keras_file_keeps_inactive_adapters(tmp_path):
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    for names in (["first"], ["first", "second"], None):
        keras_adapters.set_active_adapters(model, names)
        keras_adapters.set_active_adapters(loaded, names)
        np.testing.assert_array_equal(
            model_outputs(loaded, inputs), model_outputs(model, inputs)
        )


def test_keras_file_loaded_model_trains_on(tmp_path):
    model = _adapted_classifier()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in loaded.weights}
    fit_briefly(loaded, make_inputs("bert"), epochs=1)

    trainable = set(_trainable_paths(loaded))
    for weight in loaded.weights:
        changed = not np.array_equal(
            keras.ops.convert_to_numpy(weight), before[weight.path]
        )
        assert changed == (weight.path in trainable), weight.path
    assert "transformer_layer_0/feedforward/second/up_kernel" in trainable


def test_keras_file_loads_in_fresh_process(tmp_path):
    # A new interpreter has only imported keras_adapters: no custom_objects
    # and none of the classes made while saving.
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = f"""
import keras, numpy as np
import keras_adapters
model = keras.models.load_model({path!r})
inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
np.save({str(tmp_path / "outputs.npy")!r}, model(inputs, training=False))
print(keras_adapters.adapter_names(model), keras_adapters.active_adapters(model))
"""
    environment = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['first', 'second'] ['second']"
    np.testing.assert_array_equal(
        np.load(tmp_path / "outputs.npy"), model_outputs(model, inputs)
    )


def test_keras_file_of_backbone(tmp_path):
    backbone = make_classifier("bert").backbone
    keras_adapters.add_adapters(
        backbone,
        name="task",
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=keras.initializers.RandomNormal(1.0, seed=1),
    )
    inputs = make_inputs("bert")
    path = str(tmp_path / "backbone.keras")
    backbone.save(path)
    loaded = keras.models.load_model(path)

    np.testing.assert_array_equal(
        model_outputs(loaded, inputs), model_outputs(backbone, inputs)
    )
    assert isinstance(loaded, keras_hub.models.BertBackbone)
    assert _trainable_paths(loaded) == _trainable_paths(backbone)


def test_keras_file_after_removing_all_adapters(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.remove_adapters(model, "task")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded) is keras_hub.models.BertTextClassifier
    assert keras_adapters.rewriting._get_state(loaded) is None


def test_weights_file_round_trip(tmp_path):
    model = _adapted_classifier()
    inputs = make_inputs("bert")
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)

    # Another seed gives other base weights and other adapter weights.
    target = _adapted_classifier(seed=1)
    assert np.abs(model_outputs(target, inputs) - model_outputs(model, inputs)).max() > 1e-3
    target.load_weights(path)

    np.testing.assert_array_equal(
        model_outputs(target, inputs), model_outputs(model, inputs)
    )
    keras_adapters.set_active_adapters(model, "first")
    keras_adapters.set_active_adapters(target, "first")
    np.testing.assert_array_equal(
        model_outputs(target, inputs), model_outputs(model, inputs)
    )
