"""Fast checks of the benchmark scripts' helpers, without the real checkpoint."""

import os
import subprocess
import sys
import time
import types

import pytest

import keras_adapters
from conftest import make_classifier

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import adapter_benchmark  # noqa: E402
import learning_rate_sweep  # noqa: E402
import report  # noqa: E402
import variants_benchmark  # noqa: E402


def test_lora_count_per_rank():
    model = make_classifier("bert")
    per_rank = adapter_benchmark.lora_parameters_per_rank(model.backbone)
    adapter_benchmark.enable_lora(model, 3)
    assert adapter_benchmark.count_lora_parameters(model) == 3 * per_rank


def test_lora_targets_query_and_value():
    model = make_classifier("bert")
    layers = adapter_benchmark.lora_layers(model.backbone)
    names = sorted({layer.name for layer in layers})
    assert names == ["query", "value"]
    # Two per block in the tiny two-block BERT.
    assert len(layers) == 4


def test_lora_trains_pooler():
    model = make_classifier("bert")
    adapter_benchmark.enable_lora(model, 2)
    trainable = {variable.path for variable in model.trainable_weights}
    assert "pooled_dense/kernel" in trainable
    assert "logits/kernel" in trainable


@pytest.mark.parametrize("script", [adapter_benchmark, variants_benchmark])
@pytest.mark.parametrize("option", ["--output", "--page"])
def test_missing_output_folder_stops_before_run(tmp_path, capsys, script, option):
    path = str(tmp_path / "missing" / "results")
    with pytest.raises(SystemExit):
        script.parse_args([option, path])
    assert f"the folder of {option} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--output", "--page"])
def test_folder_as_output_path_rejected(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        adapter_benchmark.parse_args([option, str(tmp_path)])
    assert f"{option} must be a file path, not a folder" in capsys.readouterr().err


def test_sweep_checks_output_folder(tmp_path, capsys):
    path = str(tmp_path / "missing" / "sweep.jsonl")
    with pytest.raises(SystemExit):
        learning_rate_sweep.main(
            ["--method", "houlsby", "--learning-rates", "1e-3", "--output", path]
        )
    assert "the folder of --output does not exist" in capsys.readouterr().err


def test_layer_norm_control_matches_houlsby():
    houlsby = make_classifier("bert")
    keras_adapters.add_adapters(houlsby, name=adapter_benchmark.ADAPTER_NAME)
    control = make_classifier("bert")
    adapter_benchmark.train_block_layer_norms(control)

    expected = {
        variable.path
        for variable in houlsby.trainable_weights
        if f"/{adapter_benchmark.ADAPTER_NAME}/" not in variable.path
    }
    trained = {variable.path for variable in control.trainable_weights}
    assert trained == expected
    assert any("layer_norm" in path for path in trained)
    assert not any("embeddings_layer_norm" in path for path in trained)


def test_inference_skips_layer_norm_control():
    args = adapter_benchmark.parse_args([])
    assert "layer_norms" in adapter_benchmark.training_methods(args)
    assert "layer_norms" not in adapter_benchmark.inference_methods(args)
    assert "head_only" in adapter_benchmark.inference_methods(args)


@pytest.mark.parametrize(
    "adapter_parameters, per_rank, expected",
    [
        (595_200, 55_680, 11),  # 612,480 is closer than 556,800.
        (100, 40, 2),  # 80 and 120 are equally close, so the lower rank wins.
        (10, 40, 1),  # Fewer than one rank's worth still gets rank 1.
        (400, 40, 10),
    ],
)
def test_match_lora_rank(adapter_parameters, per_rank, expected):
    assert adapter_benchmark.match_lora_rank(adapter_parameters, per_rank) == expected


def test_page_keeps_text_outside_block(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Title\n\nintro\n\n<!-- B -->\n\nold\n\n<!-- E -->\n\n## Findings\n")
    report.write_generated_block(str(page), "new", "<!-- B -->", "<!-- E -->", "# T")
    text = page.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- B -->\n\nnew\n\n<!-- E -->")
    assert text.endswith("## Findings\n")
    assert "old" not in text


def test_page_created_with_title(tmp_path):
    page = tmp_path / "NEW.md"
    report.write_generated_block(str(page), "new", "<!-- B -->", "<!-- E -->", "# T")
    assert page.read_text() == "# T\n\n<!-- B -->\n\nnew\n\n<!-- E -->\n"


def test_accuracy_verdict_within_allowance():
    assert report.compare_accuracy(-0.5, 1.0).startswith("met")


def test_accuracy_verdict_outside_allowance():
    assert report.compare_accuracy(-1.5, 1.0).startswith("missed by 0.50 points")


def test_gpu_note_without_gpu():
    machine = {"gpus": 0, "gpu_names": []}
    assert report.gpu_note(machine).startswith("GPU ratios were not measured")


def test_gpu_note_with_gpu():
    machine = {"gpus": 1, "gpu_names": ["NVIDIA H200"]}
    note = report.gpu_note(machine)
    assert "are GPU ratios, because TensorFlow placed the models on NVIDIA H200" in note


def test_quick_overridden_by_explicit_option():
    args = adapter_benchmark.parse_args(["--quick", "--rounds", "2"])
    assert args.rounds == 2
    assert args.steps == adapter_benchmark.QUICK_SETTINGS["steps"]
    assert not args.memory


def test_worker_gets_model_settings():
    args = adapter_benchmark.parse_args(
        ["--batch-size", "8", "--sequence-length", "16", "--bottleneck-size", "4"]
    )
    command = adapter_benchmark.worker_command(args, "--timing-worker")

    assert command[2] == "--timing-worker"
    settings = dict(zip(command[3::2], command[4::2]))
    assert settings == {
        "--batch-size": "8",
        "--sequence-length": "16",
        "--bottleneck-size": "4",
        "--skip-blocks": "3",
    }


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True)])
def test_onednn_state_follows_environment(value, expected):
    # TensorFlow reads the variable when it loads, so each case needs a
    # process of its own.
    code = "import report; print(report.onednn_enabled())"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=value, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(adapter_benchmark.__file__),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )

    assert completed.stdout.strip().splitlines()[-1] == str(expected)


