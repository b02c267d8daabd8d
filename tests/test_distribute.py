"""Adapter training under tf.distribute strategies.

Every test here runs TensorFlow in a child process, because MirroredStrategy
needs logical CPU devices configured before TensorFlow starts.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")

# Upper bound on how long one training process may run. The slowest measured
# run took about 25 seconds on 2 CPU cores shared with other jobs.
PROCESS_TIMEOUT = 80


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
