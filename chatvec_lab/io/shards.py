"""The sharded safetensors writer: tensors streamed, in a planned order, into ``{prefix}-0000i-of-0000n.safetensors``.

Every tensor's name, shape and dtype is known before any is computed (they come from the target or the
vector), so the shards and their headers are planned up front and each tensor is written straight to disk as
soon as it is ready: no shard is ever buffered in memory. The folder it writes into is an output's temporary
folder (:func:`chatvec_lab.io.output.atomic_folder`): it becomes the output only when complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from chatvec_lab.errors import UsageError
from chatvec_lab.io.formats import ST_DTYPE_NAMES, itemsize, numel
from chatvec_lab.io.output import write_json

DEFAULT_SHARD_BYTES = 4 * 1024**3


class ShardedSafetensorsWriter:
    """Write tensors, in a planned order, into shards ``{prefix}-0000i-of-0000n.safetensors``.

    ``plan`` lists ``(name, shape, dtype)``. Each tensor is given once, either

    * whole, ``write(name, tensor)``, in any order (tensors that arrive early wait in memory until
      their turn, so plan order = arrival order keeps memory at one tensor); or
    * as a stream of row blocks, ``write_blocks(name, blocks)``, when it is the next tensor of the plan:
      each block goes straight to the shard file, so memory stays at one block whatever the tensor's size.

    The bytes written are the same either way. ``close()`` writes the index json when there are several
    shards. A ``write_blocks`` that fails after writing part of its tensor leaves the shard incomplete:
    the writer then refuses further writes and ``close()`` (abandon its folder).
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], prefix: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 background: bool = False):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise UsageError(f"max_shard_bytes must be a positive integer, not {max_shard_bytes!r}")
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
            nbytes = numel(entry[1]) * itemsize(entry[2])
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
        self.rank = {e[0]: i for i, (_, e) in enumerate(self.order)}
        self.position = 0
        self.pending: dict[str, torch.Tensor] = {}
        self.file = None
        self.current = None
        self.total_bytes = 0
        self.failed: str | None = None  # the tensor whose streamed write failed part-way

    def _open(self, fname: str, entries) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = numel(shape) * itemsize(dtype)
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.folder / fname, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.current = fname

    def _shard_for(self, fname: str) -> None:
        """Make ``fname`` the open shard (closing the previous one)."""
        if self.current != fname:
            if self.file:
                self.file.close()
            self._open(fname, dict(self.shards)[fname])

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise ValueError(f"the write of tensor {self.failed!r} failed part-way: this writer's output is "
                             "incomplete and takes no more tensors")

    def write(self, name: str, tensor) -> None:
        """Write ``tensor`` whole; a tensor given as an iterable of row blocks is streamed (see :meth:`write_blocks`)."""
        if not isinstance(tensor, torch.Tensor):
            self._write_stream(name, tensor)
            return
        self._check_usable()
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

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name`` from ``blocks``: consecutive blocks of its rows, in order (``b.shape[1:]`` equal
        to the tensor's ``shape[1:]``, their rows summing to ``shape[0]``; a 0-d tensor is one 0-d block), of
        its planned dtype. ``name`` must be the next tensor of the plan not yet written. Each block is written
        to the shard file before the next is asked for, so the blocks may be reused buffers or views.
        The blocks go through :meth:`write`, so a wrapper of ``write`` sees every tensor."""
        self.write(name, iter(blocks))

    def _write_stream(self, name: str, blocks) -> None:
        self._check_usable()
        if name not in self.expected:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        if not isinstance(blocks, Iterable):
            raise TypeError(f"tensor {name!r}: expected a tensor or an iterable of row blocks, "
                            f"not {type(blocks).__name__}")
        self._wait()
        self._drain()  # tensors that arrived early and are next in line
        if name in self.pending or self.rank[name] < self.position:
            raise ValueError(f"tensor {name!r} was already written")
        nxt = self.order[self.position][1][0]
        if nxt != name:
            raise ValueError(f"tensor {name!r} cannot be streamed now: the next tensor of the write plan is "
                             f"{nxt!r} (streamed tensors are written in plan order)")
        fname, (_, shape, dtype) = self.order[self.position]
        shape = tuple(shape)
        rows, seen, done, started = (shape[0] if shape else None), 0, 0, False
        self._shard_for(fname)
        try:
            for block in blocks:
                if not isinstance(block, torch.Tensor):
                    raise ValueError(f"tensor {name!r}: a block must be a tensor, not {type(block).__name__}")
                bshape = tuple(block.shape)
                if block.dtype != dtype:
                    raise ValueError(f"tensor {name!r}: planned {dtype}, got a block of {block.dtype}")
                if rows is None:  # a 0-d tensor: one 0-d block
                    if bshape != ():
                        raise ValueError(f"tensor {name!r}: planned a 0-d tensor, got a block of shape {bshape}")
                    if seen:
                        raise ValueError(f"tensor {name!r}: planned a 0-d tensor, got more than one block")
                    seen = 1
                else:
                    if len(bshape) != len(shape) or bshape[1:] != shape[1:]:
                        raise ValueError(f"tensor {name!r}: planned {shape}, got a block of shape {bshape} "
                                         f"(blocks of rows have shape (rows, {', '.join(map(str, shape[1:]))}))")
                    if seen + bshape[0] > rows:
                        raise ValueError(f"tensor {name!r}: planned {rows} rows, the blocks give more "
                                         f"({seen + bshape[0]} so far)")
                    seen += bshape[0]
                t = block.detach().to("cpu").contiguous()
                if t.numel():
                    started = True
                    self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    done += t.numel() * t.element_size()
                del t, block  # the producer may free or reuse it for the next block
            if rows is None and not seen:
                raise ValueError(f"tensor {name!r}: planned a 0-d tensor, the blocks give none")
            if rows is not None and seen != rows:
                raise ValueError(f"tensor {name!r}: planned {rows} rows {shape}, the blocks give {seen}")
        except BaseException:
            if started:  # part of the tensor is in the file: what follows would be misplaced
                self.failed = name
            raise
        self.total_bytes += done
        self.position += 1
        self._drain()

    def _drain(self) -> None:
        while self.position < len(self.order) and self.order[self.position][1][0] in self.pending:
            fname, (pname, _, _) = self.order[self.position]
            self._shard_for(fname)
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
        self._check_usable()
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
