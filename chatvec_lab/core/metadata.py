"""A saved vector's metadata, ``chatvec.json``: its fields, and the strict check that refuses what the lab would misread.

The metadata records where a vector comes from (the base and chat models, their files' hashes), how it was
made (combinations, scaling, selections, transforms, merges) and, for token-indexed tensors, the token of each
row (``vocabulary``, ``chat_rows``, ``special_tokens``). ``check_vector_metadata`` reads it strictly: a value
of the wrong type, a row out of range, a misspelt key or shards that are not the files beside it is refused in
one line naming the field, before anything is computed or written.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Iterator

from chatvec_lab.errors import SourceError
from chatvec_lab.io.formats import json_type, short_repr
from chatvec_lab.io.naming import parse

METADATA_FILE = "chatvec.json"
BASE_CONFIG_FILE = "base_config.json"
FORMAT = "chatvec/1"


def without_vocabulary(metadata: dict) -> dict:
    """The metadata without its (long) token list: what a combination of vectors records of each part."""
    return {k: v for k, v in metadata.items() if k != "vocabulary"}


def recorded_models(metadata: dict) -> Iterator[dict]:
    """The base and chat fingerprints recorded in a vector's metadata, through combinations of vectors."""
    if not isinstance(metadata, dict):
        return
    for key in ("base", "chat"):
        if isinstance(metadata.get(key), dict):
            yield metadata[key]
    for part in metadata.get("combination_of") or []:
        yield from recorded_models(part)


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
    sizes = value.get("sizes")
    if sizes is not None and not (isinstance(sizes, dict) and all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in sizes.items())):
        raise bad(f"{field}.sizes", "is not an object of file name → size in bytes")


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


HASH_BASE_AT_MOST = 1 << 30  # bytes: a recorded base this small is hashed to tell it changed; a larger one is not


def base_changes(recorded: dict, files) -> str | None:
    """How the weight ``files`` of a vector's recorded base differ from what its fingerprint ``recorded`` (the
    metadata's ``base``) says was extracted from, or None when they agree as far as can be told cheaply: their
    names, their sizes, and their sha256 when the files hold at most ``HASH_BASE_AT_MOST`` bytes."""
    import hashlib

    files = [Path(f) for f in files or []]
    sha, sizes = recorded.get("sha256") or {}, recorded.get("sizes") or {}
    known = set(sizes) | set(sha)
    if not files or not known:
        return None  # nothing recorded to compare (a base given in memory, or read from pickles)
    names = {f.name for f in files}
    if names != known:
        return (f"its weight files are {sorted(names)[:3]}{' …' if len(names) > 3 else ''}, the vector recorded "
                f"{sorted(known)[:3]}{' …' if len(known) > 3 else ''}")
    now = {f.name: f.stat().st_size for f in files}
    for name, size in sizes.items():
        if now[name] != size:
            return f"{name} is {now[name]:,} bytes, the vector recorded {size:,}"
    if sha and sum(now.values()) <= HASH_BASE_AT_MOST:
        for f in files:
            if f.name in sha:
                h = hashlib.sha256()
                with open(f, "rb") as handle:
                    while block := handle.read(1 << 24):
                        h.update(block)
                if h.hexdigest() != sha[f.name]:
                    return f"{f.name}'s sha256 is not the one the vector recorded"
    return None
