"""Adapter training under tf.distribute strategies, and recovery from failures.

Every test here runs TensorFlow in child processes: MirroredStrategy needs
logical CPU devices configured before TensorFlow starts, and
MultiWorkerMirroredStrategy needs one process per worker. The `processes`
fixture kills with SIGKILL every child that a test leaves running, also when
the test fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")

# Upper bound on how long one training process may run. Each took 8 to 25
# seconds on 2 CPU cores shared with other jobs.
PROCESS_TIMEOUT = 80

# How long a surviving worker may take to stop once its peer is gone. Measured
# on 2 CPU cores: 1 to 4 seconds after a SIGKILL, because the peer's sockets
# are reset at once, and 10 to 13 seconds after a SIGSTOP, because then only
# the coordination service's missing heartbeats reveal the frozen peer.
SURVIVOR_TIMEOUT = 45

# Steps of the multi-worker training run whose weights are compared.
TRAINING_STEPS = 5


class Processes:
    """Child processes started by one test, killed when the test ends."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started = []

    def start(self, command, name, env=None):
        """Start `command`, with stdout and stderr in files named after `name`.

        Each command starts a new process group, so that `kill_all` also
        stops the processes that the command starts itself.
        """
        stdout = open(self.tmp_path / f"{name}.out", "w")
        stderr = open(self.tmp_path / f"{name}.err", "w")
        process = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        process.name = name
        process.log_files = (stdout, stderr)
        self.started.append(process)
        return process

    def output(self, process):
        return (self.tmp_path / f"{process.name}.out").read_text()

    def errors(self, process):
        return (self.tmp_path / f"{process.name}.err").read_text()

    def wait_for_output(self, process, text, timeout):
        """Wait until `process` prints a line equal to `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output(process).splitlines():
                return
            if process.poll() is not None:
                pytest.fail(
                    f"{process.name} exited with {process.returncode} before "
                    f"printing {text!r}:\n{self.errors(process)[-3000:]}"
                )
            time.sleep(0.2)
        pytest.fail(f"{process.name} did not print {text!r} in {timeout} s.")

    def kill_all(self):
        for process in self.started:
            try:
                # The group's id is the id of the process that leads it.
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # The whole group has exited.
            process.wait()
            for file in process.log_files:
                file.close()


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.kill_all()


def free_loopback_ports(count):
    """Return `count` distinct TCP ports that are free on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_workers(processes, script_args, num_workers=2):
    """Start one multi_worker_training.py process per worker, on loopback."""
    addresses = [f"127.0.0.1:{port}" for port in free_loopback_ports(num_workers)]
    workers = []
    for index in range(num_workers):
        tf_config = {
            "cluster": {"worker": addresses},
            "task": {"type": "worker", "index": index},
        }
        output = processes.tmp_path / f"worker{index}.npz"
        command = [
            sys.executable,
            os.path.join(SCRIPTS, "multi_worker_training.py"),
            str(output),
            *script_args,
        ]
        worker = processes.start(
            command,
            f"worker{index}",
            env={"TF_CONFIG": json.dumps(tf_config)},
        )
        worker.weights_file = output
        workers.append(worker)
    return workers


