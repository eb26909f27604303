"""Open a model's weights lazily, tensor by tensor, wherever they live.

``open_weights(spec)`` accepts a hub id, a local folder of (sharded) ``*.safetensors``, a single
``.safetensors`` file, an in-memory ``torch.nn.Module`` or state dict, or an already open source.
Only the tensor asked for is read, so memory holds one tensor at a time, not the model.
Pickled weights (``.bin``, ``.pt``) are refused unless ``allow_pickle=True``, and are then loaded
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from chatvec_lab.errors import SourceError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class WeightSource(Mapping):
    """A read-only, lazy map from tensor name to tensor."""

    description: str = "weights"
    folder: Path | None = None  # where config.json and the tokenizer live, if anywhere

    def keys(self) -> list[str]:  # type: ignore[override]
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError

    reads_ranges = False  # whether read_into can read part of a tensor without reading all of it

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """Copy bytes [start, start + len(out)) of tensor ``name``'s data (row-major) into ``out``."""
        raise NotImplementedError(f"{type(self).__name__} does not read parts of tensors")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._key_set():
            raise KeyError(name)
        return self.get(name)

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def __contains__(self, name: object) -> bool:
        return name in self._key_set()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def numel(self) -> int:
        total = 0
        for name in self.keys():
            n = 1
            for d in self.shape(name):
                n *= d
            total += n
        return total

    def nbytes(self) -> int:
        return sum(_numel(self.shape(n)) * _itemsize(self.dtype(n)) for n in self.keys())

    @property
    def config(self) -> dict | None:
        if getattr(self, "_config", None) is not None:
            return self._config
        if self.folder and (self.folder / "config.json").exists():
            return read_json_object(self.folder / "config.json", "model config")
        return None

    def fingerprint(self, hash_files: bool = True) -> dict:
        return {"source": self.description}

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} tensors>"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


# ------------------------------------------------------------------ reading files and JSON safely

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
        raise SourceError(f"{path} is {kind}, not a regular file")


def open_regular(path: Path, buffering: int = -1):
    """Open ``path`` for binary reading if it is a regular file (or a symlink to one), else a one-line
    SourceError. A FIFO or device named like a weights file is never read and never blocks the open:
    it is refused on a stat before opening, and again on the open descriptor in case it was swapped in."""
    try:
        _require_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# The strict parser below reads JSON as the safetensors library (serde_json) does, where Python's json module
# is more lenient: no NaN/Infinity, no number out of float range, -0 is a float, no lone UTF-16 surrogate,
# nothing nested 128 deep. It also refuses duplicate keys, which the library resolves silently (the last wins).
JSON_MAX_DEPTH = 128


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_short(text, 24)} out of range")
    return value


def _json_integer(text: str):
    if text == "-0":
        return -0.0
    value = int(text)
    if not -2**63 <= value < 2**64:  # serde_json reads a float, which may be out of range
        _finite_number(text)
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {_short(key)}")
        seen.add(key)
    return dict(pairs)


def _check_json_tree(value, depth: int = 1) -> None:
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    elif isinstance(value, (dict, list)):
        if depth >= JSON_MAX_DEPTH:
            raise ValueError(f"JSON nested {JSON_MAX_DEPTH} or more levels deep")
        for item in ([*value.keys(), *value.values()] if isinstance(value, dict) else value):
            _check_json_tree(item, depth + 1)


def parse_json(raw: bytes, strict: bool = False):
    """Parse UTF-8 JSON; ValueError (with a one-line message) if it is not valid. ``strict``: as above."""
    try:
        text = raw.decode("utf-8")
        if not strict:
            return json.loads(text)
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant,
                           parse_int=_json_integer, parse_float=_finite_number)
        _check_json_tree(value)
        return value
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json_object(path: Path, what: str, strict: bool = False) -> dict:
    """The JSON object in file ``path``, or a one-line SourceError naming ``what`` and the file."""
    try:
        with open_regular(path) as f:
            raw = f.read()
        value = parse_json(raw, strict)
    except (OSError, ValueError) as e:
        raise SourceError(f"bad {what} {path}: {e}") from None
    if not isinstance(value, dict):
        raise SourceError(f"bad {what} {path}: expected a JSON object, found {_json_type(value)}")
    return value


