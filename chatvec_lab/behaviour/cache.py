"""The cache of a grid's cells: each finished cell's rows in one file, named by the hash of what they depend on.

A sweep or an atlas interrupted as a whole resumes with the missing cells only. A cell's key hashes everything
its rows depend on: the grid's settings and inputs (``files_key`` for model files, ``vector_key`` for vectors),
the cell's point, seed and region, and the software that generates and scores (``software_key``). A table is
written as JSON that reads back equal, with its key inside; a file that is damaged, too large, made for other
inputs or by other software, or copied from another cell reads as missing (the cell runs again). Only regular
files are read: a link, FIFO or device in a cache entry's place is refused before any work.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from chatvec_lab.core.vector import ChatVector
from chatvec_lab.errors import ChatVecError, ChatVecWarning, SourceError, UsageError, one_line
from chatvec_lab.io.output import atomic_file, check_clear_of_inputs


CACHE_MAX_BYTES = 256 * 1024**2  # a cached table larger than this is neither read nor written (the work is redone)


@functools.lru_cache(maxsize=1)
def software_key() -> dict:
    """The software a cached table's rows depend on besides its inputs: the versions of chatvec_lab, the generation
    and scorer packages, and the text of the modules that generate and score (an edited scorer is a new one)."""
    from importlib.metadata import PackageNotFoundError, version

    from chatvec_lab.version import __version__

    out: dict = {"chatvec_lab": __version__}
    for name in ("torch", "transformers", "tokenizers", "langid", "alt-profanity-check", "scikit-learn", "detoxify"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    here = Path(__file__).resolve().parent
    for module in ("scoring.py", "generation.py", "engines.py"):
        with open(here / module, "rb") as f:
            out[module] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def _stored_key(path: Path, key: str | None) -> str:
    """What a cached table records of its identity: ``key`` (the hash of everything its rows depend on; by default
    the file's own name, which is that hash) and the software that made it. A table copied to another name, or
    left by another version, does not match."""
    text = json.dumps({"key": key if key is not None else Path(path).name, "software": software_key()},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def read_cache_file(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of a cache entry, or None when there is none (or it is larger than ``limit``: a miss).

    Only a regular file is read. It is opened without following a link and without blocking (a FIFO's open would
    wait for a writer for ever), and checked on the open descriptor; a link, FIFO, device, socket or folder in its
    place is a one-line SourceError naming it, before any work (the entry could not be replaced afterwards)."""
    path = Path(path)
    limit = CACHE_MAX_BYTES if limit is None else limit
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise SourceError(f"cache entry {path} is a symbolic link: remove it (the cache keeps only regular "
                              "files it wrote itself)") from None
        return None  # unreadable (permissions …): a miss; the finished cell replaces it
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"cache entry {path} is {_describe_mode(st.st_mode)}, not a regular file: remove it, "
                              "or choose another cache folder")
        if st.st_size > limit:
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while read
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_table(path: Path, df: pd.DataFrame, key: str | None = None) -> None:
    """A table as JSON that reads back equal: exact floats (Python's repr), strings kept strings, dtypes kept.
    ``key``: the identity of what made the rows (default: the file's name), stored and checked by ``read_table``.
    A table larger than ``CACHE_MAX_BYTES`` is not written (it would not be read back)."""
    payload = {"key": _stored_key(path, key), "columns": [str(c) for c in df.columns],
               "dtypes": {str(c): str(t) for c, t in df.dtypes.items()},
               "rows": df.astype(object).where(df.notna(), None).values.tolist()}
    text = json.dumps(payload, default=float)
    if len(text) > CACHE_MAX_BYTES:  # characters, a lower bound of the bytes
        return
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_table(path: Path, key: str | None = None) -> pd.DataFrame | None:
    """What ``write_table`` wrote with the same ``key``, or None when the file is missing, unreadable, too large,
    not such a table, or made for other inputs or by other software (a copy of another cell, say). Anything but
    a regular file in its place is a SourceError (see ``read_cache_file``)."""
    raw = read_cache_file(path)
    if raw is None:
        return None
    try:
        payload = json.loads(raw.decode("utf-8"))
        if not isinstance(payload, dict) or payload.get("key") != _stored_key(path, key):
            return None
        df = pd.DataFrame(payload["rows"], columns=payload["columns"])
        for column, dtype in payload["dtypes"].items():
            df[column] = df[column].astype(dtype) if dtype != "object" else df[column]
        return df
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def check_cache_dir(cache_dir, inputs) -> Path:
    """A cache folder may not be a file, nor sit in (or hold) an input, and neither may its ``cells`` folder, links
    resolved: refused before any work."""
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"cache_dir {cache_dir} exists and is not a folder")
    check_clear_of_inputs(path, inputs)
    cells = path / "cells"
    if os.path.lexists(cells):
        check_clear_of_inputs(cells, inputs)  # a link: where it leads counts, not where it sits
        if not cells.is_dir():
            raise UsageError(f"{cells} exists and is not a folder: remove it, or choose another cache folder")
    return path


