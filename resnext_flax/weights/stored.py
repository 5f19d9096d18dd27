"""Tensors of a ``.safetensors`` file, read one at a time when a load asks for them, and
written one at a time.

Reading a file gives :class:`StoredTensor` placeholders (key, shape, dtype, where the bytes
are): resolving what the file holds needs only those, and a load reads each tensor into a
fresh array, converts it into the model's parameter and drops it before reading the next. So a
load holds the model's weights about once, not the file's tensors as well. The bytes are read
with plain reads (no memory map, whose touched pages would stay resident for as long as the
file is mapped) through one descriptor opened before the safetensors parser checked the file:
a file renamed over the path later is not read at the checked offsets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from resnext_flax.weights import limits

if TYPE_CHECKING:
    import numpy as np

# safetensors' dtype names -> numpy's, for the dtypes read here; a file's other dtypes go
# through the safetensors reader itself (its support and its errors).
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "I64": "<i8",
                 "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _numpy_dtype(name: str) -> np.dtype:
    import numpy as np

    if name == "bfloat16":  # numpy has none; ml_dtypes' is what JAX uses
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _OpenFile:
    """A read-only descriptor of a file, shared by its tensors and closed with the last."""

    __slots__ = ("fd",)

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)  # None: the open failed
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Read into `buffer` from `offset` until it is full or the file ends; the bytes read."""
        done = 0
        while done < len(buffer):
            if hasattr(os, "preadv"):  # straight into the buffer
                got = os.preadv(self.fd, [buffer[done:]], offset + done)
            else:
                if hasattr(os, "pread"):
                    data = os.pread(self.fd, len(buffer) - done, offset + done)
                else:  # Windows
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    data = os.read(self.fd, len(buffer) - done)
                buffer[done:done + len(data)], got = data, len(data)
            if not got:
                break
            done += got
        return done


class StoredTensor:
    """A tensor of a ``.safetensors`` file, read from it whenever it is used as an array
    (``np.asarray``); `shape` and `dtype` (numpy's) need no read."""

    __slots__ = ("_file", "_offset", "dtype", "key", "path", "shape")

    def __init__(self, file: _OpenFile, path: str, key: str, shape: tuple[int, ...],
                 dtype: np.dtype, offset: int):
        self.path, self.key, self.shape, self.dtype = path, key, shape, dtype
        self._file, self._offset = file, offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor as a new, writable numpy array; a WeightFileError if the file no longer
        holds its bytes (it changed since it was opened)."""
        import numpy as np

        from resnext_flax.weights.files import WeightFileError

        buffer = np.empty(self.nbytes, np.uint8)
        try:
            got = self._file.read_into(memoryview(buffer), self._offset)
        except OSError as err:
            raise WeightFileError(f"could not read {self.key!r} from {self.path!r}: "
                                  f"{err}") from err
        if got != self.nbytes:
            raise WeightFileError(
                f"{self.path!r} ends {got:,} bytes into {self.key!r}, which has "
                f"{self.nbytes:,}: the file changed after it was opened")
        return buffer.view(self.dtype).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.read()  # always a new array: a copy= request cannot be refused
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"StoredTensor({self.key!r}, shape={self.shape}, dtype={self.dtype})"


def read_tensors(path: str) -> dict[str, StoredTensor | np.ndarray]:
    """The tensors of a safetensors file by key (as safetensors lists them): :class:`StoredTensor`
    placeholders, or arrays for dtypes read by the safetensors reader itself. The parser
    checks the header (offsets within the file, sizes matching shapes and dtypes) on opening;
    its errors, and more tensors than ``limits.MAX_SAFETENSORS_TENSORS`` (a ValueError),
    propagate."""
    from safetensors import safe_open

    source = _OpenFile(path)
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        problem = limits.tensor_count_problem(path, len(keys))
        if problem:
            raise ValueError(problem)
        kinds = {key: f.get_slice(key).get_dtype() for key in keys}
        eager = {key: f.get_tensor(key) for key in keys if kinds[key] not in _NUMPY_DTYPES}
    opened, checked = os.fstat(source.fd), os.stat(path)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        raise ValueError("the file was replaced while it was opened")
    head = bytearray(8)
    source.read_into(memoryview(head), 0)
    size = int.from_bytes(head, "little")
    raw = bytearray(size)
    source.read_into(memoryview(raw), 8)
    header = json.loads(raw)
    start = 8 + size
    out: dict[str, StoredTensor | np.ndarray] = {}
    for key in keys:
        if key in eager:
            out[key] = eager[key]
            continue
        entry = header[key]
        shape, dtype = tuple(entry["shape"]), _numpy_dtype(_NUMPY_DTYPES[kinds[key]])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:  # the parser checked it too
            raise ValueError(f"{key!r}: {end - begin} bytes for shape {shape} of {dtype}")
        out[key] = StoredTensor(source, path, key, shape, dtype, start + begin)
    return out


def write_tensors(f: BinaryIO, tensors: Mapping[str, Any],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (arrays, or anything with `shape` and `dtype` that ``np.asarray`` turns
    into one, asked for one at a time) to the open binary file `f` as a safetensors file, in
    the mapping's order. The header is written first, from the shapes and dtypes; then each
    tensor's bytes, so the file is never built in memory whole (a JAX array on the CPU is
    written from its own buffer)."""
    import numpy as np

    names = {_numpy_dtype(numpy): name for name, numpy in _NUMPY_DTYPES.items()}
    header: dict[str, Any] = {}
    offset = 0
    for key, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype.newbyteorder("<") not in names:
            raise TypeError(f"{key!r}: a safetensors file cannot hold {dtype}")
        size = math.prod(value.shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype.newbyteorder("<")], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned, as safetensors writes
    f.write(len(raw).to_bytes(8, "little") + raw)
    for key, value in tensors.items():
        array = np.asarray(value)
        if array.shape != tuple(header[key]["shape"]) or array.dtype != value.dtype:
            raise ValueError(f"{key!r} became {array.dtype}{array.shape} when read")
        f.write(np.ascontiguousarray(array.reshape(-1)).view(np.uint8).data)
