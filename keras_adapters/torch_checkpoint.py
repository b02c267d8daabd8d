"""Read PyTorch `torch.save` checkpoints of tensors into NumPy, without torch.

`torch.save` (PyTorch 1.6 and later) writes a zip archive with one top-level
folder `<archive>/`:

- `<archive>/data.pkl`: a pickle of the saved object, here a state dict
  mapping names to tensors. Each tensor is pickled as a call of
  `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks[, metadata])`, and each storage as a
  persistent id `("storage", <storage class such as torch.FloatStorage>,
  <key>, <device>, <number of elements>)`;
- `<archive>/data/<key>`: the raw bytes of each storage;
- `<archive>/byteorder`: `"little"` or `"big"`, absent in files from before
  PyTorch 1.13, which were little-endian.

`read_torch_checkpoint` unpickles `data.pkl` with an unpickler that resolves
only the few globals such a state dict refers to. It maps each of them to a
NumPy stand-in, so reading a file never imports torch and never runs code
that the file names.
"""

import collections
import io
import os
import pickle
import zipfile

import numpy as np

# torch storage class -> (NumPy dtype of one element, whether it is bfloat16,
# which NumPy lacks, so it is read as uint16 and widened to float32).
_STORAGE_DTYPES = {
    "DoubleStorage": (np.float64, False),
    "FloatStorage": (np.float32, False),
    "HalfStorage": (np.float16, False),
    "BFloat16Storage": (np.uint16, True),
    "LongStorage": (np.int64, False),
    "IntStorage": (np.int32, False),
    "ShortStorage": (np.int16, False),
    "CharStorage": (np.int8, False),
    "ByteStorage": (np.uint8, False),
    "BoolStorage": (np.bool_, False),
}

# The first bytes of files in the format of PyTorch before 1.6, a sequence
# of pickles (the first is a magic number) rather than a zip archive.
_PICKLE_PROTOCOL_PREFIX = b"\x80"


class _StorageType:
    """Stand-in for a torch storage class such as `torch.FloatStorage`."""

    def __init__(self, name):
        self.name = name
        self.dtype, self.is_bfloat16 = _STORAGE_DTYPES[name]


class _Storage:
    """A storage's elements as a flat NumPy array."""

    def __init__(self, storage_type, elements):
        self.storage_type = storage_type
        self.elements = elements


class _Tensor:
    """A tensor that `_rebuild_tensor_v2` returned, before validation."""

    def __init__(self, array):
        self.array = array


def _rebuild_tensor_v2(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    metadata=None,
):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(
            "A tensor refers to something other than a storage."
        )
    if metadata and any(metadata.values()):
        # torch stores lazily applied negation or conjugation as metadata
        # flags, which ordinary trained weights do not have.
        raise pickle.UnpicklingError(
            f"A tensor has unsupported metadata flags: {dict(metadata)}"
        )
    size = tuple(int(dimension) for dimension in size)
    stride = tuple(int(step) for step in stride)
    storage_offset = int(storage_offset)
    elements = storage.elements

    if len(size) != len(stride) or storage_offset < 0:
        raise pickle.UnpicklingError(
            f"A tensor has an invalid layout: size={size}, stride={stride}, "
            f"storage_offset={storage_offset}"
        )
    if any(dimension < 0 for dimension in size) or any(
        step < 0 for step in stride
    ):
        raise pickle.UnpicklingError(
            f"A tensor has a negative size or stride: size={size}, "
            f"stride={stride}"
        )
    if 0 not in size:
        # The tensor's last element must lie inside its storage, because
        # `as_strided` reads memory without bounds checks.
        last = storage_offset + sum(
            (dimension - 1) * step for dimension, step in zip(size, stride)
        )
        if last >= elements.size:
            raise pickle.UnpicklingError(
                f"A tensor reaches element {last} of a storage of "
                f"{elements.size} elements: size={size}, stride={stride}, "
                f"storage_offset={storage_offset}"
            )
        itemsize = elements.itemsize
        array = np.lib.stride_tricks.as_strided(
            elements[storage_offset:],
            shape=size,
            strides=tuple(step * itemsize for step in stride),
            writeable=False,
        )
        array = np.array(array, copy=True)
    else:
        array = np.zeros(size, dtype=elements.dtype)

    if storage.storage_type.is_bfloat16:
        # bfloat16 is the upper half of a float32's bits.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return _Tensor(array)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