def timing_summary(ratio):
    return {
        "median_seconds": ratio,
        "ratio_median": ratio,
        "ratio_min": ratio,
        "ratio_max": ratio,
    }


def test_targets_table_has_onednn_rows():
    training = {"full": timing_summary(1.0), "houlsby": timing_summary(0.68)}
    inference = {"full": timing_summary(1.0), "houlsby": timing_summary(1.05)}
    results = {
        "training": training,
        "inference": inference,
        "onednn_comparison": {
            "onednn": True,
            "training": {**training, "houlsby": timing_summary(0.72)},
            "inference": inference,
        },
    }

    table = adapter_benchmark.targets_table(results)

    lines = table.splitlines()
    row = next(line for line in lines if "full fine-tuning, oneDNN on" in line)
    assert "| 0.720 (0.720–0.720) | missed by 0.020" in row
    assert "inference, Houlsby adapters / base model, oneDNN on" in table


def test_matmul_estimate_of_adapter_methods():
    backbone = types.SimpleNamespace(hidden_dim=8, intermediate_dim=32, num_layers=4)

    estimates = adapter_benchmark.estimate_matmul_ratios(
        backbone, sequence_length=4, bottleneck_size=2, skip_blocks=0
    )
    fewer_adapters = adapter_benchmark.estimate_matmul_ratios(
        backbone, sequence_length=4, bottleneck_size=2, skip_blocks=2
    )

    # Per token: projections 4·8·8 + 2·8·32 = 768, attention 2·4·8 = 64,
    # one adapter 2·8·2 = 32. The backward pass skips the lowest block's
    # attention branch: 3 blocks of 768 + 2·64 + 4·32, then 512 + 4·32.
    forward = 4 * (768 + 64 + 2 * 32)
    backward = 3 * (768 + 2 * 64 + 4 * 32) + 512 + 4 * 32
    expected = (forward + backward) / (4 * 3 * (768 + 64))
    assert estimates["houlsby"]["training"] == pytest.approx(expected)
    assert estimates["adapterdrop"] == estimates["houlsby"]
    assert fewer_adapters["adapterdrop"]["training"] < expected
    assert estimates["houlsby"]["inference"] == pytest.approx(
        (768 + 64 + 64) / (768 + 64)
    )
    # The layer-norm control: Houlsby's forward and backward pass without
    # the adapters' products.
    assert estimates["layer_norms"]["training"] == pytest.approx(
        (4 * (768 + 64) + 3 * (768 + 2 * 64) + 512) / (4 * 3 * (768 + 64))
    )


