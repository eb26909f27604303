"""The terms a chat vector sums, and the blocks of rows they are read in.

A :class:`~chatvec_lab.core.vector.ChatVector` is ``Σ cᵢ · termᵢ``. A term is one of

* ``ModelDifference``: chat − base, read from two models (what extraction builds);
* ``StoredVector``: a saved vector (or tensors in memory);
* ``Transformed``: computed per tensor from other vectors (low rank, trimming, DARE, merges).

Each has ``raw(name)`` (what it reads for one tensor), ``block(raw, index)`` and ``gather(raw, rows)`` (float32
deltas of a block of rows or of chosen rows, new tensors), ``sources()`` (the weight sources it reads) and
``description``; the first two also ``set_sources(...)`` (read-ahead swaps them). Tensors are read a block of
whole rows at a time (``row_blocks``), so temporaries stay small whatever a tensor's size.
"""
from __future__ import annotations

import math

import torch

from chatvec_lab.io.sources import WeightSource

CHUNK_ELEMENTS = 1 << 20  # rows are processed in blocks of about this many values (4 MB in float32)


def row_blocks(shape: tuple[int, ...], rows: int | None = None, chunk: int = CHUNK_ELEMENTS):
    """Index blocks of whole rows covering the first ``rows`` rows (all by default)."""
    if len(shape) == 0:
        yield ...
        return
    n = shape[0] if rows is None else rows
    if n == 0 or math.prod(shape[1:]) == 0:  # no values: one block, however many (empty) rows
        yield slice(0, n)
        return
    per_row = math.prod(shape[1:])
    step = max(1, chunk // per_row)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class ModelDifference:
    """chat − base, with the last base tensor kept for the lineage check of ``apply``.

    ``base_rows`` (token-indexed tensors whose vocabularies differ): for each chat row, the base row of the same
    token, or -1 for a token the chat model added; such rows hold the chat model's own row, not a difference."""

    def __init__(self, base: WeightSource, chat: WeightSource, base_rows: dict[str, torch.Tensor] | None = None):
        self.base, self.chat = base, chat
        self.base_rows = base_rows or {}
        self.last_base: tuple[str, torch.Tensor] | None = None
        self.description = f"base {base.description} or chat {chat.description}"

    def raw(self, name: str):
        b, c = self.base.get(name), self.chat.get(name)
        self.last_base = (name, b)
        return c, b, self.base_rows.get(name)

    @staticmethod
    def block(raw, index) -> torch.Tensor:
        c, b, base_rows = raw
        if base_rows is None:
            return c[index].to(torch.float32) - b[index].to(torch.float32)
        return ModelDifference.gather(raw, torch.arange(c.shape[0])[index])

    @staticmethod
    def gather(raw, rows: torch.Tensor) -> torch.Tensor:
        """The delta of the given rows (a new float32 tensor)."""
        c, b, base_rows = raw
        out = c[rows].to(torch.float32)
        at = base_rows[rows] if base_rows is not None else rows
        known = at >= 0
        out[known] -= b[at[known]].to(torch.float32)
        return out

    def base_tensor(self, name: str) -> torch.Tensor:
        if self.last_base and self.last_base[0] == name:
            return self.last_base[1]
        return self.base.get(name)

    def sources(self) -> dict[str, WeightSource]:
        return {"base": self.base, "chat": self.chat}

    def set_sources(self, base, chat) -> None:
        self.base, self.chat = base, chat


class StoredVector:
    """A saved vector's tensors (or tensors in memory), read as they are."""

    def __init__(self, source: WeightSource):
        self.source = source  # may be swapped for a Prefetcher around ``store``
        self.store = source
        self.description = source.description

    def raw(self, name: str):
        return self.source.get(name)

    def sources(self) -> dict[str, WeightSource]:
        return {"source": self.source}

    def set_sources(self, source) -> None:
        self.source = source

    @staticmethod
    def block(raw, index) -> torch.Tensor:
        return raw[index].to(torch.float32, copy=True)  # always a new tensor: callers scale it in place

    @staticmethod
    def gather(raw, rows: torch.Tensor) -> torch.Tensor:
        return raw[rows].to(torch.float32)


class Transformed:
    """A term computed per tensor from other vectors (low rank, trimming, DARE, merges): tensor ``name`` is
    ``fn(name)``, made whole when asked for, from the input vectors' own tensors (also lazy). ``inputs``: those
    vectors (``ChatVector``s)."""

    def __init__(self, fn, inputs: list, description: str):
        self.fn, self.inputs, self.description = fn, inputs, description

    def raw(self, name: str) -> torch.Tensor:
        return self.fn(name)

    @staticmethod
    def block(raw, index) -> torch.Tensor:
        return raw[index].clone()

    @staticmethod
    def gather(raw, rows: torch.Tensor) -> torch.Tensor:
        return raw[rows].clone()

    def sources(self) -> dict[str, WeightSource]:
        return {f"{i}.{j}.{key}": src for i, vec in enumerate(self.inputs) for j, (_, term) in enumerate(vec.terms)
                for key, src in term.sources().items()}
