"""Extraction: the chat vector ``chat − base`` of two models, checked before any tensor is read.

The two models must be of one architecture and hold the same tensor names; their shapes must agree, except for
token-indexed tensors (embeddings, lm_head) of a vocabulary the chat model grew, whose rows are then matched by
token. The vector records where it comes from: both models' fingerprints, dtypes, sizes and vocabulary.
``ChatVector.from_models`` and ``extract`` (in :mod:`chatvec_lab.core.vector`) are built on ``model_difference``.
"""
from __future__ import annotations

import datetime as _dt
import math
import warnings
from pathlib import Path
from typing import Iterable

import torch

from chatvec_lab.core.metadata import FORMAT
from chatvec_lab.core.terms import ModelDifference
from chatvec_lab.errors import ChatVecWarning, MismatchError
from chatvec_lab.io.naming import parse
from chatvec_lab.io.sources import WeightSource, open_weights, refuse_saved_vector
from chatvec_lab.io.vocab import Vocabulary, row_map
from chatvec_lab.version import __version__


def list_names(names: Iterable[str], limit: int = 5) -> str:
    """A few of ``names``, sorted and quoted, for a message: ``'a', 'b' and 3 more``."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_compatible(a, b) -> None:
    """Two vectors (``ChatVector``) can be combined: the same tensors, shapes and token rows; else which tensor and
    why."""
    missing, extra = set(a.shapes) - set(b.shapes), set(b.shapes) - set(a.shapes)
    if missing or extra:
        detail = (f"only the left has {list_names(missing)}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"only the right has {list_names(extra)}" if extra else "")
        raise MismatchError(f"cannot combine vectors with different tensors: {detail}")
    for name, shape in a.shapes.items():
        if b.shapes[name] != shape:
            raise MismatchError(f"cannot combine vectors: {name!r} is {shape} in one and {b.shapes[name]} in the other")
    if a.vocabulary != b.vocabulary or a.chat_rows != b.chat_rows:
        raise MismatchError("cannot combine vectors whose token rows belong to different vocabularies")


def with_sizes(fingerprint: dict, source: WeightSource) -> dict:
    """A model's fingerprint with the byte size of each of its weight files (``sizes``): what ``apply`` compares,
    cheaply, to tell that the base a vector records has changed since extraction."""
    files = getattr(source, "files", None)
    if files:
        fingerprint["sizes"] = {Path(f).name: Path(f).stat().st_size for f in files}
    return fingerprint


def same_weights(metadata: dict) -> bool:
    """Whether a vector's recorded base and chat are one model (one folder, or files of equal sha256): its
    deltas are all zero."""
    base, chat = metadata.get("base"), metadata.get("chat")
    if not (isinstance(base, dict) and isinstance(chat, dict)):
        return False
    if base.get("path") and base.get("path") == chat.get("path"):
        return True
    return bool(base.get("sha256")) and base.get("sha256") == chat.get("sha256")


def check_same_architecture(a: WeightSource, b: WeightSource, a_label: str, b_label: str) -> None:
    """Refuse two models whose configs name different architectures (``model_type``)."""
    ca, cb = a.config, b.config
    if ca and cb:
        ta, tb = ca.get("model_type"), cb.get("model_type")
        if ta and tb and ta != tb:
            raise MismatchError(f"{a_label} is a {ta!r} model but {b_label} is a {tb!r} model: "
                                "a chat vector needs two models of one architecture")


def chat_to_base_rows(chat_rows: int, base_rows: int, chat: Vocabulary, base: Vocabulary) -> torch.Tensor:
    """For each chat row, the base row of the same token (-1: a token the chat model added). Rows past a
    vocabulary's end (padding) match by index."""
    out = row_map(chat_rows, chat, base)
    out[out >= base_rows] = -1
    for j in range(len(chat), min(chat_rows, base_rows)):
        if j >= len(base):
            out[j] = j
    return out


def model_difference(base, chat, allow_pickle: bool = False,
                     hash_files: bool = True) -> tuple[ModelDifference, dict, dict, dict | None]:
    """``chat − base`` as ``(term, shapes, metadata, base_config)``: the two models opened lazily, their names,
    shapes and architectures checked now. ``hash_files``: record the sha256 of the models' files."""
    b = open_weights(base, allow_pickle=allow_pickle)
    c = open_weights(chat, allow_pickle=allow_pickle)
    refuse_saved_vector(b, "--base")
    refuse_saved_vector(c, "--chat")
    check_same_architecture(b, c, f"base {b.description}", f"chat {c.description}")
    missing, extra = set(b.keys()) - set(c.keys()), set(c.keys()) - set(b.keys())
    if missing:
        raise MismatchError(f"chat {c.description} lacks tensors of base {b.description}: {list_names(missing)}")
    if extra:
        raise MismatchError(f"chat {c.description} has tensors that base {b.description} lacks: {list_names(extra)}")
    base_vocab, chat_vocab = Vocabulary.of_folder(b.folder), Vocabulary.of_folder(c.folder)
    shapes, base_rows = {}, {}
    for name in b.keys():
        bdt, cdt = b.dtype(name), c.dtype(name)
        if bdt.is_floating_point != cdt.is_floating_point:  # a quantized (integer) copy of a weight, say
            raise MismatchError(f"tensor {name!r} is {str(bdt).replace('torch.', '')} in base {b.description} but "
                                f"{str(cdt).replace('torch.', '')} in chat {c.description}: a chat vector is a "
                                "difference of floating-point weights (dequantize both models first)")
        if not bdt.is_floating_point:
            continue  # integer buffers in both (e.g. position ids) are not weights
        bshape, cshape = tuple(b.shape(name)), tuple(c.shape(name))
        token_rows = parse(name).is_embedding_like and bshape[1:] == cshape[1:] and len(bshape) >= 1
        if token_rows and base_vocab and chat_vocab and (bshape != cshape or base_vocab != chat_vocab):
            base_rows[name] = chat_to_base_rows(cshape[0], bshape[0], chat_vocab, base_vocab)
        elif bshape != cshape:
            hint = (" (a vocabulary that grew: give both models their tokenizers, so rows can be matched by token)"
                    if token_rows else "")
            raise MismatchError(f"shape mismatch for {name!r}: base {bshape} vs chat {cshape}{hint}")
        shapes[name] = cshape
    if not shapes:
        raise MismatchError(f"base {b.description} and chat {c.description} hold no floating-point tensor: "
                            "there is no chat vector to extract")
    if (base_vocab is None) != (chat_vocab is None) and any(parse(n).is_embedding_like for n in shapes):
        lacking = "base" if base_vocab is None else "chat"
        warnings.warn(ChatVecWarning(
            f"the {lacking} model has no tokenizer: embedding and lm_head rows are subtracted by index, which is "
            f"right only if both models give every token the same id (copy the {lacking} model's tokenizer files "
            "into its folder to match rows by token)"), stacklevel=2)
    dtypes = sorted({str(b.dtype(n)).replace("torch.", "") for n in shapes})
    chat_rows = sorted({int(i) for rows in base_rows.values() for i in (rows < 0).nonzero().flatten()})
    metadata = {
        "format": FORMAT,
        "base": with_sizes(b.fingerprint(hash_files), b),
        "chat": with_sizes(c.fingerprint(hash_files), c),
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
    return ModelDifference(b, c, base_rows), shapes, metadata, b.config
