"""Apply chat vectors: ``target + Σ αᵢ·vectorᵢ``, to a new model folder or to a model in memory.

Everything is checked and planned before anything is written (:mod:`chatvec_lab.core.plan`); then tensors are
streamed one by one: read target tensor, add the scaled deltas in float32 (:mod:`chatvec_lab.core.tensor_merge`),
cast back to the target's dtype, write. The output folder appears only when it is complete. Along the way the
target is compared with the vector's base (the lineage check), and the output takes the target's tokenizer and
config files, with a chat model's template where asked (:mod:`chatvec_lab.core.tokens`).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import torch

from chatvec_lab.core.extraction import check_same_architecture
from chatvec_lab.core.lineage import LINEAGE_STRIDE, LINEAGE_WARN, accumulate, resolve_base, token_row_pairs
from chatvec_lab.core.lora import in_memory_name
from chatvec_lab.core.metadata import without_vocabulary
from chatvec_lab.core.plan import (EMBEDDING_POLICIES, MAX_LAYERS, TARGET_ONLY_POLICIES, Alpha, Status, TensorPlan,
                                   coefficient_for, layer_filter, plan_apply)
from chatvec_lab.core.tensor_merge import merge_tensor, merge_token_rows
from chatvec_lab.core.terms import ModelDifference
from chatvec_lab.core.tokens import ChatTurn, TokenMap, chat_turn_of, grow_vocabulary
from chatvec_lab.core.vector import ChatVector, compile_pattern
from chatvec_lab.errors import SourceError, UsageError, check_finite, require_bool
from chatvec_lab.io.formats import read_json_object
from chatvec_lab.io.naming import parse
from chatvec_lab.io.output import atomic_folder, check_output_path, source_paths, write_json
from chatvec_lab.io.paging import Prefetcher
from chatvec_lab.io.shards import DEFAULT_SHARD_BYTES, ShardedSafetensorsWriter
from chatvec_lab.io.sources import WeightSource, model_folder, module_state, open_weights, refuse_saved_vector
from chatvec_lab.io.vocab import Vocabulary, added_tokens

__all__ = [
    "ApplyOptions", "ApplyReport", "LineageWarning", "ChatTurn", "apply_vectors", "apply_to_model",
    "merge_tensor", "merge_token_rows", "LINEAGE_WARN", "LINEAGE_STRIDE", "MODEL_FILES",
    # planning lives in chatvec_lab.core.plan; its names stay importable from here
    "Alpha", "EMBEDDING_POLICIES", "TARGET_ONLY_POLICIES", "MAX_LAYERS", "Status", "TensorPlan",
    "coefficient_for", "layer_filter", "plan_apply",
]


@dataclass(frozen=True)
class ApplyOptions:
    """How vectors meet a target: the one set of options behind ``apply_vectors``, ``apply_to_model`` and
    ``chatvec apply``. Every field is also a keyword argument of both functions.

    ``base``: the vector's base, for the lineage check (default: the base the vector records, where it still
    exists). ``embeddings``: how token-indexed rows (embeddings, lm_head) meet: ``error`` (refuse when the
    vocabularies differ in size or, where tokenizers say so, in their tokens), ``skip`` (leave those tensors),
    ``shared`` (add to the rows both have, by index), ``tokens`` (match rows by token; a token the chat model
    added takes the chat model's row), ``union`` (``tokens``, and the output vocabulary gains the chat-added
    tokens the target lacks). ``include``/``exclude``: regexes on tensor names; ``layers``: layer indices.
    ``token_map``: tokens whose embedding/lm_head rows are copied from the ``chat`` model.
    ``target_only`` (``tokens``/``union``): rows of tokens the vector lacks ``keep`` the target's or get the
    ``mean`` delta. ``allow_pickle``: read ``.bin``/``.pt`` weights (``torch.load(weights_only=True)``).
    """
    base: object = None
    embeddings: str = "error"
    include: str | None = None
    exclude: str | None = None
    layers: Iterable[int] | None = None
    token_map: object = None
    chat: object = None
    allow_pickle: bool = False
    check_lineage: bool = True
    target_only: str = "keep"

    def __post_init__(self):
        require_bool(allow_pickle=self.allow_pickle, check_lineage=self.check_lineage)
        if self.embeddings not in EMBEDDING_POLICIES:
            raise UsageError(f"embeddings policy must be one of {EMBEDDING_POLICIES}, not {self.embeddings!r}")
        if self.target_only not in TARGET_ONLY_POLICIES:
            raise UsageError(f"target_only must be one of {TARGET_ONLY_POLICIES}, not {self.target_only!r}")

    @classmethod
    def build(cls, options: "ApplyOptions | None", fields: dict) -> "ApplyOptions":
        """``options`` (or the defaults) with ``fields`` replacing some of its values."""
        import dataclasses

        if options is not None and not isinstance(options, ApplyOptions):
            raise UsageError(f"options must be an ApplyOptions, not {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UsageError(f"unknown option(s) {unknown}; the options are {sorted(known)}")
        return dataclasses.replace(options or cls(), **fields)


MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


class LineageWarning(UserWarning):
    pass


@dataclass
class ApplyReport:
    """What an apply did: per tensor (``tensors``), the lineage distance, and what to know about it:
    ``warnings`` holds every message in order, ``notes`` those of them that only inform (e.g. where the chat
    template came from), which ``summary`` prints as ``note:`` rather than ``warning:``."""
    tensors: pd.DataFrame
    lineage_distance: float | None
    warnings: list[str] = field(default_factory=list)
    out: Path | None = None
    notes: list[str] = field(default_factory=list)
    lineage_checked: bool = True  # False: check_lineage=False (--no-lineage-check)

    def summary(self) -> str:
        counts = self.tensors["status"].value_counts().to_dict()
        lineage = (f"{self.lineage_distance:.4f}" if self.lineage_distance is not None else
                   "not checked (no base)" if self.lineage_checked else "not checked (--no-lineage-check)")
        lines = ["tensors: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                 f"lineage ‖target − base‖/‖base‖: {lineage}"]
        lines += [f"{'note' if w in self.notes else 'warning'}: {w}" for w in self.warnings]
        if self.out:
            lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def _as_pairs(vectors) -> list[tuple[ChatVector, Alpha]]:
    vector_like = (ChatVector, str, os.PathLike)
    if isinstance(vectors, vector_like):
        vectors = [(vectors, 1.0)]
    elif isinstance(vectors, tuple) and len(vectors) == 2 and isinstance(vectors[0], vector_like) \
            and not isinstance(vectors[1], (*vector_like, tuple)):
        vectors = [vectors]  # a lone (vector, alpha) pair
    elif isinstance(vectors, Mapping):  # {vector: alpha}
        vectors = list(vectors.items())
    if not isinstance(vectors, Iterable):
        raise UsageError(f"vectors must be a vector, a vector's folder or a list of (vector, alpha), "
                         f"not {type(vectors).__name__}")
    pairs = []
    for item in vectors:
        if isinstance(item, tuple) and len(item) != 2:
            raise UsageError(f"each vector is given as (vector, alpha), not a tuple of {len(item)}")
        vec, alpha = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(vec, (ChatVector, str, os.PathLike)):
            raise UsageError(f"a vector must be a ChatVector or its folder, not {type(vec).__name__}")
        if isinstance(alpha, Mapping):
            for pattern, value in alpha.items():
                compile_pattern(pattern, "a coefficient rule's pattern")
                coefficient_for(parse("x"), value)
        elif not callable(alpha):
            coefficient_for(parse("x"), alpha)  # a plain coefficient must be a finite number
        pairs.append((ChatVector.open(vec), alpha))
    if not pairs:
        raise UsageError("no vector to apply")
    return pairs


def _copy_model_files(target_folder: Path | None, out: Path, turn: ChatTurn | None) -> None:
    """The target's config and tokenizer files (``MODEL_FILES``) into the output, with the chat ``turn`` (template,
    end-of-turn tokens) written into them when one is taken from a chat model."""
    if target_folder:
        for fname in MODEL_FILES:
            if (target_folder / fname).is_file():
                shutil.copy2(target_folder / fname, out / fname)
    if turn is None:
        return
    (out / "chat_template.jinja").write_text(turn.template)
    cfg_file = out / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = read_json_object(cfg_file, "tokenizer config")
        cfg["chat_template"] = turn.template
        if turn.eos_token is not None and turn.eos_ids:
            cfg["eos_token"] = turn.eos_token
        write_json(cfg_file, cfg)
    if turn.eos_ids:
        gen_file = out / "generation_config.json"
        gen = read_json_object(gen_file, "generation config") if gen_file.is_file() else {}
        gen["eos_token_id"] = turn.eos_ids if len(turn.eos_ids) > 1 else turn.eos_ids[0]
        write_json(gen_file, gen)


def _report(plans, notes, lineage, out=None, info=(), checked: bool = True) -> ApplyReport:
    df = pd.DataFrame([{"name": p.name, "status": p.label, "coefficients": tuple(p.coefficients),
                        "rows": p.rows} for p in plans.values()])
    warn = [*notes, *info]
    distance = None
    if lineage is not None and lineage[1] > 0:
        distance = math.sqrt(lineage[0] / lineage[1])
        if distance > LINEAGE_WARN:
            msg = (f"the target is far from the vector's base (‖target − base‖/‖base‖ = {distance:.2f} > {LINEAGE_WARN}): "
                   "it may not descend from that base, and the vector may not transfer")
            warnings.warn(msg, LineageWarning, stacklevel=3)
            warn.append(msg)
    return ApplyReport(tensors=df, lineage_distance=distance, warnings=warn, out=out, notes=list(info),
                       lineage_checked=checked)


@dataclass
class _Prepared:
    """Everything checked and planned before a weight is read."""

    target: WeightSource
    pairs: list[tuple[ChatVector, Alpha]]
    plans: dict[str, TensorPlan]
    notes: list[str]
    base: WeightSource | None  # for the lineage check
    shared_base: bool  # the base is the vector's own (its tensors are read anyway)
    token_map: TokenMap | None
    new_tokens: dict[str, int]  # union vocabulary: token → output id
    target_vocab: Vocabulary | None
    info: list[str]  # notes that only inform (printed as notes, not warnings)


def _prepare(target, vectors, opts: ApplyOptions) -> _Prepared:
    embeddings, token_map, chat, allow_pickle = opts.embeddings, opts.token_map, opts.chat, opts.allow_pickle
    target_src = open_weights(target, allow_pickle=allow_pickle)
    refuse_saved_vector(target_src, "--target")
    pairs = _as_pairs(vectors)
    target_vocab = Vocabulary.of_folder(model_folder(target)) if any(v.vocabulary for v, _ in pairs) else None
    new_tokens = None
    if embeddings == "union" and target_vocab is not None:
        new_tokens = {}
        for vec, _ in pairs:
            for token in added_tokens(target_vocab, vec.vocabulary, vec.chat_rows) if vec.vocabulary else []:
                new_tokens.setdefault(token, len(target_vocab) + len(new_tokens))
    plans, notes = plan_apply(target_src, pairs, embeddings, layer_filter(opts.layers, opts.include, opts.exclude),
                              target_vocab, new_tokens)
    info = []
    if new_tokens:
        info.append(f"union vocabulary: {len(new_tokens)} token(s) the chat model added join the target's "
                     f"({', '.join(list(new_tokens)[:5])}{' …' if len(new_tokens) > 5 else ''})")

    base_src, shared_base, base_warnings = resolve_base(opts.base, pairs, opts.check_lineage)
    notes += base_warnings
    if base_src is not None:
        check_same_architecture(base_src, target_src, f"base {base_src.description}", f"target {target_src.description}")
    rows = None
    if isinstance(token_map, str):
        token_map = [token_map]  # one token, not its characters
    if token_map is not None and not isinstance(token_map, (Mapping, list, tuple, set)):
        raise UsageError(f"token_map must be a token, a list of tokens or {{target token: chat token}}, "
                         f"not {type(token_map).__name__}")
    if token_map:
        chat_src = open_weights(chat) if chat is not None else next(
            (t.chat for v, _ in pairs for _, t in v.terms if isinstance(t, ModelDifference)), None)
        if chat_src is None:
            raise SourceError("a token map needs the chat model: pass chat= (--chat)")
        rows = TokenMap(token_map, chat_src, model_folder(target), chat_src.folder)
    return _Prepared(target_src, pairs, plans, notes, base_src, shared_base, rows, new_tokens or {}, target_vocab,
                     info)


def _base_for(name, base_src, shared_base, pairs, plan) -> torch.Tensor | None:
    if base_src is None or name not in base_src:
        return None
    if shared_base and plan.added:
        for vec, _ in pairs:
            t = vec.base_tensor(name)
            if t is not None:
                return t
    return base_src.get(name)


def apply_vectors(target, vectors, out, *, options: ApplyOptions | None = None, chat_template_from=None,
                  overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
                  **option_fields) -> ApplyReport:
    """Write ``target + Σ αᵢ·vectorᵢ`` as a Hugging Face model folder at ``out``; returns the report.

    ``vectors``: a vector (or its folder), a list of ``(vector, alpha)`` or ``{vector: alpha}``; ``alpha`` is a
    number, ``{regex: α}`` rules, or a function of :class:`~chatvec_lab.io.naming.TensorInfo`.
    How they meet the target: an :class:`ApplyOptions` (``options=``) and/or its fields as keywords
    (``base=``, ``embeddings=``, ``include=``, ``exclude=``, ``layers=``, ``token_map=``, ``chat=``,
    ``allow_pickle=``, ``check_lineage=``, ``target_only=``).
    ``chat_template_from``: a chat model whose chat template (and end-of-turn token) the output takes.
    """
    from tqdm.auto import tqdm

    opts = ApplyOptions.build(options, option_fields)
    require_bool(overwrite=overwrite, progress=progress)
    check_output_path(out, overwrite)
    prep = _prepare(target, vectors, opts)
    target_src, pairs, plans, notes = prep.target, prep.pairs, prep.plans, prep.notes
    base_src = prep.base if opts.check_lineage else None
    base, chat, target_only = opts.base, opts.chat, opts.target_only
    turn = chat_turn_of(chat_template_from, model_folder(target))  # before the merge: a bad template fails now
    if turn is not None:
        prep.info.append(turn.describe())
    inputs = [*source_paths(target_src), *(p for vec, _ in pairs for p in vec.input_paths()),
              *(source_paths(base_src) if base_src is not None else []),
              *(source_paths(prep.token_map.chat) if prep.token_map is not None else []),
              *([model_folder(chat_template_from)] if chat_template_from is not None else []),
              *(Path(p) for p in (base, chat) if isinstance(p, (str, os.PathLike)) and os.path.exists(p))]
    lineage = [0.0, 0.0] if base_src is not None else None
    by_token = token_row_pairs(plans, target_src, base_src, prep.target_vocab) if base_src is not None else {}
    order = list(target_src.keys())
    plan = [(n, _out_shape(target_src.shape(n), plans[n]), target_src.dtype(n)) for n in order]
    with atomic_folder(out, overwrite, inputs=inputs) as tmp, contextlib.ExitStack() as stack:
        for vec, _ in pairs:
            stack.enter_context(vec.prefetching(order))
        reader = Prefetcher(target_src, order)
        stack.callback(reader.close)
        writer = ShardedSafetensorsWriter(tmp, plan, prefix="model", max_shard_bytes=max_shard_bytes,
                                          background=True)
        stack.callback(writer.abort)
        for name in tqdm(order, desc="apply", unit="tensor", disable=not progress):
            t = reader.get(name)
            p = plans[name]
            if p.added and any(p.token_rows):
                result = merge_token_rows(t, p, pairs, target_only)
            elif p.added:
                result = merge_tensor(t, p, pairs)
            else:
                result = t
                check_finite(t, f"tensor {name!r} in the target")  # copied as it is, but still written: no NaN passes
            if lineage is not None:
                accumulate(lineage, t, _base_for(name, base_src, prep.shared_base, pairs, p), by_token.get(name))
            if prep.token_map is not None and parse(name).is_embedding_like:
                result = result.clone() if result is t else result
                if prep.token_map.apply(name, result):
                    p.token_rows_set = True
            writer.write(name, result)
        writer.close()
        _copy_model_files(model_folder(target), tmp, turn)
        if prep.new_tokens:
            grow_vocabulary(model_folder(target), tmp, prep.new_tokens, pairs, plans)
        report = _report(plans, notes, lineage, out=Path(out), info=prep.info, checked=opts.check_lineage)
        write_json(tmp / "chatvec_apply.json", {
            "target": target_src.fingerprint(hash_files=False),
            "vectors": [{"metadata": without_vocabulary(v.metadata), "alpha": a if isinstance(a, (int, float))
                         else repr(a)} for v, a in pairs],
            "embeddings": opts.embeddings, "target_only": target_only, "include": opts.include,
            "exclude": opts.exclude, "layers": sorted(opts.layers) if opts.layers is not None else None,
            "token_map": list(opts.token_map or []),
            "new_tokens": prep.new_tokens, "lineage_distance": report.lineage_distance, "warnings": report.warnings})
    return report


def _out_shape(shape: tuple[int, ...], plan: TensorPlan) -> tuple[int, ...]:
    return (plan.out_rows, *shape[1:]) if plan.out_rows else tuple(shape)


def apply_to_model(target, vectors, *, options: ApplyOptions | None = None, inplace: bool = False, device=None,
                   **kwargs):
    """``target + Σ αᵢ·vectorᵢ`` as a transformers model in memory; returns ``(model, report)``.

    ``target`` is a model folder / hub id (loaded fresh) or a ``torch.nn.Module`` (copied unless ``inplace``).
    ``vectors`` and the options (``options=`` and/or :class:`ApplyOptions` fields as keywords) as for
    :func:`apply_vectors`; other keywords go to ``from_pretrained`` (``dtype=``: ``auto``, the default, is the
    checkpoint's own; ``float32``, ``bfloat16``, ``float16`` as ``chatvec_lab.io.devices`` names them …).
    ``device``: None (the default) leaves the model where it was loaded (the CPU) or found; ``auto`` (the GPU if
    there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps`` moves it there once the vectors are added
    (a device this machine lacks is a one-line UsageError, before anything loads). ``embeddings`` may not be
    ``tokens``/``union`` here (a model in memory cannot grow or re-key its vocabulary file).
    """
    import copy
    import dataclasses

    from chatvec_lab.io.devices import resolve_device, resolve_dtype

    fields = {f.name for f in dataclasses.fields(ApplyOptions)}
    opts = ApplyOptions.build(options, {k: v for k, v in kwargs.items() if k in fields})
    load_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    require_bool(inplace=inplace, **{k: v for k, v in load_kwargs.items() if k == "trust_remote_code"})
    embeddings = opts.embeddings
    if embeddings in ("tokens", "union"):  # refused before a model is loaded or copied
        raise UsageError(f"embeddings={embeddings!r} is for apply_vectors (a model folder out), not a model in memory")
    where = resolve_device(device) if device is not None else None
    dtype = load_kwargs.get("dtype")
    if isinstance(dtype, str) and dtype.strip().lower() != "auto":  # "bf16", "float32" …; a bad name in one line
        load_kwargs["dtype"] = resolve_dtype(dtype)
    if isinstance(target, torch.nn.Module):
        model = target if inplace else copy.deepcopy(target)
    else:
        from transformers import AutoModelForCausalLM

        folder = model_folder(target)
        if folder is None:
            raise SourceError(f"cannot load a model from {target}: no folder with config.json")
        read_json_object(folder / "config.json", "config")  # a FIFO or a list is refused here, in one line
        load_kwargs.setdefault("dtype", "auto")
        load_kwargs.setdefault("trust_remote_code", False)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs)
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise SourceError(f"transformers cannot load {folder} with {load_kwargs}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    pairs = _as_pairs(vectors)
    state = _checkpoint_names(module_state(model), model, pairs)
    src = open_weights(state)
    src.folder = model_folder(target) if not isinstance(target, torch.nn.Module) else src.folder
    if getattr(model, "config", None) is not None:
        src._config = model.config.to_dict()
    prep = _prepare(src, pairs, dataclasses.replace(opts, allow_pickle=False))
    pairs, plans, notes, rows, shared_base = prep.pairs, prep.plans, prep.notes, prep.token_map, prep.shared_base
    base_src = prep.base if opts.check_lineage else None
    lineage = [0.0, 0.0] if base_src is not None else None
    with torch.no_grad():
        for name, tensor in state.items():
            p = plans[name]
            if lineage is not None:
                accumulate(lineage, tensor, _base_for(name, base_src, shared_base, pairs, p))
            if p.added:
                tensor.copy_(merge_tensor(tensor, p, pairs))
            if rows is not None and rows.apply(name, tensor):
                p.token_rows_set = True
    if where is not None:  # the vectors were added where the model was loaded (the CPU); then it moves
        model = model.to(where)
    return model, _report(plans, notes, lineage, info=prep.info, checked=opts.check_lineage)


def _checkpoint_names(state: dict[str, torch.Tensor], model, pairs) -> dict[str, torch.Tensor]:
    """A loaded model's tensors under the names its checkpoint (and so a vector) gives them: transformers ≥ 5
    renames some on load (GPT-NeoX's ``embed_out`` → ``lm_head``)."""
    config = model.config.to_dict() if getattr(model, "config", None) is not None else {}
    rename = in_memory_name({**config, "architectures": [*(config.get("architectures") or []), type(model).__name__]})
    alias = {rename(n): n for vec, _ in pairs for n in vec.names if n not in state and rename(n) in state}
    return {alias.get(name, name): tensor for name, tensor in state.items()}
