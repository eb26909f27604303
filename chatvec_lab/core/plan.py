"""Plan how chat vectors meet a target, before any weight is read or written.

``plan_apply`` checks that the vectors fit the target (names, shapes, vocabularies, tied embeddings) and
decides, per target tensor, a :class:`TensorPlan`: its :class:`Status`, one coefficient per vector, which
vector tensor it takes its delta from, and which rows. ``coefficient_for`` turns a coefficient (a number,
``{regex: α}`` rules or a function) into one tensor's number; ``layer_filter`` says which tensors may change.
``apply`` writes what this plans; ``live`` changes a model in memory by the same plan.
"""
from __future__ import annotations

import numbers
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Mapping, Union

from chatvec_lab.errors import MismatchError, UsageError
from chatvec_lab.io.naming import TensorInfo, parse
from chatvec_lab.io.sources import WeightSource
from chatvec_lab.core.vector import ChatVector, compile_pattern
from chatvec_lab.io.vocab import TokenRows, Vocabulary, disagreements, match_rows

Alpha = Union[float, Mapping[str, float], Callable[[TensorInfo], float]]
EMBEDDING_POLICIES = ("error", "skip", "shared", "tokens", "union")
TARGET_ONLY_POLICIES = ("keep", "mean")
MAX_LAYERS = 100_000  # a bound on layer indices asked for: far above any model, far below a hang


def coefficient_for(info: TensorInfo, alpha: Alpha) -> float:
    """The coefficient of one tensor: a number, ``{regex: α}`` rules (first match; unmatched → 0), or a function."""
    if callable(alpha):
        return coefficient_for(info, alpha(info))  # what the function returns is checked like any number
    if isinstance(alpha, Mapping):
        for pattern, value in alpha.items():
            try:
                hit = re.search(pattern, info.name)
            except (re.error, TypeError) as e:
                raise UsageError(f"coefficient rule {pattern!r} is not a valid regular expression: {e}") from None
            if hit:
                return coefficient_for(info, value)
        return 0.0
    return check_alpha(alpha)


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float (numpy and torch scalars too); one UsageError otherwise."""
    if isinstance(alpha, (str, bytes, bool)):
        raise UsageError(f"α {alpha!r} is not a number")
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"α {alpha!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"α {alpha!r} is not finite")
    return value


def _layer_set(layers) -> set[int] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes, int)) or not isinstance(layers, Iterable):
        raise UsageError(f"layers must be a collection of layer indices such as range(0, 16), not {layers!r}")
    if isinstance(layers, range) and len(layers) > MAX_LAYERS:
        raise UsageError(f"layers {layers} holds {len(layers):,} layers; no model has more than {MAX_LAYERS:,}")
    out = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:  # numpy ints welcome
            raise UsageError(f"layers must be non-negative integers, not {layer!r}")
        out.add(int(layer))
        if len(out) > MAX_LAYERS:
            raise UsageError(f"layers holds more than {MAX_LAYERS:,} layers; no model has that many")
    if not out:
        raise UsageError("layers is empty: no layer would change")
    return out


def layer_filter(layers: Iterable[int] | None, include: str | None, exclude: str | None) -> Callable[[TensorInfo], bool]:
    """Which tensors may change: by layer index and by name regexes."""
    layer_set = _layer_set(layers)
    inc = compile_pattern(include, "include")
    exc = compile_pattern(exclude, "exclude")

    def keep(info: TensorInfo) -> bool:
        if layer_set is not None and info.layer not in layer_set:
            return False
        if inc and not inc.search(info.name):
            return False
        return not (exc and exc.search(info.name))
    keep.layers = layer_set
    keep.active = layer_set is not None or inc is not None or exc is not None
    return keep


class Status(Enum):
    """What apply does with one tensor of the target."""
    ADDED = "added"
    NOT_IN_VECTOR = "not in vector"
    EXCLUDED = "excluded"  # by include/exclude/layers
    SKIPPED = "skipped (vocab differs)"  # embeddings="skip"
    ZERO = "coefficient 0"


@dataclass
class TensorPlan:
    name: str
    coefficients: list[float]  # one per vector
    rows: int | None = None  # add to the first `rows` rows only (vocabularies differ)
    status: Status = Status.ADDED
    how: str | None = None  # for an added tensor: "shared rows", "rows matched by token", "lm_head delta: tied"
    token_rows_set: bool = False  # rows of new tokens were set from a donor (--token-map, a grown vocabulary)
    sources: list[str | None] = field(default_factory=list)  # per vector: the vector tensor added here, if any
    token_rows: list[TokenRows | None] = field(default_factory=list)  # per vector, when rows are matched by token
    out_rows: int | None = None  # rows of the output tensor when a union vocabulary grows it

    @property
    def added(self) -> bool:
        return self.status is Status.ADDED

    @property
    def label(self) -> str:
        """The report's wording, e.g. ``added (shared rows) + token rows``."""
        text = self.status.value + (f" ({self.how})" if self.how else "")
        return text + (" + token rows" if self.token_rows_set else "")