# (module, name) -> the object that replaces it while unpickling.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of tensor state dicts that resolves only `_ALLOWED_GLOBALS`."""

    def __init__(self, file, archive, prefix, byteorder):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.byteorder = byteorder
        self.storages = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"The checkpoint refers to `{module}.{name}`, which a state "
                "dict of tensors does not contain, so it is not loaded."
            ) from None

    def persistent_load(self, persistent_id):
        if (
            not isinstance(persistent_id, tuple)
            or len(persistent_id) != 5
            or persistent_id[0] != "storage"
            or not isinstance(persistent_id[1], _StorageType)
        ):
            raise pickle.UnpicklingError(
                "Unsupported persistent id in the checkpoint: "
                f"{persistent_id!r}"
            )
        _, storage_type, key, location, numel = persistent_id
        key = str(key)
        if key not in self.storages:
            self.storages[key] = self._read_storage(
                storage_type, key, int(numel)
            )
        return self.storages[key]

    def _read_storage(self, storage_type, key, numel):
        path = f"{self.prefix}data/{key}"
        try:
            data = self.archive.read(path)
        except KeyError:
            raise pickle.UnpicklingError(
                f"The checkpoint has no storage file {path!r}."
            ) from None
        dtype = np.dtype(storage_type.dtype).newbyteorder(
            "<" if self.byteorder == "little" else ">"
        )
        if len(data) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"The storage file {path!r} has {len(data)} bytes, fewer "
                f"than the {numel} elements of {dtype.itemsize} bytes that "
                "its tensors use."
            )
        elements = np.frombuffer(data, dtype=dtype, count=numel)
        return _Storage(storage_type, elements.astype(dtype.newbyteorder("=")))


def read_torch_checkpoint(path):
    """Read a state dict saved with `torch.save` as NumPy arrays.

    Only state dicts, maps of names to dense CPU or GPU tensors, are read.
    torch is not imported. The unpickler resolves only
    `collections.OrderedDict` and the torch functions and storage classes
    that rebuild tensors, so a file that refers to anything else raises an
    error instead of running it.

    Args:
        path: string or path-like. A file written by `torch.save` in the
            zip format of PyTorch 1.6 and later, such as `pytorch_model.bin`.

    Returns:
        A dict mapping each name to a NumPy array of the tensor's dtype and
        shape. bfloat16 tensors are returned as float32, which NumPy can
        hold exactly.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a PyTorch zip checkpoint of a state
            dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(_not_zip_message(path))

    with zipfile.ZipFile(path) as archive:
        prefix = _record_prefix(archive, path)
        byteorder = _byteorder(archive, prefix, path)
        with archive.open(f"{prefix}data.pkl") as pickled:
            unpickler = _RestrictedUnpickler(
                io.BytesIO(pickled.read()), archive, prefix, byteorder
            )
            try:
                state_dict = unpickler.load()
            except (pickle.UnpicklingError, EOFError, TypeError) as error:
                raise ValueError(
                    f"Cannot read {path!r} as a PyTorch state dict: {error}"
                ) from error

    return _to_arrays(state_dict, path)


def _record_prefix(archive, path):
    """Return the archive's top-level folder with a trailing "/"."""
    pickles = [
        name
        for name in archive.namelist()
        if name.endswith("/data.pkl") and name.count("/") == 1
    ]
    if len(pickles) != 1:
        raise ValueError(
            f"{path!r} is a zip file but not a PyTorch checkpoint: expected "
            "one '<archive>/data.pkl' entry, found "
            f"{len(pickles)}."
        )
    return pickles[0][: -len("data.pkl")]


def _byteorder(archive, prefix, path):
    try:
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
    except KeyError:
        return "little"
    if byteorder not in ("little", "big"):
        raise ValueError(
            f"{path!r} records an unknown byte order. Received: "
            f"byteorder={byteorder!r}"
        )
    return byteorder


def _to_arrays(state_dict, path):
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{path!r} contains a {type(state_dict).__name__}, not a state "
            "dict mapping names to tensors."
        )
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise ValueError(
                f"{path!r} is not a state dict of tensors: entry {key!r} is "
                f"a {type(value).__name__}."
            )
        arrays[key] = value.array
    return arrays


def _not_zip_message(path):
    with open(path, "rb") as file:
        start = file.read(2)
    if start.startswith(_PICKLE_PROTOCOL_PREFIX):
        return (
            f"{path!r} is in the format of PyTorch before 1.6, which is not "
            "supported. Load it with torch and save it again with "
            "`torch.save(state_dict, path)` from PyTorch 1.6 or later, or "
            "as safetensors."
        )
    return f"{path!r} is not a PyTorch checkpoint (a zip archive)."
