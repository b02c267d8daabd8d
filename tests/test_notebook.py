"""Run the TPU notebook's code cells on the CPU."""

import json
import os
import subprocess
import sys

NOTEBOOK = os.path.join(
    os.path.dirname(__file__), os.pardir, "examples", "train_adapters_on_tpu.ipynb"
)


def _load_notebook():
    with open(NOTEBOOK, encoding="utf-8") as file:
        return json.load(file)


def _code_cells(notebook):
    return [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    ]


def test_outputs_cleared():
    for cell in _load_notebook()["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == []
            assert cell["execution_count"] is None


def test_code_cells_run_on_cpu(tmp_path):
    # Shell lines (the Colab installs) are skipped: this environment already
    # has the package and its offline data installed.
    lines = []
    for source in _code_cells(_load_notebook()):
        lines.extend(
            line for line in source.splitlines() if not line.lstrip().startswith("!")
        )
        lines.append("")
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(lines), encoding="utf-8")

    output_dir = tmp_path / "adapters"
    environment = dict(
        os.environ,
        KERAS_ADAPTERS_NOTEBOOK_STEPS="2",
        KERAS_ADAPTERS_NOTEBOOK_OUTPUT=str(output_dir),
        TFDS_DATA_DIR=str(tmp_path / "tensorflow_datasets"),
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "No TPU found" in result.stdout
    assert "Test accuracy:" in result.stdout
    assert (output_dir / "sentiment.adapters.safetensors").exists()