class CellCache:
    """One file per finished cell, named by the hash of what its rows depend on. A file that is damaged or does
    not hold the cell's rows (wrong count, prompts or seed) counts as missing: the cell runs again. A cell is a
    :class:`~chatvec_lab.behaviour.grid.GridCell`: its ``point``, ``seed``, ``perplexity``, ``region`` and
    ``index``."""

    def __init__(self, folder, grid_key: dict, prompts: Sequence[str] = ()):
        self.folder = Path(folder) / "cells"
        self.grid_key = grid_key
        self.prompts = list(prompts)
        self.failed = False  # a write failed: the cache is not written again this run

    def key(self, cell) -> str:
        """The hash of everything the cell's rows depend on (stored in the cell, checked when it is read)."""
        key = json.dumps({**self.grid_key, "point": list(cell.point), "seed": cell.seed,
                          "perplexity": cell.perplexity, "region": cell.region, "version": 3},
                         sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()

    def path(self, cell) -> Path:
        return self.folder / f"cell-{self.key(cell)[:24]}.json"

    def get(self, cell) -> pd.DataFrame | None:
        df = read_table(self.path(cell), key=self.key(cell))
        if df is None or not {"prompt", "reply", "seed"} <= set(df.columns):
            return None
        if len(df) != len(self.prompts) or df["prompt"].tolist() != self.prompts or (df["seed"] != cell.seed).any():
            return None
        df["cell"] = cell.index  # the same cell may sit at another index in another grid
        return df

    def put(self, cell, df: pd.DataFrame) -> None:
        if self.failed:  # said once; the run goes on uncached
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_table(self.path(cell), df, key=self.key(cell))
        except (ChatVecError, OSError) as e:
            self.failed = True
            warnings.warn(f"the cache {self.folder} cannot be written ({one_line(e)}): the run goes on without "
                          "caching its cells", ChatVecWarning, stacklevel=2)


# ---------------------------------------------------------------- cache keys

def files_key(paths) -> list:
    """Files as make sees them: path, size and modification time of each file, or of every file directly in each
    folder (weights, config, tokenizer, chat template: a change to any of them changes the replies)."""
    files = set()
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
                  if p.is_dir() else []):
            st = f.stat()  # inode and change time too: a file copied over another, its mtime restored, is new
            files.add((str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return sorted(files)


def vector_key(vec: ChatVector) -> dict:
    """What a vector's deltas depend on, without when it was built: its recorded provenance (minus the creation
    time), its terms' coefficients, the files it reads, and the bytes of tensors it holds in memory."""
    def stable(meta):
        if isinstance(meta, dict):
            return {k: stable(v) for k, v in meta.items() if k != "created"}
        return [stable(m) for m in meta] if isinstance(meta, list) else meta

    in_memory = hashlib.sha256()
    for _, term in vec.terms:
        for src in term.sources().values():
            for name, tensor in sorted(getattr(src, "tensors", {}).items()):
                in_memory.update(name.encode())
                in_memory.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return {"metadata": stable(vec.metadata), "coefficients": [c for c, _ in vec.terms],
            "names": sorted(vec.names), "files": files_key(vec.input_paths()), "tensors": in_memory.hexdigest()}
