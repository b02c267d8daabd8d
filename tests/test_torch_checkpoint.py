"""Tests of the torch-free reader of `torch.save` checkpoints."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from keras_adapters.torch_checkpoint import read_torch_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TENSORS = os.path.join(FIXTURES, "torch_checkpoint", "tensors.bin")
EXPECTED = os.path.join(FIXTURES, "torch_checkpoint", "expected.npz")


def _write_checkpoint(path, size, stride, numel=4, storage_bytes=None):
    """Write a one-tensor checkpoint as `torch.save` lays it out.

    The pickle is written opcode by opcode, so torch is not needed. It is
    `{"w": _rebuild_tensor_v2(storage 0, 0, size, stride, False,
    OrderedDict())}`, where storage 0 is a FloatStorage of `numel` elements.
    torch 2.13 reads the valid case with `torch.load(path, weights_only=True)`.
    """

    def tuple_of(values):
        return b"(" + b"".join(b"K" + bytes([value]) for value in values) + b"t"

    storage_id = (
        b"(X\x07\x00\x00\x00storage"
        b"ctorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpu"
        b"K" + bytes([numel]) + b"tQ"
    )
    pickled = (
        b"\x80\x02}X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"("
        + storage_id
        + b"K\x00"
        + tuple_of(size)
        + tuple_of(stride)
        + b"\x89ccollections\nOrderedDict\n)Rt"
        b"Rs."
    )
    if storage_bytes is None:
        storage_bytes = np.arange(numel, dtype="<f4").tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", storage_bytes)
        archive.writestr("archive/version", "3\n")


def test_reader_every_layout():
    tensors = read_torch_checkpoint(TENSORS)
    expected = np.load(EXPECTED)

    assert sorted(tensors) == sorted(expected.files)
    for key in expected.files:
        assert tensors[key].dtype == expected[key].dtype, key
        assert tensors[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(tensors[key], expected[key], err_msg=key)


def test_reader_handwritten_checkpoint(tmp_path):
    path = tmp_path / "small.bin"
    _write_checkpoint(path, size=(2, 2), stride=(1, 2))

    tensors = read_torch_checkpoint(path)

    np.testing.assert_array_equal(tensors["w"], [[0.0, 2.0], [1.0, 3.0]])


def test_reader_without_torch():
    # torch is blocked in a fresh interpreter: `import torch` raises there.
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from keras_adapters.torch_checkpoint import read_torch_checkpoint\n"
        f"tensors = read_torch_checkpoint({TENSORS!r})\n"
        "assert sys.modules['torch'] is None\n"
        "print(len(tensors))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": root}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "11"


def test_reader_rejects_other_globals(tmp_path):
    import collections

    path = tmp_path / "counter.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl",
            pickle.dumps({"w": collections.Counter("ab")}, protocol=2),
        )

    with pytest.raises(ValueError, match="collections.Counter"):
        read_torch_checkpoint(path)


def test_reader_rejects_out_of_bounds(tmp_path):
    path = tmp_path / "short.bin"
    # A 3 x 3 tensor needs 9 elements, and the storage has 4.
    _write_checkpoint(path, size=(3, 3), stride=(3, 1))

    with pytest.raises(ValueError, match="storage of 4 elements"):
        read_torch_checkpoint(path)


def test_reader_rejects_truncated_storage(tmp_path):
    path = tmp_path / "truncated.bin"
    _write_checkpoint(path, size=(2,), stride=(1,), storage_bytes=b"\x00" * 6)

    with pytest.raises(ValueError, match="has 6 bytes"):
        read_torch_checkpoint(path)


def test_reader_rejects_legacy_format(tmp_path):
    path = tmp_path / "legacy.bin"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))

    with pytest.raises(ValueError, match="before 1.6"):
        read_torch_checkpoint(path)


def test_reader_rejects_other_zip(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")

    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_torch_checkpoint(path)


def test_reader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(tmp_path / "absent.bin")
