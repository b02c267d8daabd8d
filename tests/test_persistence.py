import json
import os
import signal
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
from conftest import fit_briefly
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs
from safetensors import safe_open
from safetensors.numpy import save_file

import keras_adapters
from keras_adapters.persistence import METADATA_KEY

BOTTLENECK_SIZE = 4


def _trained_classifier(family="bert", seed=0, name="task"):
    model = make_classifier(family, seed=seed)
    keras_adapters.add_adapters(model, name=name, bottleneck_size=BOTTLENECK_SIZE)
    fit_briefly(model, make_inputs(family))
    return model


def _values(model):
    return [keras.ops.convert_to_numpy(weight).copy() for weight in model.weights]


def _assert_unchanged(model, values):
    for weight, value in zip(model.weights, values):
        assert np.array_equal(keras.ops.convert_to_numpy(weight), value), weight.path


def test_round_trip_into_fresh_model(family, tmp_path):
    trained = _trained_classifier(family)
    inputs = make_inputs(family)
    expected = model_outputs(trained, inputs)
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")

    # A fresh model with the same seed stands for the same preset. It
    # differs from the trained model only in what training changed.
    fresh = make_classifier(family, seed=0)
    assert np.abs(model_outputs(fresh, inputs) - expected).max() > 1e-4
    name = keras_adapters.load_adapters(fresh, path)

    assert name == "task"
    np.testing.assert_allclose(model_outputs(fresh, inputs), expected, atol=1e-6)
    assert keras_adapters.count_parameters(fresh) == keras_adapters.count_parameters(
        trained
    )


def test_file_holds_trained_weights_and_layer_norms(tmp_path):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")

    with safe_open(path, framework="np") as file:
        keys = set(file.keys())
    trainable_size = keras_adapters.count_parameters(trained).trainable
    # The file contains every layer norm of the backbone, so that it does not
    # depend on which adapters were active. The embeddings' layer norm is
    # the only frozen one.
    embeddings_norm = trained.backbone.get_layer("embeddings_layer_norm")
    frozen_size = sum(int(np.prod(w.shape)) for w in embeddings_norm.weights)
    saved_size = 0
    with safe_open(path, framework="np") as file:
        for key in keys:
            saved_size += file.get_tensor(key).size
    assert saved_size == trainable_size + frozen_size
    assert "layer_norms/backbone/embeddings_layer_norm/gamma" in keys
    assert "adapters/backbone/transformer_layer_0/attention/down_kernel" in keys
    assert "layer_norms/backbone/transformer_layer_1/feedforward_layer_norm/gamma" in keys
    assert "head/backbone/pooled_dense/kernel" in keys
    assert "head/logits/kernel" in keys
    assert not any("token_embedding" in key for key in keys)


def test_file_without_head_and_layer_norms(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        train_layer_norms=False,
        train_head=False,
    )
    path = keras_adapters.save_adapters(model, tmp_path / "a.safetensors")

    with safe_open(path, framework="np") as file:
        keys = list(file.keys())
    assert len(keys) == 2 * 2 * 4
    assert all(key.startswith("adapters/") for key in keys)


