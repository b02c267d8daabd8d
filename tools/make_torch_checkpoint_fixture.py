"""Write a `torch.save` checkpoint with every tensor layout the reader handles.

`tests/test_torch_checkpoint.py` reads it without torch and compares with
the NumPy arrays that torch itself gives for the same tensors. Run it in an
environment with PyTorch:

    refenv/bin/python tools/make_torch_checkpoint_fixture.py
"""

import os

import numpy as np
import torch

OUTPUT = os.path.join(
    os.path.dirname(__file__),
    os.pardir,
    "tests",
    "fixtures",
    "torch_checkpoint",
)


def state_dict():
    grid = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        # Views share one storage, at an offset and with swapped strides.
        "transposed": grid.t(),
        "slice": grid[1:, 2:5],
        "float64": torch.linspace(-1, 1, 5, dtype=torch.float64),
        "float16": torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16),
        "bfloat16": torch.tensor([1.5, -2.25, 3.0e5], dtype=torch.bfloat16),
        "int64": torch.tensor([1, -2, 3]),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }


def main():
    tensors = state_dict()
    os.makedirs(OUTPUT, exist_ok=True)
    torch.save(tensors, os.path.join(OUTPUT, "tensors.bin"))
    expected = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # NumPy has no bfloat16.
        expected[key] = tensor.numpy()
    np.savez(os.path.join(OUTPUT, "expected.npz"), **expected)
    print(f"wrote {os.path.abspath(OUTPUT)} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
