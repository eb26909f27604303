"""Writing outputs: atomic folders and streamed, sharded safetensors.

Every tensor's name, shape and dtype is known before any is computed (they come from the
target or the vector), so the shards and their headers are planned up front and each tensor is
written straight to disk as soon as it is ready: no shard is ever buffered in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from chatvec_lab.errors import OutputError
from chatvec_lab.sources import ST_DTYPE_NAMES, _itemsize, _numel

DEFAULT_SHARD_BYTES = 4 * 1024**3


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if ``out`` exists (and may not be replaced) or cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists (pass overwrite=True / --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out}: {probe} is not a writable folder")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; rename it to ``out`` only if the block succeeds."""
    out = check_output_path(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.absolute().parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class ShardedSafetensorsWriter:
    """Write tensors, in a planned order, into shards ``{prefix}-0000i-of-0000n.safetensors``.

    ``plan`` lists ``(name, shape, dtype)``; call ``write(name, tensor)`` for each, in any order
    (tensors that arrive early wait in memory until their turn, so plan order = arrival order
    keeps memory at one tensor). ``close()`` writes the index json when there are several shards.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], prefix: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 background: bool = False):
        self.folder = Path(folder)
        self.pool = None
        self.inflight = None
        if background:  # file writes overlap the computation of the next tensor (one write in flight)
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvec-write")
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _numel(entry[1]) * _itemsize(entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.shards = []
        for i, entries in enumerate(shards):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            self.shards.append((fname, entries))
        self.order = [(fname, e) for fname, entries in self.shards for e in entries]
        self.expected = {e[0]: e for _, e in self.order}
        self.position = 0
        self.pending: dict[str, torch.Tensor] = {}
        self.file = None
        self.current = None
        self.total_bytes = 0

    def _open(self, fname: str, entries) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.folder / fname, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.current = fname

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        _, shape, dtype = self.expected[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: planned {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self._wait()
        self.pending[name] = tensor
        if self.pool is None:
            self._drain()
        else:
            self.inflight = self.pool.submit(self._drain)

    def _drain(self) -> None:
        while self.position < len(self.order) and self.order[self.position][1][0] in self.pending:
            fname, (pname, _, _) = self.order[self.position]
            if self.current != fname:
                if self.file:
                    self.file.close()
                self._open(fname, dict(self.shards)[fname])
            t = self.pending.pop(pname).detach().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            self.file.write(memoryview(data))
            self.total_bytes += t.numel() * t.element_size()
            self.position += 1

    def _wait(self) -> None:
        if self.inflight is not None:
            self.inflight.result()
            self.inflight = None

    def abort(self) -> None:
        """Stop writing (after an error): wait for the write in flight and close the file."""
        try:
            self._wait()
        except Exception:
            pass
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.file:
            self.file.close()
            self.file = None

    def close(self) -> list[str]:
        self._wait()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.position != len(self.order):
            missing = self.order[self.position][1][0]
            raise ValueError(f"write plan incomplete: tensor {missing!r} was never written")
        if self.file:
            self.file.close()
            self.file = None
        if len(self.shards) > 1:
            weight_map = {name: fname for fname, entries in self.shards for name, _, _ in entries}
            write_json(self.folder / f"{self.prefix}.safetensors.index.json",
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return [fname for fname, _ in self.shards]