def _tied(target: WeightSource) -> bool:
    tied = _ties_embeddings(target.config)
    return bool(tied) if tied is not None else not any(parse(n).module == "lm_head" for n in target.keys())


def plan_apply(target: WeightSource, pairs: list[tuple[ChatVector, Alpha]], embeddings: str = "error",
               keep: Callable[[TensorInfo], bool] | None = None, target_vocab: Vocabulary | None = None,
               new_tokens: dict[str, int] | None = None, no_target_vocab: str = "the target has no tokenizer",
               ) -> tuple[dict[str, TensorPlan], list[str]]:
    """Check that the vectors fit the target and decide, per tensor, what to add. Raises before any write.

    ``target_vocab``: the target's tokenizer vocabulary; with the vectors' own, token-indexed rows are matched
    by token (``embeddings='tokens'`` or ``'union'``), or checked to agree by id (the other policies).
    ``new_tokens`` (union): ``{token: output id}`` of the chat-added tokens the output vocabulary gains.
    ``no_target_vocab``: why there is no ``target_vocab`` (said when rows cannot be matched by token)."""
    if embeddings not in EMBEDDING_POLICIES:
        raise UsageError(f"embeddings policy must be one of {EMBEDDING_POLICIES}, not {embeddings!r}")
    notes: list[str] = []
    by_token = embeddings in ("tokens", "union")
    for i, (vec, _) in enumerate(pairs):
        if by_token and (vec.vocabulary is None or target_vocab is None):
            which = "the target" if target_vocab is None else f"vector {i + 1}"
            raise MismatchError(f"embeddings={embeddings!r} matches rows by token, but {which} has no tokenizer "
                                "(a vector records its chat model's vocabulary when extracted from folders with one)")
        if not by_token and vec.vocabulary is not None and target_vocab is not None:
            differ = disagreements(target_vocab, vec.vocabulary)
            if differ and embeddings == "error":
                raise MismatchError(f"the target's tokenizer and vector {i + 1}'s disagree on shared ids "
                                    f"({'; '.join(differ)}): rows would be added to the wrong tokens; choose "
                                    "embeddings='tokens' (match rows by token) [--embeddings tokens]")
            if differ:
                notes.append(f"rows are added by index although the target's tokenizer and vector {i + 1}'s disagree "
                             f"on shared ids ({'; '.join(differ)})")
    target_names = set(target.keys())
    tied = _tied(target)
    for i, (vec, _) in enumerate(pairs):
        if vec.base_config and target.config:
            a, b = vec.base_config.get("model_type"), target.config.get("model_type")
            if a and b and a != b:
                raise MismatchError(f"vector {i + 1} was built on a {a!r} model but the target is a {b!r} model")
        extra = [n for n in vec.names if n not in target_names]
        for name in extra:
            if tied and parse(name).module == "lm_head":
                notes.append(f"target ties its embeddings: vector {i + 1}'s {name!r} is not applied "
                             "(the embedding delta already reaches the output layer)")
            else:
                raise MismatchError(f"vector {i + 1} has tensor {name!r}, which the target {target.description} lacks")
    sources = _vector_sources(target, pairs, tied, notes)
    plans: dict[str, TensorPlan] = {}
    grown = len(target_vocab) + len(new_tokens) if new_tokens else None
    for name in target.keys():
        info = parse(name)
        coefs, rows, status, how = [], None, Status.ADDED, None
        token_rows: list[TokenRows | None] = [None] * len(pairs)
        in_any = False
        for i, (vec, alpha) in enumerate(pairs):
            src = sources[name][i]
            if src is None:
                coefs.append(0.0)
                continue
            in_any = True
            coefs.append(coefficient_for(info, alpha))
            if src != name:
                how = f"{src} delta: tied"
            vshape, tshape = tuple(vec.shapes[src]), tuple(target.shape(name))
            vocab_like = info.is_embedding_like and len(vshape) == len(tshape) and vshape[1:] == tshape[1:]
            if vocab_like and by_token:
                token_rows[i] = match_rows(tshape[0], target_vocab, vec.vocabulary, vshape[0], vec.chat_rows,
                                           new_tokens)
                how = how or "rows matched by token"
                continue
            if vocab_like and vec.chat_rows and min(vec.chat_rows) < tshape[0]:
                rows = min(vec.chat_rows) if rows is None else min(rows, min(vec.chat_rows))  # never a chat row as a delta
                how = how or "shared rows"
            if vshape == tshape:
                continue
            if not vocab_like:
                raise MismatchError(f"shape mismatch for {name!r}: vector {i + 1} has {vshape}, target has {tshape}")
            if embeddings == "error":
                if vec.vocabulary is not None and target_vocab is not None:
                    choices = ("choose embeddings='tokens' (match rows by token), 'union' (match by token and add the "
                               "chat model's new tokens to the vocabulary), 'skip' (leave these tensors) or 'shared' "
                               "(add by row index to the shared rows) [--embeddings tokens|union|skip|shared]")
                else:
                    lacking = "the vector records no vocabulary" if vec.vocabulary is None else no_target_vocab
                    choices = ("choose embeddings='skip' (leave these tensors) or 'shared' (add by row index to the "
                               "shared rows) [--embeddings skip|shared]; 'tokens' and 'union' match rows by token and "
                               f"need both vocabularies, but {lacking}")
                raise MismatchError(
                    f"vocabulary sizes differ for {name!r}: vector {i + 1} has {vshape[0]} rows, target {tshape[0]}; "
                    + choices)
            if embeddings == "skip":
                status = Status.SKIPPED
            else:
                rows = min(vshape[0], tshape[0]) if rows is None else min(rows, vshape[0])
                how = how or "shared rows"
        if not in_any:
            status = Status.NOT_IN_VECTOR
        elif keep is not None and not keep(info):
            status = Status.EXCLUDED
        elif status is Status.SKIPPED:
            pass
        elif all(c == 0 for c in coefs):
            status = Status.ZERO
        if status is Status.ADDED:
            out_rows = max(target.shape(name)[0], grown) if grown and any(token_rows) else None
            plans[name] = TensorPlan(name, coefs, rows, status, how, sources=sources[name], token_rows=token_rows,
                                     out_rows=out_rows)
        else:
            plans[name] = TensorPlan(name, [0.0] * len(pairs), None, status, sources=[None] * len(pairs),
                                     token_rows=[None] * len(pairs))
    if grown and any(p.status is Status.EXCLUDED and parse(n).is_embedding_like for n, p in plans.items()):
        raise UsageError("a union vocabulary grows every token-indexed tensor: the filters may not exclude one")
    _check_filters(target, plans, keep)
    return plans, notes


