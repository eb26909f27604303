"""How bytes reach memory, and how they leave it again.

- ``MappedPages``: a tensor read through a private (copy-on-write) memory map is faulted in ahead of use with
  ``MADV_POPULATE_READ`` and its pages dropped after use (``MADV_DONTNEED``), so a pass over a large model keeps
  only the blocks it is working on resident;
- ``paged_rows``: walks a tensor's row blocks, faulting the next block in on one background I/O thread;
- ``read_blocks``: reads row blocks of a stored float32 vector into two reused buffers, a block ahead;
- ``Prefetcher``: reads the next whole tensor of a known order while the current one is used.

Each trick's measured gain is in the README (Benchmarks); all I/O threads are one pool (``io_pool``) except the
Prefetcher's own reader.
"""
from __future__ import annotations

import mmap
import sys
from typing import Iterator

import torch

from chatvec_lab.io.formats import itemsize, numel


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
        return 0, numel(shape), tuple(shape)
    row = numel(shape[1:])
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


def read_blocks(source, items) -> Iterator[tuple[str, object, torch.Tensor]]:
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

    largest = max((layout(i)[1] * itemsize(dtypes[n]) for i, (n, _) in enumerate(items)), default=0)
    slots = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]

    def read(i: int) -> None:
        name = items[i][0]
        first, count, _ = layout(i)
        size = itemsize(dtypes[name])
        if count:
            source.read_into(name, first * size, memoryview(slots[i % 2][:count * size].numpy()))

    pool = _io_pool()
    pending = pool.submit(read, 0) if items else None
    for i, (name, index) in enumerate(items):
        pending.result()
        if i + 1 < len(items):  # into the buffer of block i − 1, which the caller is done with
            pending = pool.submit(read, i + 1)
        _, count, shape = layout(i)
        size = itemsize(dtypes[name])
        yield name, index, slots[i % 2][:count * size].view(dtypes[name]).view(shape)


class Prefetcher:
    """Reads the next tensor of a known order in a background thread while the current one is used.

    File reads release the GIL, so reading overlaps computing; ``depth`` tensors are held ahead.
    """

    def __init__(self, source, order: list[str], depth: int = 1):
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


