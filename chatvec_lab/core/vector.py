"""The chat vector: ``θ_chat − θ_base``, a task vector you can add, scale, save and apply.

A ``ChatVector`` is lazy: it is a linear combination of *terms* (a difference of two models, a
saved vector, or tensors in memory), evaluated one tensor at a time, in float32. So
``0.5 * (v1 + v2)`` costs nothing until a tensor is asked for, and extracting from two 7B
folders holds only a few tensors in memory.

    v = ChatVector.from_models("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")
    v.save("llama2-chat-vector")
    apply_vectors("my-cp-model", [(v, 1.0)], out="my-cp-chat")
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from chatvec_lab.errors import MismatchError, NonFiniteError, SourceError, UsageError, require_bool
from chatvec_lab.io.output import DEFAULT_SHARD_BYTES, ShardedSafetensorsWriter, atomic_folder, source_paths, write_json
from chatvec_lab.io.naming import parse
from chatvec_lab.io.formats import json_type, read_json_object, short_repr
from chatvec_lab.io.paging import paged_rows, read_blocks
from chatvec_lab.io.sources import WeightSource, open_weights
from chatvec_lab.version import __version__
from chatvec_lab.io.vocab import Vocabulary, row_map

METADATA_FILE = "chatvec.json"
BASE_CONFIG_FILE = "base_config.json"
FORMAT = "chatvec/1"


CHUNK_ELEMENTS = 1 << 20  # rows are processed in blocks of about this many values (4 MB in float32)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Raise if ``tensor`` holds NaN/Inf. A sum is finite only if every term is: one cheap pass."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteError(f"tensor {name!r} in {where} holds {bad} NaN/Inf values")


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


def _list_names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_same_architecture(a: WeightSource, b: WeightSource, a_label: str, b_label: str) -> None:
    ca, cb = a.config, b.config
    if ca and cb:
        ta, tb = ca.get("model_type"), cb.get("model_type")
        if ta and tb and ta != tb:
            raise MismatchError(f"{a_label} is a {ta!r} model but {b_label} is a {tb!r} model: "
                                "a chat vector needs two models of one architecture")


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
    ``fn(name)``, made whole when asked for, from the input vectors' own tensors (also lazy)."""

    def __init__(self, fn, inputs: list["ChatVector"], description: str):
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


def _chat_to_base_rows(chat_rows: int, base_rows: int, chat: Vocabulary, base: Vocabulary) -> torch.Tensor:
    """For each chat row, the base row of the same token (-1: a token the chat model added). Rows past a
    vocabulary's end (padding) match by index."""
    out = row_map(chat_rows, chat, base)
    out[out >= base_rows] = -1
    for j in range(len(chat), min(chat_rows, base_rows)):
        if j >= len(base):
            out[j] = j
    return out


def without_vocabulary(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != "vocabulary"}


def _recorded(metadata: dict) -> Iterator[dict]:
    """The base and chat fingerprints recorded in a vector's metadata, through combinations of vectors."""
    if not isinstance(metadata, dict):
        return
    for key in ("base", "chat"):
        if isinstance(metadata.get(key), dict):
            yield metadata[key]
    for part in metadata.get("combination_of") or []:
        yield from _recorded(part)


# ------------------------------------------------------------------ a saved vector's metadata, read strictly

METADATA_KEYS = frozenset({"format", "base", "chat", "source_dtype", "dtype", "tensors", "parameters",
                           "chatvec_lab_version", "created", "vocabulary", "chat_rows", "special_tokens", "shards",
                           "combination_of", "signs", "scaled_by", "selected", "transform", "merge"})