# ------------------------------------------------------------------ safetensors

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# in the format (safetensors 0.8), not read by chatvec: refused as unsupported, not as corrupt
_ST_UNSUPPORTED = {"U16", "U32", "U64", "C64", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "F4"}
ST_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit


class _UnsupportedDtype(ValueError):
    pass


class _Truncated(ValueError):
    pass


def _is_size(value) -> bool:
    return type(value) is int and 0 <= value < 2**64  # not bool, not float


def _tensor_entry(name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, checked on its own."""
    if not isinstance(info, dict):
        raise ValueError(f"the entry for tensor {_short(name)} is {_json_type(info)}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise ValueError(f"tensor {_short(name)} has no {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES.keys() | _ST_UNSUPPORTED:
        raise ValueError(f"tensor {_short(name)} has unknown dtype {_short(dtype, 40)}")
    if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
        raise ValueError(f"tensor {_short(name)}: shape {_short(shape, 40)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {_short(name)}: data_offsets {_short(offsets, 40)} are not two non-negative "
                         "integers [begin, end] with begin <= end")
    if dtype in _ST_UNSUPPORTED:
        raise _UnsupportedDtype(f"tensor {_short(name)} has unsupported dtype {dtype} "
                                f"(chatvec reads {', '.join(_ST_DTYPES)})")
    extent = 1  # torch sizes and strides are signed 64-bit; the library refuses a product that overflows
    for d in shape:
        extent *= max(d, 1)
        if extent >= 2**63:
            raise ValueError(f"tensor {_short(name)}: shape {_short(shape, 60)} is too large")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"tensor {_short(name)} spans {offsets[1] - offsets[0]} bytes, its shape and dtype need "
                         f"{nbytes}")
    return _ST_DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def check_safetensors_header(header, data_bytes: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """The tensors of a parsed header, ``name -> (dtype, shape, begin, end)``, if they tile the
    ``data_bytes`` of the data section exactly: sorted by offset, contiguous from 0, no overlap, no gap,
    nothing after the last one. ValueError otherwise."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is {_json_type(header)}, not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("__metadata__ is not an object of strings")
    tensors = {name: _tensor_entry(name, info) for name, info in header.items() if name != "__metadata__"}
    end = 0
    for name, (_, _, begin, stop) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise ValueError(f"tensor {_short(name)} starts at data byte {begin}, not {end}: it {what}")
        end = stop
    if end < data_bytes:
        raise ValueError(f"{data_bytes - end} trailing bytes after the last tensor's data")
    if end > data_bytes:
        raise _Truncated(f"the tensors need {end} data bytes, the file holds {data_bytes}")
    return tensors


def read_safetensors_header(path: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """``(data_start, tensors)`` of a safetensors file, checked as strictly as the format: see
    check_safetensors_header; offsets are relative to ``data_start``. One-line SourceError otherwise."""
    with open_regular(path) as f:
        return _read_header(f, path)


def _read_header(f, path: Path):
    try:
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if not 0 < n <= min(size - 8, ST_MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        raw = f.read(n)
        if len(raw) < n:
            raise ValueError("file shrank while its header was read")
        return 8 + n, check_safetensors_header(parse_json(raw, strict=True), data_bytes=size - 8 - n)
    except _UnsupportedDtype as e:
        raise SourceError(f"{path}: {e}") from None
    except _Truncated as e:
        raise SourceError(f"truncated safetensors file {path}: {e}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"corrupt safetensors file {path}: {e}") from None


class SafetensorsSource(WeightSource):
    """Tensors from one or more safetensors files, read one at a time.

    Each tensor gets its own private, copy-on-write memory map of just its bytes (small ones a plain
    read): no copy through a buffer, writes never reach the file, and the map goes when the tensor
    does, so the process holds only the tensors it is working on, whatever the shard size.
    """

    MAP_AT_LEAST = 1 << 20  # bytes; smaller tensors are read, mapping them costs more than copying
    POPULATE_AT_MOST = 1 << 26  # bytes; larger mapped tensors are faulted in block by block (see paged_rows)

    def __init__(self, files: list[Path], folder: Path | None = None, description: str | None = None,
                 revision: str | None = None):
        self.files = [Path(f) for f in files]
        self.folder = folder
        self.description = description or str(folder or self.files[0])
        self.revision = revision
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        # each file is opened once and read through that descriptor from then on: a file replaced or deleted
        # meanwhile (another run's --overwrite, say) is not mixed into this one
        self._handles = {}
        for f in self.files:
            handle = self._handles[f] = open_regular(f, buffering=0)
            data_start, tensors = _read_header(handle, f)
            for name, (dtype, shape, begin, end) in tensors.items():
                if name in self._where:
                    raise SourceError(f"tensor {name!r} appears in both {self._where[name][0].name} and {f.name}")
                self._where[name] = (f, data_start + begin, end - begin)
                self._meta[name] = (shape, dtype)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def get(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"{self.description} has no tensor {name!r}")
        path, offset, nbytes = where
        shape, dtype = self._meta[name]
        if nbytes >= self.MAP_AT_LEAST and offset % _itemsize(dtype) == 0:  # elements must be aligned
            return self._map(self._handles[path], path, offset, nbytes, shape, dtype, name)
        buf = bytearray(nbytes)
        self.read_into(name, 0, memoryview(buf))
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    reads_ranges = True

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"{self.description} has no tensor {name!r}")
        path, offset, nbytes = where
        if start < 0 or start + len(out) > nbytes:
            raise ValueError(f"bytes {start}..{start + len(out)} are outside tensor {name!r} ({nbytes} bytes)")
        try:
            fd = self._handles[path].fileno()
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + start + done)
                if not n:
                    raise SourceError(f"truncated safetensors file {path}: tensor {name!r} ends past the file")
                done += n
        except OSError as e:
            raise SourceError(f"cannot read tensor {name!r} from {path}: {e}") from None

    @classmethod
    def _map(cls, handle, path: Path, offset: int, nbytes: int, shape, dtype, name: str) -> torch.Tensor:
        import warnings

        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(handle.fileno()).st_size < offset + nbytes:
                raise SourceError(f"truncated safetensors file {path}: tensor {name!r} ends past the file")
            mapped = mmap.mmap(handle.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError as e:
            raise SourceError(f"cannot read tensor {name!r} from {path}: {e}") from None
        pages = MappedPages(mapped, offset - start, whole=nbytes <= cls.POPULATE_AT_MOST)
        if pages.whole:
            pages.populate(0, nbytes)  # now, in the prefetching thread, which overlaps the caller's work
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor = torch.frombuffer(mapped, dtype=dtype, count=nbytes // _itemsize(dtype),
                                      offset=offset - start).reshape(shape)
        tensor.mapped_pages = pages
        return tensor

    def fingerprint(self, hash_files: bool = True) -> dict:
        out: dict = {"source": self.description}
        if self.revision:
            out["revision"] = self.revision
        if self.folder is not None:
            out["path"] = str(Path(self.folder).resolve())
        if hash_files:
            out["sha256"] = {f.name: _sha256(self._handles[f]) for f in self.files}
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


class MappedPages:
    """The private file mapping behind a memory-mapped tensor: fault byte ranges in ahead of use, drop them after.

    Dropping pages of a copy-on-write mapping discards writes to them, so only code that never writes to
    the tensor (``paged_rows(..., release=True)``) drops them; unwritten pages read back from the file."""

    # MADV_POPULATE_READ is 22 on Linux ≥ 5.14; Python's mmap module names it only from 3.13 on
    POPULATE = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)
    DONTNEED = getattr(mmap, "MADV_DONTNEED", None)

    def __init__(self, mapping: mmap.mmap, data_offset: int, whole: bool):
        self.mapping = mapping
        self.data_offset = data_offset
        self.whole = whole  # faulted in as a whole when mapped; else left to paged_rows

    def _advise(self, option: int | None, start: int, stop: int) -> None:
        if option is None or stop <= start:
            return
        try:
            self.mapping.madvise(option, start, stop - start)
        except (OSError, ValueError):  # an older kernel, or the mapping closed: advice only, so carry on
            pass

    def populate(self, start: int, stop: int) -> None:
        """Fault in the tensor's bytes [start, stop)."""
        first = (self.data_offset + start) // mmap.PAGESIZE * mmap.PAGESIZE
        self._advise(self.POPULATE, first, self.data_offset + stop)

    def release(self, start: int, stop: int) -> None:
        """Drop the pages wholly inside the tensor's bytes [start, stop) from this process's memory."""
        first = -(-(self.data_offset + start) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (self.data_offset + stop) // mmap.PAGESIZE * mmap.PAGESIZE
        self._advise(self.DONTNEED, first, last)


_IO_POOL = None


def _io_pool():
    """One background thread for page faulting, dropping and block reads (they are queued in order)."""
    global _IO_POOL
    if _IO_POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _IO_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvec-io")
    return _IO_POOL


def row_block_extent(shape: tuple[int, ...], index) -> tuple[int, int, tuple[int, ...]]:
    """Where a row-block index (a slice of rows, or ``...`` for all) lies in a row-major tensor:
    its first element, its number of elements and its shape."""
    if index is ...:
        return 0, _numel(shape), tuple(shape)
    row = _numel(shape[1:])
    rows = index.stop - index.start
    return index.start * row, rows * row, (rows, *shape[1:])


def _byte_range(tensor: torch.Tensor, index) -> tuple[int, int]:
    first, count, _ = row_block_extent(tuple(tensor.shape), index)
    return first * tensor.element_size(), (first + count) * tensor.element_size()


def paged_rows(tensors, indices, release: bool = False) -> Iterator:
    """Yield each row-block index of ``indices`` once those rows of every memory-mapped tensor in ``tensors``
    that was too large to fault in whole are faulted in; the next block's are faulted in by a background
    thread meanwhile. With ``release`` (only for callers that never write to the tensors) each block's pages
    are dropped, also in the background, once the caller moves on:
    a tensor of any size then costs two blocks of memory."""
    paged = [(t, t.mapped_pages) for t in tensors
             if getattr(t, "mapped_pages", None) is not None and not t.mapped_pages.whole]
    if not paged:
        yield from indices
        return
    pool = _io_pool()

    def fault_in(index) -> None:
        for t, pages in paged:
            pages.populate(*_byte_range(t, index))

    def drop(index) -> None:
        for t, pages in paged:
            pages.release(*_byte_range(t, index))

    indices = iter(indices)
    current = next(indices, None)
    pending = pool.submit(fault_in, current) if current is not None else None
    while current is not None:
        following = next(indices, None)
        pending.result()
        pending = pool.submit(fault_in, following) if following is not None else None
        yield current
        if release:
            pool.submit(drop, current)
        current = following


def read_blocks(source: WeightSource, items) -> Iterator[tuple[str, object, torch.Tensor]]:
    """Yield ``(name, index, rows)`` for each ``(tensor name, row-block index)`` of ``items``, read from
    ``source`` (one that ``reads_ranges``) into two reused buffers: a background thread reads the next
    block, of this tensor or the next, while the caller uses this one. A block stays valid until the caller
    asks for the next one; don't modify it."""
    items = list(items)
    shapes = {name: tuple(source.shape(name)) for name in dict.fromkeys(name for name, _ in items)}
    dtypes = {name: source.dtype(name) for name in shapes}

    def layout(i: int) -> tuple[int, int, tuple[int, ...]]:
        name, index = items[i]
        return row_block_extent(shapes[name], index)

    largest = max((layout(i)[1] * _itemsize(dtypes[n]) for i, (n, _) in enumerate(items)), default=0)
    slots = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]

    def read(i: int) -> None:
        name = items[i][0]
        first, count, _ = layout(i)
        size = _itemsize(dtypes[name])
        if count:
            source.read_into(name, first * size, memoryview(slots[i % 2][:count * size].numpy()))

    pool = _io_pool()
    pending = pool.submit(read, 0) if items else None
    for i, (name, index) in enumerate(items):
        pending.result()
        if i + 1 < len(items):  # into the buffer of block i − 1, which the caller is done with
            pending = pool.submit(read, i + 1)
        _, count, shape = layout(i)
        size = _itemsize(dtypes[name])
        yield name, index, slots[i % 2][:count * size].view(dtypes[name]).view(shape)


class Prefetcher:
    """Reads the next tensor of a known order in a background thread while the current one is used.

    File reads release the GIL, so reading overlaps computing; ``depth`` tensors are held ahead.
    """

    def __init__(self, source: WeightSource, order: list[str], depth: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.source = source
        self.order = [n for n in order if n in source]
        self.position = {n: i for i, n in enumerate(self.order)}
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvec-read")
        self.pending: dict = {}  # nothing is read before the first get: block readers cost nothing

    def _schedule(self, start: int) -> None:
        for name in self.order[start:start + self.depth]:
            if name not in self.pending:
                self.pending[name] = self.pool.submit(self.source.get, name)

    def get(self, name: str) -> torch.Tensor:
        future = self.pending.pop(name, None)
        if name in self.position:
            self._schedule(self.position[name] + 1)
        return future.result() if future is not None else self.source.get(name)

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


def sha256_file(path: Path) -> str:
    with open_regular(path) as f:
        return _sha256(f)


def _sha256(handle, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(handle.fileno(), chunk, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


# ------------------------------------------------------------------ in memory and pickles

class TensorDictSource(WeightSource):
    """An in-memory state dict or module (tensors are not copied)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "in-memory tensors",
                 folder: Path | None = None):
        self.tensors = dict(tensors)
        self.description = description
        self.folder = folder

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's persistent tensors, tied duplicates removed as a checkpoint would save them."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return out


def _load_pickles(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with open_regular(f) as handle:  # a FIFO or device is refused, not opened by torch.load
                if zipfile.is_zipfile(handle):  # the current format: memory-mapped, not read whole
                    data = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                else:  # the legacy format cannot be mapped: read from the file already opened
                    handle.seek(0)
                    data = torch.load(handle, map_location="cpu", weights_only=True)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"cannot load {f} with weights_only=True: {str(e).splitlines()[0]}") from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise SourceError(f"{f} does not hold a state dict (found {type(data).__name__})")
        tensors.update({k: v for k, v in data.items() if isinstance(v, torch.Tensor)})
    return tensors


# ------------------------------------------------------------------ resolving a spec

INDEX_FILES = ("model.safetensors.index.json", "vector.safetensors.index.json")


def _plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> name of a shard file in the index's folder."""
    index_json = read_json_object(index, "shard index", strict=True)
    weight_map = index_json.get("weight_map")
    if not isinstance(weight_map, dict):
        found = _json_type(weight_map) if "weight_map" in index_json else "missing"
        raise SourceError(f"bad shard index {index}: weight_map is {found}, not an object of tensor name to shard file")
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and _plain_file_name(shard)):
            raise SourceError(f"bad shard index {index}: tensor {_short(name)} is mapped to {_short(shard)}, "
                              "not the name of a file in the index's folder")
    return weight_map


def check_shard_index(source: SafetensorsSource, index: Path, weight_map: dict[str, str]) -> None:
    """Every tensor the index names is in the shard it names, and the shards hold no other: else which
    weights the checkpoint means is ambiguous."""
    for name, shard in weight_map.items():
        if name not in source:
            raise SourceError(f"{index} puts tensor {_short(name)} in {shard}, which does not hold it")
        if source.file_of(name).name != shard:
            raise SourceError(f"{index} puts tensor {_short(name)} in {shard}, but it is in "
                              f"{source.file_of(name).name}")
    for name in source.keys():
        if name not in weight_map:
            raise SourceError(f"{source.file_of(name).name} holds tensor {_short(name)}, which {index} does not name")


def _folder_files(folder: Path, allow_pickle: bool) -> tuple[str, list[Path], tuple[Path, dict] | None]:
    """``(kind, files, (index, weight_map) or None)`` of the weights in a folder."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.exists():
            weight_map = read_shard_index(index)
            if not weight_map:
                raise SourceError(f"bad shard index {index}: its weight_map names no tensor")
            files = sorted({folder / shard for shard in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise SourceError(f"{index} names shard {missing[0]}, which is missing")
            prefix = index_name.split(".")[0]
            unlisted = sorted(f.name for f in folder.glob(f"{prefix}-*-of-*.safetensors") if f not in set(files))
            if unlisted:  # a shard of this checkpoint that its index forgot: the model would silently lack it
                raise SourceError(f"{index} does not list shard {unlisted[0]}, which lies beside it")
            return "safetensors", files, (index, weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return "safetensors", files, None
    pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        if not allow_pickle:
            raise SourceError(f"{folder} holds only pickled weights ({pickles[0].name}); pickles can run code: "
                              "pass allow_pickle=True (--allow-pickle) to load them with weights_only=True")
        return "pickle", pickles, None
    raise SourceError(f"no weights in {folder} (expected *.safetensors, optionally with an index json)")


def _open_folder(folder: Path, allow_pickle: bool, description: str, revision: str | None = None) -> WeightSource:
    kind, files, index = _folder_files(folder, allow_pickle)
    if kind == "pickle":
        return TensorDictSource(_load_pickles(files), description=description, folder=folder)
    source = SafetensorsSource(files, folder=folder, description=description, revision=revision)
    if index:
        check_shard_index(source, *index)
    return source


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise SourceError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as first:
        if not offline:
            try:  # no network: fall back to the local cache
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                              local_files_only=True))
            except Exception:
                pass
        raise SourceError(f"{repo_id!r} is neither a local path nor a model in the local hub cache, and the hub "
                          f"could not be reached ({type(first).__name__})") from None


def open_weights(spec, allow_pickle: bool = False, revision: str | None = None) -> WeightSource:
    """Open weights lazily from a hub id, folder, ``.safetensors`` file, module or state dict."""
    if isinstance(spec, WeightSource):
        return spec
    if isinstance(spec, torch.nn.Module):
        return TensorDictSource(module_state(spec), description=f"in-memory {type(spec).__name__}",
                                folder=_module_folder(spec))
    if isinstance(spec, Mapping):
        bad = next((k for k, v in spec.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise SourceError(f"a state dict maps tensor names (str) to tensors; entry {bad!r} does not")
        return TensorDictSource(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise SourceError(f"cannot open weights from a {type(spec).__name__}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_folder(path, allow_pickle, description=str(path))
    if path.exists():  # a file, or a FIFO or device: open_regular refuses those without blocking
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], folder=path.parent if (path.parent / "config.json").is_file() else None,
                                     description=str(path))
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise SourceError(f"{path} is a pickle, which can run code when loaded: pass allow_pickle=True "
                                  "(--allow-pickle) to load it with weights_only=True")
            return TensorDictSource(_load_pickles([path]), description=str(path))
        raise SourceError(f"{path}: not a weights file (expected .safetensors)")
    text = str(spec)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) or not _HUB_ID.match(text):
        raise SourceError(f"no such file or folder: {text}")
    folder = _resolve_hub(text, revision)
    return _open_folder(folder, allow_pickle=False, description=text, revision=folder.name)


def _module_folder(module: torch.nn.Module) -> Path | None:
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def model_folder(spec, revision: str | None = None) -> Path | None:
    """The folder holding config and tokenizer for a weights spec, if there is one."""
    if isinstance(spec, WeightSource):
        return spec.folder
    if isinstance(spec, torch.nn.Module):
        return _module_folder(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        if path.is_file():
            return path.parent if (path.parent / "config.json").is_file() else None
        if _HUB_ID.match(str(spec)):
            return _resolve_hub(str(spec), revision)
    return None