def _ties_embeddings(config: dict | None) -> bool | None:
    cfg = config or {}
    tied = cfg.get("tie_word_embeddings")
    if tied is None and isinstance(cfg.get("text_config"), dict):
        tied = cfg["text_config"].get("tie_word_embeddings")
    return tied


def _vector_sources(target: WeightSource, pairs, tied: bool, notes: list[str]) -> dict[str, list[str | None]]:
    """For each target tensor and each vector, the vector tensor whose delta it gets (None: none).

    The name itself, except for a stored output layer whose models tie it to the embeddings:
    - a tied target that also stores ``lm_head.weight`` (a copy transformers must find equal to the embedding):
      the copy gets the embedding's delta, so the two stay equal;
    - an untied target, and a vector from models that tie them (so it has no lm_head of its own): the target's
      lm_head gets the embedding's delta, as the chat model's output layer changed by it."""
    embeds = [n for n in target.keys() if parse(n).module == "embed" and n.endswith("weight")]
    heads = [n for n in target.keys() if parse(n).module == "lm_head" and n.endswith("weight")]
    embed = embeds[0] if len(embeds) == 1 else None
    out = {name: [name if name in vec else None for vec, _ in pairs] for name in target.keys()}
    if embed is None:
        return out
    for head in heads:
        for i, (vec, _) in enumerate(pairs):
            if embed not in vec:
                continue
            if tied:
                if head in vec:
                    notes.append(f"the target ties its output layer to its embeddings and stores a copy: {head!r} "
                                 f"gets the embedding's delta, not vector {i + 1}'s own {head!r}")
                out[head][i] = embed
            elif head not in vec and _ties_embeddings(vec.base_config):
                notes.append(f"vector {i + 1} comes from models that tie their embeddings: the target's separate "
                             f"{head!r} gets the embedding's delta")
                out[head][i] = embed
    return out


