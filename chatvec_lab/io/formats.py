"""How weights are stored on disk, read strictly: regular files only, JSON without surprises, safetensors
headers checked against the format (dtypes, shapes, offsets), and file hashes.

Everything here parses bytes; nothing maps or caches them (``paging``) or knows about models (``sources``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import torch

from chatvec_lab.errors import SourceError


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: torch.dtype) -> int:
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


def json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# The strict parser below reads JSON as the safetensors library (serde_json) does, where Python's json module
# is more lenient: no NaN/Infinity, no number out of float range, -0 is a float, no lone UTF-16 surrogate,
# nothing nested 128 deep. It also refuses duplicate keys, which the library resolves silently (the last wins).
JSON_MAX_DEPTH = 128


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {short_repr(text, 24)} out of range")
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
            raise ValueError(f"duplicate key {short_repr(key)}")
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
        raise SourceError(f"bad {what} {path}: expected a JSON object, found {json_type(value)}")
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
        raise ValueError(f"the entry for tensor {short_repr(name)} is {json_type(info)}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise ValueError(f"tensor {short_repr(name)} has no {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES.keys() | _ST_UNSUPPORTED:
        raise ValueError(f"tensor {short_repr(name)} has unknown dtype {short_repr(dtype, 40)}")
    if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
        raise ValueError(f"tensor {short_repr(name)}: shape {short_repr(shape, 40)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {short_repr(name)}: data_offsets {short_repr(offsets, 40)} are not two non-negative "
                         "integers [begin, end] with begin <= end")
    if dtype in _ST_UNSUPPORTED:
        raise _UnsupportedDtype(f"tensor {short_repr(name)} has unsupported dtype {dtype} "
                                f"(chatvec reads {', '.join(_ST_DTYPES)})")
    extent = 1  # torch sizes and strides are signed 64-bit; the library refuses a product that overflows
    for d in shape:
        extent *= max(d, 1)
        if extent >= 2**63:
            raise ValueError(f"tensor {short_repr(name)}: shape {short_repr(shape, 60)} is too large")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"tensor {short_repr(name)} spans {offsets[1] - offsets[0]} bytes, its shape and dtype need "
                         f"{nbytes}")
    return _ST_DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def check_safetensors_header(header, data_bytes: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """The tensors of a parsed header, ``name -> (dtype, shape, begin, end)``, if they tile the
    ``data_bytes`` of the data section exactly: sorted by offset, contiguous from 0, no overlap, no gap,
    nothing after the last one. ValueError otherwise."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is {json_type(header)}, not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("__metadata__ is not an object of strings")
    tensors = {name: _tensor_entry(name, info) for name, info in header.items() if name != "__metadata__"}
    end = 0
    for name, (_, _, begin, stop) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise ValueError(f"tensor {short_repr(name)} starts at data byte {begin}, not {end}: it {what}")
        end = stop
    if end < data_bytes:
        raise ValueError(f"{data_bytes - end} trailing bytes after the last tensor's data")
    if end > data_bytes:
        raise _Truncated(f"the tensors need {end} data bytes, the file holds {data_bytes}")
    return tensors


def read_header(f, path: Path):
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


def sha256_handle(handle, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(handle.fileno(), chunk, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


# ------------------------------------------------------------------ in memory and pickles


def check_yaml_folder(folder, what: str) -> Path:
    """A folder whose ``.yaml`` / ``.yml`` files, at any depth, are all regular files: a FIFO among them would block
    whoever reads it for ever, a link loop would raise deep inside the reader. One SourceError line otherwise."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
        raise SourceError(f"{what} must be a folder, not {folder!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{what} {folder} is not a folder" if folder.exists() or folder.is_symlink()
                          else f"{what} {folder} not found")
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".yaml", ".yml")):
                path = Path(root) / name
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError as e:
                    raise SourceError(f"{what}: cannot read {path} ({e.strerror or type(e).__name__})") from None
                if not regular:
                    raise SourceError(f"{what}: {path} is not a regular file (a FIFO or device would block the "
                                      "reader)")
    return folder


SAMPLE_BLOCKS, SAMPLE_BYTES = 32, 1 << 16


def sample_digest(paths) -> str:
    """A sha256 of ``SAMPLE_BLOCKS`` blocks of 64 KB at fixed offsets of each file (headers and weights): 2 MB read
    per file, whatever its size. Two checkpoints of one architecture have the same sizes and headers; their weights
    differ in every block, so a model swapped for another under the same path is told without hashing gigabytes."""
    h = hashlib.sha256()
    for path in paths:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{Path(path).name}:{size}:".encode())
            step = max(SAMPLE_BYTES, size // SAMPLE_BLOCKS)
            for offset in range(0, size, step):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