def padding_allowance(rows: int) -> int:
    """How many rows of a token-indexed tensor may lie past its vocabulary as padding: checkpoints pad their
    embeddings to a multiple of 64 or 128 (a few to ~2 % more, DeepSeek's 102,400 rows for 100,015 tokens);
    never half the rows."""
    return min(max(rows // 32, 127), rows // 2)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fingerprint(value, field: str, bad) -> None:
    if not isinstance(value, dict):
        raise bad(field, f"is {json_type(value)}, not an object (the model the vector was built from)")
    for key in ("source", "path", "revision"):
        if key in value and value[key] is not None and not isinstance(value[key], str):
            raise bad(f"{field}.{key}", f"is {json_type(value[key])}, not a string")
    sha = value.get("sha256")
    if sha is not None and not (isinstance(sha, dict) and all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in sha.items())):
        raise bad(f"{field}.sha256", "is not an object of file name → 64 hex digits")


def _check_recorded(meta, field: str, bad, depth: int = 0) -> None:
    """The parts of a (nested) metadata object that the lab reads: recorded models, combinations, scaling."""
    if depth > 32:
        raise bad(field, "nests combinations more than 32 deep")
    for key in ("base", "chat"):
        if key in meta and meta[key] is not None:
            _check_fingerprint(meta[key], f"{field}{key}", bad)
    if "combination_of" in meta:
        parts = meta["combination_of"]
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise bad(f"{field}combination_of", "is not a list of objects (the metadata of each vector combined)")
        for i, part in enumerate(parts):
            _check_recorded(part, f"{field}combination_of[{i}].", bad, depth + 1)
    if "signs" in meta and not (isinstance(meta["signs"], list) and all(_is_number(x) for x in meta["signs"])):
        raise bad(f"{field}signs", "is not a list of finite numbers")
    if "scaled_by" in meta and not _is_number(meta["scaled_by"]):
        raise bad(f"{field}scaled_by", f"is {short_repr(meta['scaled_by'], 40)}, not a finite number")
    for key in ("selected", "transform", "merge"):
        if key in meta and not isinstance(meta[key], dict):
            raise bad(f"{field}{key}", f"is {json_type(meta[key])}, not an object")


def check_vector_metadata(metadata: dict, shapes: dict[str, tuple[int, ...]], where, files=None) -> None:
    """Refuse, in one line naming the field, a saved vector's ``chatvec.json`` whose values the lab would misread:
    wrong types, rows out of range or repeated, a vocabulary that does not fit the token-indexed tensors (shorter
    by more than padding: the deltas of the rows it leaves out would be dropped), shards other than the files
    read, a misspelt key. ``files``: the weight files the vector was opened from. Runs before anything is written."""
    def bad(field: str, why: str) -> SourceError:
        return SourceError(f"bad chat vector metadata {where}: {field!r} {why}")

    import difflib

    for key in metadata:
        close = difflib.get_close_matches(key, METADATA_KEYS, n=1, cutoff=0.75)
        if key not in METADATA_KEYS and close:
            raise bad(key, f"is not a field of a chat vector: {close[0]!r} was probably meant")
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT:
        raise bad("format", f"is {short_repr(fmt, 40)}; this version reads {FORMAT!r}")
    for key in ("source_dtype", "dtype", "created", "chatvec_lab_version"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise bad(key, f"is {json_type(metadata[key])}, not a string")
    if metadata.get("dtype") not in (None, "float32"):
        raise bad("dtype", f"is {metadata['dtype']!r}: a saved vector holds float32 tensors")
    for key in ("tensors", "parameters"):
        if key in metadata and not (_is_int(metadata[key]) and metadata[key] >= 0):
            raise bad(key, f"is {short_repr(metadata[key], 40)}, not a non-negative integer")
    _check_recorded(metadata, "", bad)

    token_rows = {n: s[0] for n, s in shapes.items() if len(s) >= 1 and parse(n).is_token_indexed}
    vocab = metadata.get("vocabulary")
    if vocab is not None:
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise bad("vocabulary", "is not a list of token strings (the token of each row)")
        for name, rows in token_rows.items():
            if rows - len(vocab) > padding_allowance(rows):
                raise bad("vocabulary", f"lists {len(vocab)} tokens but {name!r} has {rows} rows: the deltas of "
                                        f"{rows - len(vocab)} rows would belong to no token (more than padding)")
    chat_rows = metadata.get("chat_rows")
    if chat_rows is not None:
        if not isinstance(chat_rows, list) or not all(_is_int(i) for i in chat_rows):
            raise bad("chat_rows", "is not a list of row numbers (integers)")
        if len(set(chat_rows)) != len(chat_rows):
            dup = next(i for i in chat_rows if chat_rows.count(i) > 1)
            raise bad("chat_rows", f"lists row {dup} twice")
        if chat_rows and vocab is None:
            raise bad("chat_rows", "needs a 'vocabulary': rows of tokens the chat model added belong to its tokens")
        rows = max(token_rows.values(), default=None)
        wrong = next((i for i in chat_rows if i < 0 or (rows is not None and i >= rows)), None)
        if wrong is not None:
            raise bad("chat_rows", f"holds row {wrong}, outside the token-indexed tensors' rows 0..{(rows or 1) - 1}")
    special = metadata.get("special_tokens")
    if special is not None and not (isinstance(special, list) and all(isinstance(t, str) for t in special)):
        raise bad("special_tokens", "is not a list of token strings")
    shards = metadata.get("shards")
    if shards is not None:
        if not (isinstance(shards, list) and all(isinstance(f, str) and f and Path(f).name == f and f.endswith(
                ".safetensors") for f in shards)):
            raise bad("shards", "is not a list of .safetensors file names in the vector's folder")
        if len(set(shards)) != len(shards):
            raise bad("shards", "lists a file twice")
        if files is not None and set(shards) != {Path(f).name for f in files}:
            extra = sorted({Path(f).name for f in files} - set(shards))
            missing = sorted(set(shards) - {Path(f).name for f in files})
            raise bad("shards", f"lists {missing[0]}, which is not among the vector's weight files" if missing else
                      f"does not list {extra[0]}, which lies beside it (a file that is not this vector's)")


def check_compatible(a: "ChatVector", b: "ChatVector") -> None:
    """Two vectors can be combined: the same tensors, shapes and token rows; else which tensor and why."""
    missing, extra = set(a.shapes) - set(b.shapes), set(b.shapes) - set(a.shapes)
    if missing or extra:
        detail = (f"only the left has {_list_names(missing)}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"only the right has {_list_names(extra)}" if extra else "")
        raise MismatchError(f"cannot combine vectors with different tensors: {detail}")
    for name, shape in a.shapes.items():
        if b.shapes[name] != shape:
            raise MismatchError(f"cannot combine vectors: {name!r} is {shape} in one and {b.shapes[name]} in the other")
    if a.vocabulary != b.vocabulary or a.chat_rows != b.chat_rows:
        raise MismatchError("cannot combine vectors whose token rows belong to different vocabularies")


class ChatVector:
    """``Σ cᵢ · termᵢ``: a lazy map from tensor name to float32 delta.

    A term is one of ``ModelDifference`` (chat − base, read from two models), ``StoredVector`` (a saved
    vector) or ``Transformed`` (computed per tensor from other vectors). Each has ``raw(name)`` (what it
    reads for one tensor), ``block(raw, index)`` and ``gather(raw, rows)`` (float32 deltas of row blocks or
    chosen rows, new tensors), ``sources()`` (the weight sources it reads) and ``description``; the first two
    also ``set_sources(...)`` (read-ahead swaps them)."""

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
        """``chat − base``. Both are opened lazily; names, shapes and architectures are checked now."""
        require_bool(allow_pickle=allow_pickle, hash_files=hash_files)
        b = open_weights(base, allow_pickle=allow_pickle)
        c = open_weights(chat, allow_pickle=allow_pickle)
        check_same_architecture(b, c, f"base {b.description}", f"chat {c.description}")
        missing, extra = set(b.keys()) - set(c.keys()), set(c.keys()) - set(b.keys())
        if missing:
            raise MismatchError(f"chat {c.description} lacks tensors of base {b.description}: {_list_names(missing)}")
        if extra:
            raise MismatchError(f"chat {c.description} has tensors that base {b.description} lacks: {_list_names(extra)}")
        base_vocab, chat_vocab = Vocabulary.of_folder(b.folder), Vocabulary.of_folder(c.folder)
        shapes, base_rows = {}, {}
        for name in b.keys():
            if not b.dtype(name).is_floating_point:
                continue  # integer buffers (e.g. position ids) are not weights
            bshape, cshape = tuple(b.shape(name)), tuple(c.shape(name))
            token_rows = parse(name).is_embedding_like and bshape[1:] == cshape[1:] and len(bshape) >= 1
            if token_rows and base_vocab and chat_vocab and (bshape != cshape or base_vocab != chat_vocab):
                base_rows[name] = _chat_to_base_rows(cshape[0], bshape[0], chat_vocab, base_vocab)
            elif bshape != cshape:
                hint = (" (a vocabulary that grew: give both models their tokenizers, so rows can be matched by token)"
                        if token_rows else "")
                raise MismatchError(f"shape mismatch for {name!r}: base {bshape} vs chat {cshape}{hint}")
            shapes[name] = cshape
        if not shapes:
            raise MismatchError(f"base {b.description} and chat {c.description} hold no floating-point tensor: "
                                "there is no chat vector to extract")
        dtypes = sorted({str(b.dtype(n)).replace("torch.", "") for n in shapes})
        chat_rows = sorted({int(i) for rows in base_rows.values() for i in (rows < 0).nonzero().flatten()})
        metadata = {
            "format": FORMAT,
            "base": b.fingerprint(hash_files),
            "chat": c.fingerprint(hash_files),
            "source_dtype": ",".join(dtypes),
            "dtype": "float32",
            "tensors": len(shapes),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "chatvec_lab_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if chat_vocab is not None:
            metadata["vocabulary"] = chat_vocab.to_json()  # the token of each row of the token-indexed tensors
            metadata["chat_rows"] = chat_rows  # rows of tokens the chat model added: its own rows, not differences
            metadata["special_tokens"] = sorted(chat_vocab.special & {chat_vocab.tokens[i] for i in chat_rows
                                                                      if i < len(chat_vocab)})
        return cls([(1.0, ModelDifference(b, c, base_rows))], shapes, metadata, base_config=b.config)

    @classmethod
    def load(cls, path) -> "ChatVector":
        """Open a vector saved with :meth:`save` (lazily)."""
        if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
            raise SourceError(f"a saved vector is opened from its folder (str or os.PathLike), "
                              f"not {type(path).__name__}")
        path = Path(path)
        meta_file = path / METADATA_FILE
        if not meta_file.exists():
            raise SourceError(f"{path} is not a saved chat vector (no {METADATA_FILE}); "
                              "to build one from two models use ChatVector.from_models / `chatvec extract`")
        metadata = read_json_object(meta_file, "chat vector metadata")
        source = open_weights(path)
        base_file = path / BASE_CONFIG_FILE
        base_config = read_json_object(base_file, "base model config") if base_file.exists() else None
        if base_config is not None and not isinstance(base_config.get("model_type", ""), str):
            raise SourceError(f"bad base model config {base_file}: 'model_type' is "
                              f"{json_type(base_config['model_type'])}, not a string")
        shapes = {n: source.shape(n) for n in source.keys()}
        check_vector_metadata(metadata, shapes, meta_file, files=getattr(source, "files", None))
        return cls([(1.0, StoredVector(source))], shapes, metadata, base_config=base_config)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> "ChatVector":
        source = open_weights({k: v.detach().to(torch.float32) for k, v in tensors.items()})
        shapes = {n: source.shape(n) for n in source.keys()}
        return cls([(1.0, StoredVector(source))], shapes, {"format": FORMAT, **(metadata or {})})

    @classmethod
    def open(cls, spec) -> "ChatVector":
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
                    check_finite(name, raw[index], sole.description)
                yield index, raw[index]
            return
        for index in indices:
            total = None
            for coef, term, raw in live:
                d = term.block(raw, index)
                if check:
                    check_finite(name, d, term.description)
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
                    check_finite(name, block, sole.description)
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
        for meta in _recorded(self.metadata):
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

    def __mul__(self, scalar):
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
        """Write float32 safetensors shards + ``chatvec.json`` atomically; returns the folder.

        Each tensor is streamed in blocks of rows, checked and written block by block: memory stays at a few
        blocks whatever the tensors' sizes (no tensor is ever whole in memory)."""
        from tqdm.auto import tqdm

        require_bool(overwrite=overwrite, progress=progress)
        if not self.shapes:
            raise MismatchError("the vector holds no tensor: there is nothing to save")
        plan = [(n, s, torch.float32) for n, s in self.shapes.items()]

        def checked(name: str) -> Iterator[torch.Tensor]:
            # copy=False: each block is written before the next is asked for, so views and reused buffers do
            for _, block in self.blocks(name, copy=False):
                check_finite(name, block, "the vector")
                yield block

        with atomic_folder(path, overwrite, inputs=self.input_paths()) as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan, prefix="vector", max_shard_bytes=max_shard_bytes)
            try:
                for name in tqdm(self.names, desc="vector", unit="tensor", disable=not progress):
                    writer.write_blocks(name, checked(name))
                shards = writer.close()
            except BaseException:
                writer.abort()  # close the shard before the folder goes
                raise
            write_json(tmp / METADATA_FILE, {**self.metadata, "shards": shards})
            if self.base_config:
                write_json(tmp / BASE_CONFIG_FILE, self.base_config)
        return Path(path)

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
