"""The chat vector: ``θ_chat − θ_base``, a task vector you can add, scale, save and apply.

A ``ChatVector`` is lazy: it is a linear combination of *terms* (a difference of two models, a
saved vector, or tensors in memory: :mod:`chatvec_lab.core.terms`), evaluated one tensor at a time, a block of
rows at a time, in float32. So ``0.5 * (v1 + v2)`` costs nothing until a tensor is asked for, and extracting
from two 7B folders holds only a few tensors in memory.

    v = ChatVector.from_models("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")
    v.save("llama2-chat-vector")
    apply_vectors("my-cp-model", [(v, 1.0)], out="my-cp-chat")

How two models become a vector is in :mod:`chatvec_lab.core.extraction`; how a vector is saved and opened in
:mod:`chatvec_lab.core.storage`, and what its ``chatvec.json`` may hold in :mod:`chatvec_lab.core.metadata`.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from chatvec_lab.core.extraction import check_compatible, model_difference
from chatvec_lab.core.metadata import FORMAT, recorded_models, without_vocabulary
from chatvec_lab.core.storage import open_saved, save_vector
from chatvec_lab.core.terms import CHUNK_ELEMENTS, ModelDifference, StoredVector, Transformed, row_blocks
from chatvec_lab.errors import MismatchError, SourceError, UsageError, check_finite, require_bool
from chatvec_lab.io.formats import short_repr
from chatvec_lab.io.output import source_paths
from chatvec_lab.io.paging import paged_rows, read_blocks
from chatvec_lab.io.shards import DEFAULT_SHARD_BYTES
from chatvec_lab.io.sources import WeightSource, open_weights
from chatvec_lab.io.vocab import Vocabulary


def compile_pattern(pattern, what: str):
    """A regular expression from the user, or None; a one-line UsageError if it is not one."""
    if pattern is None or pattern == "":
        return None
    if not isinstance(pattern, str):
        raise UsageError(f"{what} must be a regular expression (str), not {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None




class ChatVector:
    """``Σ cᵢ · termᵢ``: a lazy map from tensor name to float32 delta.

    A term is a ``ModelDifference`` (chat − base, read from two models), a ``StoredVector`` (a saved vector) or
    a ``Transformed`` (computed per tensor from other vectors); :mod:`chatvec_lab.core.terms` says what each
    offers."""

    def __init__(self, terms: list[tuple[float, object]], shapes: dict[str, tuple[int, ...]], metadata: dict,
                 base_config: dict | None = None):
        self.terms = terms
        self.shapes = dict(shapes)
        self.metadata = metadata
        self.base_config = base_config
        self.vocabulary = Vocabulary.from_json(metadata.get("vocabulary"))
        rows = metadata.get("chat_rows") or []
        if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in rows):
            raise SourceError(f"a vector's chat_rows must be a list of row numbers (non-negative integers), "
                              f"not {short_repr(rows, 60)}")
        self.chat_rows = sorted(set(rows))

    # ------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, base, chat, allow_pickle: bool = False, hash_files: bool = True) -> "ChatVector":
        """``chat − base``. Both are opened lazily; names, shapes and architectures are checked now
        (:func:`chatvec_lab.core.extraction.model_difference`)."""
        require_bool(allow_pickle=allow_pickle, hash_files=hash_files)
        term, shapes, metadata, base_config = model_difference(base, chat, allow_pickle, hash_files)
        return cls([(1.0, term)], shapes, metadata, base_config=base_config)

    @classmethod
    def load(cls, path) -> "ChatVector":
        """Open a vector saved with :meth:`save` (lazily; its metadata checked now)."""
        source, shapes, metadata, base_config = open_saved(path)
        return cls([(1.0, StoredVector(source))], shapes, metadata, base_config=base_config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> "ChatVector":
        """A vector of the given deltas, held in memory (as float32)."""
        source = open_weights({k: v.detach().to(torch.float32) for k, v in tensors.items()})
        shapes = {n: source.shape(n) for n in source.keys()}
        return cls([(1.0, StoredVector(source))], shapes, {"format": FORMAT, **(metadata or {})})

    @classmethod
    def open(cls, spec) -> "ChatVector":
        """``spec`` itself if it is a vector, else the vector saved in the folder ``spec``."""
        return spec if isinstance(spec, ChatVector) else cls.load(spec)

    # ------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def blocks(self, name: str, rows: int | None = None, chunk: int = CHUNK_ELEMENTS, check: bool = True,
               copy: bool = True):
        """Yield ``(index, float32 delta block)`` over blocks of rows: each term's tensor is read once,
        and arithmetic happens a block at a time, so temporaries stay small whatever the tensor's size.
        With ``copy=False`` the blocks may be views of the source or reused buffers: read them, don't modify
        them, and don't keep them past asking for the next block."""
        if name not in self.shapes:
            raise KeyError(f"the vector has no tensor {name!r}")
        ahead = self._read_ahead([name], rows, chunk, check, copy)
        if ahead is not None:
            for _, index, block in ahead:
                yield index, block
            return
        active = [(coef, term) for coef, term in self.terms if coef != 0]
        indices = row_blocks(self.shapes[name], rows, chunk)
        sole = self._sole_stored(active, copy)
        live = [(coef, term, term.raw(name)) for coef, term in active]
        raws = [t for *_, raw in live for t in (raw if isinstance(raw, tuple) else (raw,))]
        # the terms' tensors are never written to here: their pages can be dropped once a block is done
        indices = paged_rows(raws, indices, release=True)
        if sole is not None and live[0][2].dtype == torch.float32:
            raw = live[0][2]  # views of the tensor
            for index in indices:
                if check:
                    check_finite(raw[index], f"tensor {name!r} in {sole.description}")
                yield index, raw[index]
            return
        for index in indices:
            total = None
            for coef, term, raw in live:
                d = term.block(raw, index)
                if check:
                    check_finite(d, f"tensor {name!r} in {term.description}")
                if coef != 1:
                    d.mul_(coef)  # multiply, then add: no fused multiply-add, so results equal the naive formula
                total = d if total is None else total.add_(d)
            if total is None:
                shape = self.shapes[name] if index is ... else (index.stop - index.start, *self.shapes[name][1:])
                total = torch.zeros(shape, dtype=torch.float32)
            yield index, total

    @staticmethod
    def _sole_stored(active, copy: bool):
        """The one stored vector read as it is (no arithmetic, so no copies needed), if that is the case."""
        if not copy and len(active) == 1 and active[0][0] == 1 and isinstance(active[0][1], StoredVector):
            return active[0][1]
        return None

    def _read_ahead(self, names: list[str], rows: int | None, chunk: int, check: bool, copy: bool):
        """For a stored float32 vector read with ``copy=False``: ``(name, index, block)`` of every block of
        ``names``, read into reused buffers a block ahead (across tensors); ``None`` for any other vector."""
        sole = self._sole_stored([(c, t) for c, t in self.terms if c != 0], copy)
        if sole is None or not sole.store.reads_ranges \
                or any(sole.store.dtype(name) != torch.float32 for name in names):
            return None
        items = [(name, index) for name in names for index in row_blocks(self.shapes[name], rows, chunk)]

        def checked():
            for name, index, block in read_blocks(sole.store, items):
                if check:
                    check_finite(block, f"tensor {name!r} in {sole.description}")
                yield name, index, block
        return checked()

    def stream(self, names: list[str], chunk: int = CHUNK_ELEMENTS, check: bool = True, copy: bool = True):
        """Yield ``(name, index, float32 delta block)`` for every block of every tensor of ``names``, in order:
        ``blocks`` of one tensor after another, except that a stored float32 vector read with ``copy=False``
        reads the next block, of this tensor or the next, while the caller uses the current one."""
        for name in names:
            if name not in self.shapes:
                raise KeyError(f"the vector has no tensor {name!r}")
        ahead = self._read_ahead(names, None, chunk, check, copy)
        if ahead is not None:
            yield from ahead
            return
        for name in names:
            for index, block in self.blocks(name, chunk=chunk, check=check, copy=copy):
                yield name, index, block

    def __getitem__(self, name: str) -> torch.Tensor:
        return next(self.blocks(name, chunk=1 << 62))[1]

    def row_reader(self, name: str):
        """A function ``rows → float32 rows of tensor name`` (any rows, in any order): the terms' tensors are opened
        once, for rows matched by token rather than read in blocks."""
        if name not in self.shapes:
            raise KeyError(f"the vector has no tensor {name!r}")
        live = [(coef, term, term.raw(name)) for coef, term in self.terms if coef != 0]

        def read(rows: torch.Tensor) -> torch.Tensor:
            total = torch.zeros((len(rows), *self.shapes[name][1:]), dtype=torch.float32)
            for coef, term, raw in live:
                d = term.gather(raw, rows)
                if coef != 1:
                    d.mul_(coef)
                total.add_(d)
            return total
        return read

    @contextlib.contextmanager
    def prefetching(self, order: list[str], depth: int = 1):
        """Within the block, tensors are read ahead in ``order`` by background threads."""
        from chatvec_lab.io.paging import Prefetcher

        saved = []
        for _, term in self.terms:
            if hasattr(term, "set_sources"):
                originals = term.sources()
                if any(isinstance(src, Prefetcher) for src in originals.values()):
                    continue  # a term shared with another vector already reads ahead
                saved.append((term, originals))
                term.set_sources(*[Prefetcher(src, order, depth) for src in originals.values()])
        try:
            yield self
        finally:
            for term, originals in saved:
                for pf in term.sources().values():
                    pf.close()
                term.set_sources(*originals.values())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes:
            yield name, self[name]

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """The base model's tensor, when this vector was built from a base it can still read."""
        for _, term in self.terms:
            if isinstance(term, ModelDifference):
                return term.base_tensor(name)
        return None

    def recorded_base(self) -> Path | None:
        """The local folder of the base this vector records (absolute since 0.1), if it still exists."""
        meta = self.metadata.get("base")
        path = (meta.get("path") or meta.get("source")) if isinstance(meta, dict) else None
        return Path(path) if isinstance(path, str) and os.path.isdir(path) else None

    @property
    def base_source(self) -> WeightSource | None:
        for _, term in self.terms:
            if isinstance(term, ModelDifference):
                return term.base
        return None

    def input_paths(self) -> list[Path]:
        """The files and folders this vector reads or was made from (the base and chat it records, where they are
        local paths): an output may not be, contain or sit inside any of them."""
        paths = [p for _, term in self.terms for src in term.sources().values() for p in source_paths(src)]
        for meta in recorded_models(self.metadata):
            source = meta.get("path") or meta.get("source")  # absolute since 0.1; relative to the cwd before
            if isinstance(source, str) and os.path.exists(source):
                paths.append(Path(source))
        return paths

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def norm(self) -> float:
        """L2 norm over all tensors, streamed."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for _, t in self.items()))

    def materialize(self) -> "ChatVector":
        """Evaluate every tensor now and keep them in memory."""
        return ChatVector.from_tensors(dict(self.items()), metadata=self.metadata)

    # ------------------------------------------------------------ arithmetic
    def _combine(self, other: "ChatVector", sign: float) -> "ChatVector":
        if not isinstance(other, ChatVector):
            return NotImplemented
        check_compatible(self, other)
        terms = self.terms + [(sign * c, t) for c, t in other.terms]
        meta = {"format": FORMAT, "combination_of": [without_vocabulary(self.metadata),
                                                      without_vocabulary(other.metadata)], "signs": [1, sign]}
        if self.vocabulary is not None:
            meta |= {"vocabulary": self.vocabulary.to_json(), "chat_rows": self.chat_rows}
        return ChatVector(terms, self.shapes, meta, base_config=self.base_config or other.base_config)

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum() work
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1.0)

    __array_ufunc__ = None  # `np.float64(0.5) * v`: numpy defers to __rmul__ instead of making an array of v

    def __mul__(self, scalar):
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool) and hasattr(scalar, "__float__"):
            scalar = float(scalar)  # numpy and torch scalars
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        meta = {**self.metadata, "scaled_by": scalar * self.metadata.get("scaled_by", 1.0)}
        return ChatVector([(scalar * c, t) for c, t in self.terms], self.shapes, meta, self.base_config)

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    def select(self, include: str | None = None, exclude: str | None = None) -> "ChatVector":
        """Keep only tensors whose name matches ``include`` and not ``exclude`` (regexes, ``re.search``)."""
        inc = compile_pattern(include, "include")
        exc = compile_pattern(exclude, "exclude")
        shapes = {n: s for n, s in self.shapes.items()
                  if (inc is None or inc.search(n)) and not (exc and exc.search(n))}
        if not shapes:
            raise MismatchError(f"no tensor of the vector matches include={include!r} exclude={exclude!r}")
        meta = {**self.metadata, "selected": {"include": include, "exclude": exclude}}
        return ChatVector(self.terms, shapes, meta, self.base_config)

    # ------------------------------------------------------------ per-tensor transforms (lazy)
    def transformed(self, fn, transform: dict) -> "ChatVector":
        """A lazy vector whose tensor ``name`` is ``fn(name, self[name])`` (a new float32 tensor of the same
        shape); ``transform`` describes it in the metadata."""
        source = self

        def compute(name: str) -> torch.Tensor:
            out = fn(name, source[name])
            if tuple(out.shape) != tuple(source.shapes[name]):
                raise MismatchError(f"transform {transform} changed the shape of {name!r}")
            return out.to(torch.float32)
        meta = {**self.metadata, "transform": transform}
        term = Transformed(compute, [self], f"{transform.get('kind')} of the vector")
        return ChatVector([(1.0, term)], self.shapes, meta, self.base_config)

    def low_rank(self, rank: int, method: str = "auto", seed: int = 0) -> "ChatVector":
        """Each matrix (2-D tensor) replaced by its best rank-``rank`` approximation (truncated SVD; randomized
        for matrices with both sides ≥ 2,048, see ``transforms.low_rank``); 1-D tensors are kept whole."""
        from chatvec_lab.core.transforms import check_rank, low_rank

        check_rank(rank, method)  # now, not at the first tensor
        if rank == 0:
            raise UsageError("rank must be at least 1 (rank 0 would zero every matrix), as for --rank")
        return self.transformed(lambda name, t: low_rank(t, rank, method, seed) if t.dim() == 2 else t.clone(),
                                {"kind": "low_rank", "rank": rank, "method": method, "seed": seed})

    def trim(self, density: float) -> "ChatVector":
        """Keep the ``density`` share of each tensor's entries with the largest |value| (TIES' trim)."""
        from chatvec_lab.core.transforms import check_settings, magnitude

        check_settings(density)
        return self.transformed(lambda name, t: magnitude(t, density), {"kind": "trim", "density": density})

    def dare(self, density: float, seed: int = 0, rescale: str | None = "l1") -> "ChatVector":
        """DARE: keep each entry with probability ``density`` (seeded per tensor), rescaled to the tensor's L1
        norm (``l1``, as mergekit), by 1/density (``inverse``, the paper) or not (``None``)."""
        from chatvec_lab.core.transforms import bernoulli, check_settings

        check_settings(density, rescale=rescale)
        return self.transformed(lambda name, t: bernoulli(t, density, seed, name, rescale),
                                {"kind": "dare", "density": density, "seed": seed, "rescale": rescale})

    def breadcrumbs(self, density: float, gamma: float = 0.01) -> "ChatVector":
        """Model breadcrumbs: drop the ``gamma`` share of largest entries and the smallest, keeping ``density``."""
        from chatvec_lab.core.transforms import check_settings, magnitude_outliers

        check_settings(density, gamma)
        return self.transformed(lambda name, t: magnitude_outliers(t, density, gamma),
                                {"kind": "breadcrumbs", "density": density, "gamma": gamma})

    def low_rank_bytes(self, rank: int) -> int:
        """Bytes a rank-``rank`` factorisation stores in float32: r·(m + n) per matrix, 1-D tensors whole."""
        return 4 * sum(min(rank, min(s)) * (s[0] + s[1]) if len(s) == 2 else math.prod(s)
                       for s in self.shapes.values())

    # ------------------------------------------------------------ saving
    def save(self, path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: bool = False) -> Path:
        """Write float32 safetensors shards + ``chatvec.json`` atomically; returns the folder. Each tensor is
        streamed in blocks of rows, checked and written block by block (:func:`chatvec_lab.core.storage.save_vector`)."""
        return save_vector(self, path, overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)

    def __repr__(self) -> str:
        return f"<ChatVector {len(self)} tensors, {self.parameters:,} parameters, {len(self.terms)} term(s)>"


def named_vectors(vectors) -> dict[str, "ChatVector"]:
    """The one rule for naming vectors: ``{name: vector}`` from a vector, a saved vector's folder, a list of
    either, or a dict (kept as given). A folder is named by its last component; two folders with the same
    last component (``/a/cv``, ``/b/cv``) are named by their whole paths, so no vector is ever dropped; a
    vector object in a list is ``v1``, ``v2`` … by position, a lone vector object ``vector``. The same folder
    twice (however it is spelled) is an error."""
    if isinstance(vectors, (ChatVector, str, os.PathLike)):
        vectors = [vectors]
    if isinstance(vectors, dict):
        if not vectors:
            raise UsageError("no vector given")
        return {str(k): ChatVector.open(v) for k, v in vectors.items()}
    vectors = list(vectors)
    if not vectors:
        raise UsageError("no vector given")
    if len(vectors) == 1 and isinstance(vectors[0], ChatVector):
        return {"vector": vectors[0]}

    def names(whole: bool) -> list[str]:
        return [f"v{i + 1}" if isinstance(v, ChatVector) else
                (str(v) if whole else Path(os.fspath(v)).name or str(v)) for i, v in enumerate(vectors)]
    folders = [os.path.realpath(os.fspath(v)) for v in vectors if not isinstance(v, ChatVector)]
    if len(set(folders)) < len(folders):
        raise UsageError(f"the same vector folder is given twice: {[os.fspath(v) for v in vectors if not isinstance(v, ChatVector)]}")
    chosen = names(False)
    if len(set(chosen)) < len(chosen):
        chosen = names(True)
    if len(set(chosen)) < len(chosen):
        raise UsageError(f"the same vector is given twice: {chosen}")
    return {name: ChatVector.open(v) for name, v in zip(chosen, vectors)}


def extract(base, chat, out=None, overwrite: bool = False, allow_pickle: bool = False,
            progress: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ChatVector:
    """``chat − base``; saved to ``out`` when given."""
    require_bool(overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    vector = ChatVector.from_models(base, chat, allow_pickle=allow_pickle)
    if out is not None:
        vector.save(out, overwrite=overwrite, progress=progress, max_shard_bytes=max_shard_bytes)
        return ChatVector.load(out)
    return vector
