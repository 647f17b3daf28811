"""Arrays that stay on disk: the rows of one or more ``.npy`` files, read on demand.

:class:`DiskArray` is what :func:`common.data.load_data` returns for a float32
``.npy`` file or a folder of ``.npy`` shards (data larger than memory). It
behaves like a read-only numpy array for what training, evaluation and
prediction need (``len``, ``shape``, ``x[i]``, ``x[a:b]``, ``x[index_array]``,
``reshape`` of the rows) and reads each request's rows with positional reads
(``os.preadv``), one per run of consecutive rows. Nothing is memory-mapped, so
the process holds only the rows it asked for: a memory map would count every
page it touched in the process's resident memory until the kernel evicted
it, and its peak would grow with the data.

``numpy.asarray(x)`` reads the whole array (for code that needs it in
memory, e.g. self-labelling's image variables); the streaming paths never
call it (a test makes it raise during training).
"""

from __future__ import annotations

import os
import weakref
from math import prod
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format


class _Shard:
    """One ``.npy`` file: its open descriptor, data offset and row count."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else \
                npy_format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError("stored in Fortran order; save it with np.save(path, np.ascontiguousarray(x))")
        if dtype.hasobject:
            raise ValueError("holds Python objects, not numbers")
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype
        expected = self.offset + prod(self.shape) * dtype.itemsize
        if os.path.getsize(self.path) < expected:
            raise ValueError(f"is shorter than its header says ({os.path.getsize(self.path)} of "
                             f"{expected} bytes): was it copied completely?")
        self.fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read(self, out: np.ndarray, first_row: int, row_bytes: int):
        """Fill the contiguous ``out`` with rows starting at ``first_row``."""
        view, pos = memoryview(out).cast("B"), self.offset + first_row * row_bytes
        while len(view):
            got = os.preadv(self.fd, [view], pos)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {pos}")
            view, pos = view[got:], pos + got


class DiskArray:
    """Read-only rows of ``.npy`` files concatenated along the first axis.

    Args:
        shards: the files' :class:`_Shard` objects (use :func:`open_npy`).
        row_shape: the shape of one row (default: the files' own); any shape
            with the same number of values, as ``reshape`` gives.
    """

    def __init__(self, shards, row_shape=None):
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        stored = self.shards[0].shape[1:]
        self.row_shape = tuple(stored if row_shape is None else row_shape)
        if prod(self.row_shape) != prod(stored):
            raise ValueError(f"cannot view rows of shape {stored} as {self.row_shape}")
        self.row_bytes = prod(stored) * self.dtype.itemsize
        self.starts = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.shape = (int(self.starts[-1]), *self.row_shape)

    # ------------------------------------------------------- array protocol
    ndim = property(lambda self: len(self.shape))

    @property
    def filename(self) -> str:
        """The file (one shard) or folder (several) the rows come from."""
        paths = [s.path for s in self.shards]
        return str(paths[0] if len(paths) == 1 else paths[0].parent)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskArray({self.filename!r}, shape={self.shape}, dtype={self.dtype})"

    def reshape(self, *shape) -> DiskArray:
        """A view with other rows: ``reshape(len(x), -1)``, ``reshape(n, 28, 28, 1)``."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if not shape or shape[0] not in (len(self), -1):
            raise ValueError(f"a DiskArray keeps its {len(self)} rows; got shape {shape}")
        row = list(shape[1:])
        if row.count(-1) == 1:
            known = prod(v for v in row if v != -1)
            row[row.index(-1)] = prod(self.row_shape) // max(known, 1)
        return DiskArray(self.shards, tuple(row))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._rows(np.array([key]))[0]
        if isinstance(key, slice):
            return self._rows(np.arange(*key.indices(len(self))))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean index of shape {index.shape} for {len(self)} rows")
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise IndexError(f"DiskArray rows are indexed by an int, a slice or a 1-d array of ints, "
                             f"got {index.dtype} of shape {index.shape}")
        return self._rows(index)

    # ----------------------------------------------------------- reading
    def _rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed), read in file order."""
        n = len(self)
        index = np.asarray(index, np.int64)
        if len(index) and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        index = np.where(index < 0, index + n, index)
        order = np.argsort(index, kind="stable")
        wanted = index[order]
        got = np.empty((len(wanted), *self.row_shape), self.dtype)
        if not len(wanted):
            return got
        # Runs of consecutive rows inside one shard: one read each.
        shard = np.searchsorted(self.starts, wanted, side="right") - 1
        breaks = np.flatnonzero((np.diff(wanted) != 1) | (np.diff(shard) != 0)) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(wanted)]):
            s = int(shard[a])
            self.shards[s].read(got[a:b], int(wanted[a] - self.starts[s]), self.row_bytes)
        if np.all(order[1:] > order[:-1]):
            return got
        out = np.empty_like(got)
        out[order] = got
        return out


#: Descriptors left free for the rest of the process when shards are opened.
SPARE_DESCRIPTORS = 256


def _allow_descriptors(count: int):
    """Raise this process's soft limit on open files so that ``count`` more
    fit beside :data:`SPARE_DESCRIPTORS` others (up to the hard limit; the
    soft one is often 1,024, a folder may hold more shards than that)."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    allowed = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if allowed > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
    if allowed < need:
        raise ValueError(f"{count} shards need {count} open files, and {SPARE_DESCRIPTORS} are kept for the "
                         f"rest of the run, but this process may open at most {hard} (ulimit -Hn); merge the "
                         "shards into fewer, larger .npy files")


def open_npy(paths) -> DiskArray:
    """A :class:`DiskArray` over ``.npy`` files of one dtype and row shape.

    Each file stays open (one descriptor) while the array lives; the limit
    on open files is raised for them when needed. Raises ``ValueError``
    naming the file that cannot be read or differs, or when the process may
    not open that many files."""
    paths = list(paths)
    _allow_descriptors(len(paths))
    shards = []
    for path in paths:
        try:
            shard = _Shard(path)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy file: {e}") from None
        if len(shard.shape) < 2 or shard.shape[0] == 0:
            raise ValueError(f"{path}: the array must have shape (samples, features...) with data, "
                             f"found {shard.shape}")
        if shards and (shard.dtype, shard.shape[1:]) != (shards[0].dtype, shards[0].shape[1:]):
            raise ValueError(f"{path} holds rows of {shard.dtype} {shard.shape[1:]}, "
                             f"{shards[0].path.name} of {shards[0].dtype} {shards[0].shape[1:]}: "
                             "every shard must hold the same kind of rows")
        shards.append(shard)
    if not shards:
        raise ValueError("no .npy files given")
    return DiskArray(shards)