def _check_filters(target: WeightSource, plans: dict[str, TensorPlan], keep) -> None:
    """Filters that name layers the model lacks, or leave nothing to change, are mistakes: refuse them."""
    if keep is None or not getattr(keep, "active", False):
        return
    present = {parse(n).layer for n in target.keys()} - {None}
    if keep.layers is not None:
        absent = sorted(keep.layers - present)
        if absent:
            span = f"layers {min(present)}–{max(present)}" if present else "no numbered layers"
            raise UsageError(f"layers {_ranges(absent)} are not in the target (it has {span})")
    if not any(p.added for p in plans.values()) and \
            any(p.status is Status.EXCLUDED for p in plans.values()):
        raise UsageError("the layer/include/exclude filters leave no tensor of the vector to add: "
                         "the output would be an unchanged copy of the target")


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:8]) + (" …" if len(values) > 8 else "")


# ---------------------------------------------------------------- regions: the ablation atlas's cells

@dataclass(frozen=True)
class Cell:
    """A region of the model: a layer × module kind, or an outer row (``embeddings``, ``lm_head``, ``norms``)."""
    row: str  # "layer 3", or one of OUTER_ROWS
    module: str  # a module kind (attn_q …), or "all" for an outer row

    @property
    def label(self) -> str:
        return self.row if self.module == "all" else f"{self.row} · {self.module}"


def cell_of(info: TensorInfo) -> Cell:
    if info.module == "embed" or info.module == "pos_embed":
        return Cell("embeddings", "all")
    if info.module == "lm_head":
        return Cell("lm_head", "all")
    if info.group == "norm":
        return Cell("norms", "all")
    if info.layer is None:
        return Cell("other", "all")
    return Cell(f"layer {info.layer}", info.module)


def cell_coefficient(cell: Cell | None, design: str, alpha: float):
    """The coefficient rule of one design: α inside the cell only (keep-only), α everywhere but the cell
    (knock-out), or α everywhere (``cell`` None: the full vector); for ``LiveModel.set``."""
    if cell is None:  # the full vector
        return alpha
    if design == "keep-only":
        return lambda info: alpha if cell_of(info) == cell else 0.0
    return lambda info: 0.0 if cell_of(info) == cell else alpha