@pytest.fixture(scope="module")
def scope_cases():
    """Run strategy_scope.py once and return its results by case."""
    script = os.path.join(SCRIPTS, "strategy_scope.py")
    result = subprocess.run(
        [sys.executable, script],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_strategy_scope_checks(scope_cases):
    cases = scope_cases
    # Adapted outside the scope, compiled inside it: compile raises.
    case = cases["adapted_outside_compiled_inside"]
    assert case["stage"] == "compile"
    assert case["error"] == "ValueError"
    assert "MirroredStrategy" in case["message"]
    assert "57 of 57 weights" in case["message"]
    assert "inside `with strategy.scope():`" in case["message"]

    # Model created inside the scope, adapters added outside it: compile
    # raises and names the adapter weights.
    case = cases["adapters_added_outside"]
    assert case["stage"] == "compile"
    assert case["error"] == "ValueError"
    assert case["message"].startswith("The model's adapter weights")
    assert "'transformer_layer_0/attention/adapter/down_kernel'" in case["message"]

    # Everything outside the scope, only fit or train_on_batch inside it.
    for name in ("fit_inside_only", "train_on_batch_inside_only"):
        assert cases[name]["stage"] == "fit", name
        assert cases[name]["error"] == "ValueError", name

    # The same mistake without adapters fails in the first step with the
    # AssertionError that the checks above replace. If Keras ever trains
    # such a model, the checks may be stricter than needed.
    case = cases["unadapted_compiled_inside"]
    assert case["stage"] == "fit"
    assert case["error"] == "AssertionError"


def test_adapters_added_in_scope_are_mirrored(scope_cases):
    case = scope_cases["created_inside"]

    assert case["error"] is None, case["message"]
    # 2 blocks x 2 placements x 4 weights (two kernels, two biases).
    assert case["num_adapter_weights"] == 16
    assert case["num_distributed"] == 16
    assert case["num_in_scope"] == 16
    assert case["replica_devices"] == [
        "/job:localhost/replica:0/task:0/device:CPU:0",
        "/job:localhost/replica:0/task:0/device:CPU:1",
    ]
    assert case["max_training_change"] > 1e-6


@pytest.fixture(scope="module")
def single_device_weights():
    """Train the workers' model on one device, on the same global batches."""
    sys.path.insert(0, SCRIPTS)
    try:
        import multi_worker_training
    finally:
        sys.path.remove(SCRIPTS)
    model = multi_worker_training.make_model()
    model.fit(
        multi_worker_training.make_dataset(),
        steps_per_epoch=TRAINING_STEPS,
        epochs=1,
        verbose=0,
    )
    return multi_worker_training.trainable_values(model)


def test_multi_worker_weights_agree(processes, single_device_weights):
    workers = start_workers(processes, [f"--steps={TRAINING_STEPS}"])
    for worker in workers:
        returncode = worker.wait(timeout=PROCESS_TIMEOUT)
        assert returncode == 0, processes.errors(worker)[-3000:]
    first, second = (np.load(worker.weights_file) for worker in workers)

    trained_keys = sorted(key for key in first if key.startswith("trained/"))
    assert trained_keys == sorted(k for k in second if k.startswith("trained/"))
    adapter_keys = [key for key in trained_keys if "/adapter/" in key]
    # 2 blocks x 2 placements x 4 weights (two kernels, two biases).
    assert len(adapter_keys) == 16
    for key in trained_keys:
        # Both workers apply the same all-reduced gradients to the same
        # initial values, so they agree bit for bit.
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    change = max(
        np.abs(first[key] - first[key.replace("trained/", "initial/", 1)]).max()
        for key in adapter_keys
    )
    assert change > 1e-5
    for key in trained_keys:
        # Two workers each reduce half the global batch, so the gradients
        # differ from one device's only by float32 summation order.
        path = key[len("trained/") :]
        np.testing.assert_allclose(
            first[key], single_device_weights[path], atol=1e-5, err_msg=key
        )


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_worker_stops_survivor(processes, victim):
    workers = start_workers(processes, ["--steps=100000", "--step-delay=0.2"])
    for worker in workers:
        processes.wait_for_output(worker, "step 3", timeout=PROCESS_TIMEOUT)
    survivor = workers[1 - victim]

    workers[victim].send_signal(signal.SIGKILL)
    start = time.monotonic()
    try:
        returncode = survivor.wait(timeout=SURVIVOR_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"The surviving worker still ran after {SURVIVOR_TIMEOUT} s.")
    seconds = time.monotonic() - start

    # An uncaught Python exception exits with 1, and a signal would give a
    # negative code.
    assert returncode == 1, processes.errors(survivor)[-3000:]
    assert "Collective ops is aborted" in processes.errors(survivor)
    print(f"survivor of worker {victim}'s SIGKILL stopped after {seconds:.1f} s")


def test_frozen_worker_stops_survivor(processes):
    workers = start_workers(processes, ["--steps=100000", "--step-delay=0.2"])
    for worker in workers:
        processes.wait_for_output(worker, "step 3", timeout=PROCESS_TIMEOUT)
    # Worker 0 hosts the coordination service. SIGSTOP freezes it with its
    # sockets open, like a hung machine, so only its missing heartbeats
    # reveal the failure.
    frozen, survivor = workers

    frozen.send_signal(signal.SIGSTOP)
    start = time.monotonic()
    try:
        returncode = survivor.wait(timeout=SURVIVOR_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"The surviving worker still ran after {SURVIVOR_TIMEOUT} s.")
    seconds = time.monotonic() - start

    assert returncode == 1, processes.errors(survivor)[-3000:]
    assert "Heartbeat" in processes.errors(survivor)
    print(f"survivor of worker 0's SIGSTOP stopped after {seconds:.1f} s")


def run_backup_script(processes, name, args):
    """Run backup_and_restore_training.py to its end and return the process."""
    output = processes.tmp_path / f"{name}.npz"
    command = [
        sys.executable,
        os.path.join(SCRIPTS, "backup_and_restore_training.py"),
        str(output),
        *args,
    ]
    process = processes.start(command, name)
    process.wait(timeout=PROCESS_TIMEOUT)
    process.weights_file = output
    return process


def progress_of(processes, process):
    """Return the JSON object that a finished run printed last."""
    assert process.returncode == 0, processes.errors(process)[-3000:]
    return json.loads(processes.output(process).strip().splitlines()[-1])


def max_difference(path, other_path):
    first, second = np.load(path), np.load(other_path)
    assert sorted(first) == sorted(second)
    return max(float(np.abs(first[key] - second[key]).max()) for key in first)


# The run is killed right after its 13th step: step 5 of epoch 1, with 8 steps
# per epoch and 3 epochs.
KILL_AT_STEP = 13


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    """Train without interruption and return the path of the weights file."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    output = folder / "weights.npz"
    command = [
        sys.executable,
        os.path.join(SCRIPTS, "backup_and_restore_training.py"),
        str(output),
        "--backup-dir",
        str(folder / "backup"),
    ]
    # subprocess.run kills the child if the timeout expires.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    progress = json.loads(result.stdout.strip().splitlines()[-1])
    assert progress == {"epochs_started": [0, 1, 2], "steps": 24}
    return output


def test_backup_restore_mid_epoch(processes, uninterrupted_weights):
    # NOTE: Keras 3.15's BackupAndRestore cannot resume mid-epoch. With an
    # integer save_freq it records the epoch and batch of each backup. On
    # restart it restores the weights and optimizer state, but it never reads
    # the batch and runs the interrupted epoch again from its first batch.
    # The steps of that epoch before the backup run twice.
    backup_dir = processes.tmp_path / "backup"
    args = ["--backup-dir", str(backup_dir), "--save-freq=3"]

    killed = run_backup_script(
        processes, "killed", [*args, f"--kill-at-step={KILL_AT_STEP}"]
    )
    assert killed.returncode == -signal.SIGKILL, processes.errors(killed)[-3000:]
    # Backups after steps 3, 6, 9 and 12: the last after 4 steps of epoch 1.
    metadata = json.loads((backup_dir / "training_metadata.json").read_text())
    assert metadata == {"epoch": 1, "batch": 3}

    resumed = run_backup_script(processes, "resumed", args)
    assert progress_of(processes, resumed) == {"epochs_started": [1, 2], "steps": 16}

    replay = run_backup_script(
        processes, "replay", ["--replay-epoch=1", "--replay-steps=4"]
    )
    assert progress_of(processes, replay)["steps"] == 28
    # Same steps from the same state on the same device: measured 0.0.
    assert max_difference(resumed.weights_file, replay.weights_file) <= 1e-6
    # The 4 repeated steps move the weights: measured 0.052.
    difference = max_difference(resumed.weights_file, uninterrupted_weights)
    assert difference > 1e-3


def test_backup_restore_epoch_end(processes, uninterrupted_weights):
    # With save_freq="epoch", the backup at the end of epoch 0 records that
    # epoch 1 comes next, so the resumed run computes exactly the steps that
    # the uninterrupted run computed after it.
    backup_dir = processes.tmp_path / "backup"
    args = ["--backup-dir", str(backup_dir), "--save-freq=epoch"]

    killed = run_backup_script(
        processes, "killed", [*args, f"--kill-at-step={KILL_AT_STEP}"]
    )
    assert killed.returncode == -signal.SIGKILL, processes.errors(killed)[-3000:]
    metadata = json.loads((backup_dir / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1

    resumed = run_backup_script(processes, "resumed", args)
    assert progress_of(processes, resumed) == {"epochs_started": [1, 2], "steps": 16}
    # Measured 0.0.
    difference = max_difference(resumed.weights_file, uninterrupted_weights)
    assert difference <= 1e-6


EXAMPLE = os.path.join(
    os.path.dirname(__file__), os.pardir, "examples", "multi_worker_training.py"
)


def save_tiny_preset(path):
    """Save a tiny BERT classifier preset, with a vocabulary of common words."""
    import keras
    import keras_hub

    words = "the a an and of to is it in that film movie good bad not this"
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words.split()]
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary),
        sequence_length=16,
    )
    classifier = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=preprocessor
    )
    classifier.save_to_preset(str(path))
    return path


def test_multi_worker_example_runs(processes):
    # The example on two local workers, with a tiny preset in place of
    # all-MiniLM-L6-v2 to keep the test short.
    preset = save_tiny_preset(processes.tmp_path / "preset")
    output_dir = processes.tmp_path / "output"
    command = [
        sys.executable,
        EXAMPLE,
        "--local-workers=2",
        f"--preset={preset}",
        "--max-train-examples=64",
        "--max-test-examples=32",
        "--batch-size=16",
        "--sequence-length=16",
        "--bottleneck-size=4",
        f"--data-dir={processes.tmp_path / 'tensorflow_datasets'}",
        f"--output-dir={output_dir}",
    ]
    launcher = processes.start(command, "launcher")
    returncode = launcher.wait(timeout=PROCESS_TIMEOUT)
    assert returncode == 0, processes.errors(launcher)[-3000:]

    summary = json.loads(processes.output(launcher).strip().splitlines()[-1])
    assert summary["num_replicas"] == 2
    assert summary["train_steps"] == 4
    assert summary["test_examples"] == 32
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert os.path.dirname(summary["adapter_file"]) == str(output_dir)

    # Worker 0's file loads into a fresh model built from the same preset.
    import keras_hub

    import keras_adapters

    fresh = keras_hub.models.BertTextClassifier.from_preset(
        str(preset), num_classes=2, preprocessor=None
    )
    keras_adapters.load_adapters(fresh, summary["adapter_file"])
    assert keras_adapters.adapter_names(fresh) == ["sentiment"]