def test_file_size_close_to_raw_bytes(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    path = keras_adapters.save_adapters(model, tmp_path / "a.safetensors")

    raw_bytes = 4 * keras_adapters.count_parameters(model).trainable
    # The JSON header is a fixed cost of a few KiB, large only next to the
    # weights of a tiny model.
    assert raw_bytes <= os.path.getsize(path) <= raw_bytes + 8192


def test_config_records_settings(tmp_path):
    model = make_classifier("roberta")
    keras_adapters.add_adapters(
        model,
        name="sst",
        placement="pfeiffer",
        bottleneck_size=BOTTLENECK_SIZE,
        activation="relu",
        train_layer_norms=False,
    )
    path = keras_adapters.save_adapters(model, tmp_path / "sst.safetensors")
    config = keras_adapters.read_adapter_config(path)

    assert config["format_version"] == 1
    assert config["adapter_name"] == "sst"
    assert config["placements"] == ["feedforward"]
    assert config["adapter"]["bottleneck_size"] == BOTTLENECK_SIZE
    assert config["adapter"]["activation"] == "relu"
    assert config["trained"] == {"adapters": True, "layer_norms": False, "head": True}
    assert config["base_model"] == {
        "backbone_class": "RobertaBackbone",
        "task_class": "RobertaTextClassifier",
        "block_class": "TransformerEncoder",
        "hidden_size": 16,
        "num_blocks": 2,
        "preset": None,
    }


def test_config_records_preset(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    path = keras_adapters.save_adapters(
        model, tmp_path / "a.safetensors", preset="bert_tiny_en_uncased"
    )
    config = keras_adapters.read_adapter_config(path)

    assert config["base_model"]["preset"] == "bert_tiny_en_uncased"
    assert config["keras_adapters_version"] == keras_adapters.__version__


def test_load_rebuilds_settings(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(
        model,
        name="sst",
        placement="pfeiffer",
        bottleneck_size=BOTTLENECK_SIZE,
        train_layer_norms=False,
    )
    path = keras_adapters.save_adapters(model, tmp_path / "sst.safetensors")
    fresh = make_classifier("bert")
    keras_adapters.load_adapters(fresh, path)

    keys = [key for key, adapter in keras_adapters.rewriting.iter_adapters(fresh)]
    assert keys == [
        "backbone/transformer_layer_0/feedforward",
        "backbone/transformer_layer_1/feedforward",
    ]
    trainable = {weight.path for weight in fresh.trainable_weights}
    assert "transformer_layer_0/self_attention_layer_norm/gamma" not in trainable


def test_load_under_new_name(tmp_path):
    trained = _trained_classifier(name="first")
    path = keras_adapters.save_adapters(trained, tmp_path / "first.safetensors")
    fresh = make_classifier("bert")

    assert keras_adapters.load_adapters(fresh, path, name="renamed") == "renamed"
    assert keras_adapters.adapter_names(fresh) == ["renamed"]


def test_load_into_model_with_same_adapters(tmp_path):
    trained = _trained_classifier()
    inputs = make_inputs("bert")
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    target = make_classifier("bert")
    keras_adapters.add_adapters(target, name="task", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.load_adapters(target, path)

    np.testing.assert_allclose(
        model_outputs(target, inputs), model_outputs(trained, inputs), atol=1e-6
    )


def test_save_needs_name_with_several_adapters(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="a", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(model, name="b", bottleneck_size=BOTTLENECK_SIZE)

    with pytest.raises(ValueError, match="Pass `name`"):
        keras_adapters.save_adapters(model, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no adapters named 'c'"):
        keras_adapters.save_adapters(model, tmp_path / "x.safetensors", name="c")
    path = keras_adapters.save_adapters(model, tmp_path / "b.safetensors", name="b")
    assert keras_adapters.read_adapter_config(path)["adapter_name"] == "b"


def test_missing_file():
    model = make_classifier("bert")
    with pytest.raises(FileNotFoundError, match="no_such.safetensors"):
        keras_adapters.load_adapters(model, "no_such.safetensors")


def test_truncated_file_leaves_model_unchanged(tmp_path):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    model = make_classifier("bert")
    values = _values(model)

    with pytest.raises(ValueError, match="truncated or corrupted"):
        keras_adapters.load_adapters(model, truncated)
    assert keras_adapters.adapter_names(model) == []
    _assert_unchanged(model, values)


def test_keras_weights_file_rejected(tmp_path):
    model = make_classifier("bert")
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)

    with pytest.raises(ValueError, match="HDF5 file.*model.load_weights"):
        keras_adapters.load_adapters(model, path)


def test_plain_safetensors_file_rejected(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_file({"weight": np.zeros((2, 2), "float32")}, path)
    model = make_classifier("bert")

    with pytest.raises(ValueError, match="not a keras_adapters adapter file"):
        keras_adapters.load_adapters(model, path)


def test_unknown_format_version(tmp_path):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    with safe_open(path, framework="np") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        config = json.loads(file.metadata()[METADATA_KEY])
    config["format_version"] = 99
    future = str(tmp_path / "future.safetensors")
    save_file(tensors, future, metadata={METADATA_KEY: json.dumps(config)})

    with pytest.raises(ValueError, match="format_version=99"):
        keras_adapters.load_adapters(make_classifier("bert"), future)


def test_other_architecture_rejected(tmp_path):
    trained = _trained_classifier("bert")
    path = keras_adapters.save_adapters(trained, tmp_path / "bert.safetensors")
    model = make_classifier("roberta")
    values = _values(model)

    with pytest.raises(ValueError, match="backbone_class='BertBackbone'"):
        keras_adapters.load_adapters(model, path)
    _assert_unchanged(model, values)
    assert keras_adapters.adapter_names(model) == []


def test_wrong_shape_leaves_model_unchanged(tmp_path):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=2)
    values = _values(model)

    with pytest.raises(ValueError, match="shape mismatch"):
        keras_adapters.load_adapters(model, path)
    _assert_unchanged(model, values)


def test_head_shape_mismatch_removes_new_adapters(tmp_path):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    model = make_classifier("bert", num_classes=3)
    values = _values(model)

    with pytest.raises(ValueError, match="head/logits/kernel"):
        keras_adapters.load_adapters(model, path)
    assert keras_adapters.adapter_names(model) == []
    _assert_unchanged(model, values)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    trained = _trained_classifier()
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    good = open(path, "rb").read()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        keras_adapters.save_adapters(trained, path)

    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["task.safetensors"]


def test_save_into_missing_folder(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keras_adapters.save_adapters(model, tmp_path / "missing" / "a.safetensors")


def test_killed_save_keeps_previous_file(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "interrupted_save.py")
    path = str(tmp_path / "task.safetensors")
    process = subprocess.Popen(
        [sys.executable, script, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "saved"
        good = open(path, "rb").read()
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == -signal.SIGKILL
    assert open(path, "rb").read() == good
    config = keras_adapters.read_adapter_config(path)
    assert config["adapter_name"] == "adapter"


def _bert_classifier(**overrides):
    """Return a tiny BERT classifier with some backbone arguments changed."""
    arguments = dict(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    arguments.update(overrides)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(**arguments)
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_dim": 8}, "hidden_size=16, but .* has hidden_size=8"),
        ({"num_layers": 3}, "num_blocks=2, but .* has num_blocks=3"),
    ],
)
def test_other_size_rejected(overrides, message, tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)
    path = keras_adapters.save_adapters(model, tmp_path / "task.safetensors")
    target = _bert_classifier(**overrides)
    values = _values(target)

    with pytest.raises(ValueError, match=message):
        keras_adapters.load_adapters(target, path)
    assert keras_adapters.adapter_names(target) == []
    _assert_unchanged(target, values)


def test_other_placement_rejected(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)
    path = keras_adapters.save_adapters(model, tmp_path / "task.safetensors")
    target = make_classifier("bert", seed=1)
    keras_adapters.add_adapters(
        target, name="task", placement="pfeiffer", bottleneck_size=BOTTLENECK_SIZE
    )
    values = _values(target)

    with pytest.raises(
        ValueError, match="not in the model: adapters/backbone/transformer_layer_0/attention"
    ):
        keras_adapters.load_adapters(target, path)
    _assert_unchanged(target, values)


def test_corrupted_header_rejected(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    path = keras_adapters.save_adapters(model, tmp_path / "a.safetensors")
    data = bytearray(open(path, "rb").read())
    # Bytes 8 onwards are the JSON header that locates every tensor.
    data[8:40] = b"\xff" * 32
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(bytes(data))
    target = make_classifier("bert")
    values = _values(target)

    with pytest.raises(ValueError, match="truncated or corrupted"):
        keras_adapters.load_adapters(target, corrupted)
    assert keras_adapters.adapter_names(target) == []
    _assert_unchanged(target, values)


def test_keras_hub_lora_file_rejected(tmp_path):
    lora_model = make_classifier("bert")
    lora_model.backbone.enable_lora(rank=2)
    path = str(tmp_path / "task.lora.h5")
    lora_model.backbone.save_lora_weights(path)
    model = make_classifier("bert")
    values = _values(model)

    with pytest.raises(ValueError, match="HDF5 file.*load_lora_weights"):
        keras_adapters.load_adapters(model, path)
    assert keras_adapters.adapter_names(model) == []
    _assert_unchanged(model, values)


def test_load_under_taken_name_with_other_shape(tmp_path):
    trained = _trained_classifier(name="task")
    path = keras_adapters.save_adapters(trained, tmp_path / "task.safetensors")
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="other", bottleneck_size=2)
    values = _values(model)

    with pytest.raises(ValueError, match="shape mismatch"):
        keras_adapters.load_adapters(model, path, name="other")
    assert keras_adapters.adapter_names(model) == ["other"]
    _assert_unchanged(model, values)


def test_unknown_name_rejected(tmp_path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="task", bottleneck_size=BOTTLENECK_SIZE)

    with pytest.raises(ValueError, match=r"no adapters named 'other'.*\['task'\]"):
        keras_adapters.save_adapters(model, tmp_path / "x.safetensors", name="other")
    assert not os.path.exists(tmp_path / "x.safetensors")
