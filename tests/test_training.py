"""Adapter training under mixed precision, XLA and MirroredStrategy."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import fit_briefly
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs
from safetensors import safe_open

import keras_adapters


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy("float32")


def test_mixed_float16_training(mixed_float16, tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=4)
    fit_briefly(model, make_inputs("bert"), learning_rate=1e-2)

    # Keras wraps the optimizer in a LossScaleOptimizer under mixed_float16.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    for weight in model.trainable_weights:
        assert weight.dtype == "float32"
        assert np.isfinite(keras.ops.convert_to_numpy(weight)).all(), weight.path

    path = keras_adapters.save_adapters(model, tmp_path / "mixed.safetensors")
    with safe_open(path, framework="np") as file:
        dtypes = {file.get_tensor(key).dtype for key in file.keys()}
    assert dtypes == {np.dtype("float32")}


def test_float16_file_loads_into_float32(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        trained = make_classifier("bert")
        keras_adapters.add_adapters(trained, bottleneck_size=4)
        fit_briefly(trained, make_inputs("bert"), learning_rate=1e-2)
    finally:
        keras.config.set_dtype_policy("float32")
    path = keras_adapters.save_adapters(trained, tmp_path / "mixed.safetensors")
    model = make_classifier("bert")
    keras_adapters.load_adapters(model, path)

    inputs = make_inputs("bert")
    # float16 compute in the trained model against float32 in the loaded
    # one, so only float16 rounding separates them.
    np.testing.assert_allclose(
        model_outputs(model, inputs), model_outputs(trained, inputs), atol=2e-2
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("config", ["houlsby", "parallel"])
def test_mixed_policy_model_dtypes(policy, config, tmp_path):
    keras.config.set_dtype_policy(policy)
    try:
        model = make_classifier("bert")
        keras_adapters.add_adapters(model, config=config, bottleneck_size=4)
        wrapper = next(
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, keras_adapters.AdaptedSublayer)
        )
        hidden = keras.ops.ones((2, 8, 16), dtype=policy.split("_")[1])
        if wrapper.branch_input is not None:
            # A parallel adapter reads the branch input that its block
            # records, so record one for this direct call.
            wrapper.branch_input.record(hidden)
        outputs = wrapper(hidden)
        fit_briefly(model, make_inputs("bert"), epochs=1, learning_rate=1e-3)
    finally:
        keras.config.set_dtype_policy("float32")
    path = keras_adapters.save_adapters(model, tmp_path / "mixed.safetensors")

    assert keras.backend.standardize_dtype(outputs.dtype) == policy.split("_")[1]
    for _, adapter in keras_adapters.rewriting.iter_adapters(model):
        for weight in adapter.weights:
            assert weight.dtype == "float32", weight.path
    with safe_open(path, framework="np") as file:
        dtypes = {file.get_tensor(key).dtype for key in file.keys()}
    assert dtypes == {np.dtype("float32")}
    # A file written under a mixed policy loads into a float32 model.
    keras_adapters.load_adapters(make_classifier("bert"), path)


def test_fit_with_jit_compile():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=4)
    inputs = make_inputs("bert")
    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    # Keras turns XLA off on CPU-only machines unless asked, so check that
    # it was kept.
    assert model.jit_compile
    model.fit(inputs, np.array([0, 1, 0, 1]), epochs=2, verbose=0)

    changed = [
        w.path
        for w in model.trainable_weights
        if not np.array_equal(keras.ops.convert_to_numpy(w), before[w.path])
    ]
    assert any("/attention/adapter/" in path for path in changed)


def test_mirrored_strategy_matches_one_device():
    script = os.path.join(os.path.dirname(__file__), "scripts", "mirrored_training.py")
    result = subprocess.run(
        [sys.executable, script],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    assert summary["same_paths"]
    assert summary["num_weights"] > 0
    assert summary["max_training_change"] > 1e-3
    # Two replicas each reduce half the global batch, so the gradients
    # differ from one device's only by float32 summation order.
    assert summary["max_difference"] < 1e-5