def _trace(op_events):
    """Return an XSpace with one event per `(name, picoseconds)` pair."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add()
    line = plane.lines.add()
    for index, (name, duration_ps) in enumerate(op_events, start=1):
        plane.event_metadata[index].name = name
        line.events.add(metadata_id=index, duration_ps=duration_ps)
    return space


def test_profile_counts_matmuls_of_every_kernel():
    model = types.SimpleNamespace(
        name="classifier", optimizer=types.SimpleNamespace(name="adam")
    )
    space = _trace(
        [
            ("classifier/block/query/MatMul:MatMul", 10),
            ("classifier/block/scores/MatMul:_MklBatchMatMulV2", 10),
            ("classifier/block/adapter/MatMul:_MklNativeFusedMatMul", 4),
            ("classifier/block/adapter/MatMul_1:_FusedMatMul", 4),
            ("classifier/block/adapter/Erfc:Erfc", 1),
            ("classifier/block/output/einsum/Einsum:_MklEinsum", 10),
            ("gradient_tape/classifier/block/query/MatMul:_MklMatMul", 10),
            ("gradient_tape/classifier/block/Mul:_MklMul", 2),
            ("adam/Sqrt:Sqrt", 1),
        ]
    )

    summary = adapter_benchmark.summarize_ops(space, model)

    assert summary["matmuls"] == {"forward": 5, "backward": 1}
    assert summary["adapter_op_seconds"] == pytest.approx({"matmul": 8e-12, "other": 1e-12})
    assert summary["op_seconds"]["optimizer"] == pytest.approx(1e-12)


def test_sweep_needs_lora_rank_for_lora(capsys):
    with pytest.raises(SystemExit):
        learning_rate_sweep.main(["--method", "lora", "--learning-rates", "1e-3"])

    assert "missing --lora-rank" in capsys.readouterr().err


def test_sweep_takes_several_learning_rates():
    args = learning_rate_sweep.build_parser().parse_args(
        ["--method", "houlsby", "--learning-rates", "1e-3", "3e-3"]
    )

    assert args.learning_rates == [1e-3, 3e-3]
    assert args.epochs == 3
    assert args.seeds == [0]
    assert args.bottleneck_size is None


def test_sweep_takes_several_seeds():
    args = learning_rate_sweep.build_parser().parse_args(
        ["--method", "full", "--learning-rates", "5e-5", "--seeds", "0", "1"]
    )

    assert args.seeds == [0, 1]


def test_accuracy_target_row_for_mean_of_seeds():
    seeds = {
        "full": [{"seed": 0, "accuracy": 0.85}, {"seed": 1, "accuracy": 0.86}],
        "houlsby": [{"seed": 0, "accuracy": 0.845}, {"seed": 1, "accuracy": 0.84}],
    }
    methods = {
        "full": {"accuracy": 0.85},
        "houlsby": {"accuracy": 0.845},
    }
    results = {
        "training": {},
        "inference": {},
        "accuracy": {"methods": methods, "seeds": seeds},
    }

    table = adapter_benchmark.targets_table(results)

    row = next(line for line in table.splitlines() if "mean of 2 seeds" in line)
    # Differences of -0.5 and -2.0 points average to -1.25.
    assert "| -1.25 points (-2.00 to -0.50) | missed by 0.25 points" in row


def spin(seconds):
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def test_cpu_time_counts_work_not_waiting():
    # Each "model" is the work of its step: one spins on the CPU, the other
    # sleeps for as long.
    models = {"spinning": spin, "sleeping": time.sleep}

    def step(work, batch):
        work(0.02)

    seconds, cpu_seconds = adapter_benchmark.time_rounds(
        models, step, batches=[None], steps=3, rounds=2
    )
    summary = adapter_benchmark.summarize_times(seconds, "spinning", cpu_seconds)

    assert summary["sleeping"]["ratio_median"] > 0.8
    assert summary["sleeping"]["cpu_ratio_median"] < 0.5
    assert summary["sleeping"]["cores_busy"] < 0.5
    assert summary["spinning"]["cpu_ratio_median"] == 1.0


def test_training_table_shows_cpu_time_ratio():
    timing = {
        name: {**timing_summary(ratio), "cores_busy": busy}
        for name, ratio, busy in (("full", 1.0, 1.9), ("houlsby", 0.7, 1.8))
    }
    for name, ratio in (("full", 1.0), ("houlsby", 0.65)):
        timing[name].update(
            {f"cpu_{key}": value for key, value in timing_summary(ratio).items()}
        )
    results = {"settings": {}, "parameters": {}}

    table = adapter_benchmark.training_table(results, timing, with_extras=False)

    assert "CPU time ratio" in table.splitlines()[0]
    row = next(line for line in table.splitlines() if "Houlsby" in line)
    assert "| 0.700 (0.700–0.700) | 0.650 (0.650–0.650) | 1.80 |" in row
