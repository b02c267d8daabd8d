"""A fast run of examples/finetune_causal_lm.py with tiny settings."""

import json
import math
import os
import subprocess
import sys

EXAMPLE = os.path.join(
    os.path.dirname(__file__), os.pardir, "examples", "finetune_causal_lm.py"
)


def test_causal_lm_example_runs():
    command = [
        sys.executable,
        EXAMPLE,
        "--num-lines=128",
        "--sequence-length=16",
        "--hidden-dim=16",
        "--num-layers=1",
        "--pretrain-epochs=1",
        "--epochs=1",
        "--bottleneck-size=4",
        "--max-new-tokens=4",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert math.isfinite(summary["base_validation_perplexity"])
    assert math.isfinite(summary["adapted_validation_perplexity"])
    assert summary["trainable_parameters"] < summary["total_parameters"]
    assert isinstance(summary["reply_with_adapters"], str)
    assert isinstance(summary["reply_without_adapters"], str)
    assert summary["reload_max_logit_difference"] <= 1e-5
