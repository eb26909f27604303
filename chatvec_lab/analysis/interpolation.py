"""The loss along the path between two models of one architecture: linear mode connectivity and its barrier.

    curve = interpolation_curve(CHAT, CP, {"de": german, "en": english}, ts=[0, 0.25, 0.5, 0.75, 1])
    curve[curve["t"] == 0.5]          # loss with its 95% interval, perplexity, and the barrier at the midpoint
    barriers(curve)                   # per text set: the highest barrier along the path, and where

At each ``t`` the model's weights are θ(t) = (1 − t)·θ_a + t·θ_b (``path="linear"``), or each tensor's
spherical interpolation as mergekit's slerp computes it (``path="slerp"``: ``core.spherical.slerp``, the same
numbers as ``chatvec merge`` with ``merge_method: slerp``, ``base_model`` a and ``t``). The endpoints t = 0
and t = 1 are always measured: the barrier needs them.

Columns, one row per ``t`` and text set (``texts``):

- ``loss``: the mean cross-entropy per token of the texts (the log of ``behaviour.scoring.perplexity``'s
  number), ``loss_lo``/``loss_hi`` its 95% interval (``analysis.intervals.mean_interval`` over the tokens,
  clustered by text: the texts, not the tokens, are the sample); ``ppl``: exp(loss);
- ``vs_a``, ``vs_b``: loss(t) minus the loss of endpoint a (t = 0) or b (t = 1), token by token (paired: the
  same tokens under both models), each with its 95% interval (``_lo``, ``_hi``), clustered by text;
- ``barrier``: loss(t) minus the straight chord between the endpoints, (1 − t)·loss(0) + t·loss(1), token by
  token and paired (the same tokens under three models), with ``barrier_lo``/``barrier_hi``: the loss barrier
  of Entezari et al. (arXiv 2110.06296). Frankle et al. (arXiv 1912.05671) call two networks *linearly mode
  connected* when the test error along the line rises no more than noise above the mean of the endpoints'
  errors; a barrier whose interval lies above 0 is a bump of loss between them.

``permute_mlp_units(model, seed)`` gives a model that computes exactly the same function with other weights
(the hidden units of every MLP shuffled): the line from a model to its permuted copy is how a barrier looks
between two models that share no base. By default everything is computed in float32 on the CPU, one model in
memory besides the two endpoints' weights (kept on the CPU in the dtype the model is measured in); ``device=``
and ``dtype=`` (``io.devices``: ``"auto"``, ``"cuda"``, ``"bfloat16"`` …) move the measured model to a GPU and
change its precision, for real checkpoints. Each point of the path is computed in float32 on the CPU, tensor by
tensor, then cast to ``dtype``.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from chatvec_lab.analysis.intervals import mean_interval
from chatvec_lab.core.spherical import slerp
from chatvec_lab.errors import MismatchError, UsageError
from chatvec_lab.io.devices import resolve_device, resolve_dtype

PATHS = ("linear", "slerp")
COLUMNS = ["pair", "path", "t", "texts", "n_texts", "tokens", "loss", "loss_lo", "loss_hi", "ppl", "vs_a", "vs_a_lo",
           "vs_a_hi", "vs_b", "vs_b_lo", "vs_b_hi", "barrier", "barrier_lo", "barrier_hi"]
LINEAR_ABOVE = 0.9995  # mergekit's slerp takes the straight line where |cos| of the two tensors exceeds this


def _load(spec, device=torch.device("cpu"), dtype=torch.float32) -> torch.nn.Module:
    if isinstance(spec, torch.nn.Module):
        model = copy.deepcopy(spec).to(device).eval()
        for param in model.parameters():  # the parameters only: buffers (rotary frequencies) keep their dtype,
            param.data = param.data.to(dtype)  # as from_pretrained(dtype=) leaves them
        return model
    if isinstance(spec, (str, Path)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(spec), dtype=dtype).to(device).eval()
    raise UsageError(f"a model is a folder, a hub id or a torch module, not {type(spec).__name__}")


def _tokenizer_of(a, b, tokenizer):
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    for spec in (a, b):
        if isinstance(spec, (str, Path)):
            return AutoTokenizer.from_pretrained(str(spec))
        folder = getattr(getattr(spec, "config", None), "_name_or_path", "")
        if folder and Path(folder).is_dir():
            return AutoTokenizer.from_pretrained(folder)
    raise UsageError("pass tokenizer=: neither model is a folder to take one from")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters, copied to the CPU in their own dtype."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def _check_times(ts) -> list[float]:
    try:
        values = [float(t) for t in ts]
    except (TypeError, ValueError):
        raise UsageError(f"ts must be numbers, not {ts!r}") from None
    if not values or not all(math.isfinite(t) for t in values):
        raise UsageError(f"ts must be finite numbers, not {ts!r}")
    return sorted(set(values) | {0.0, 1.0})


def _texts(texts) -> dict[str, list[str]]:
    sets = {"texts": texts} if isinstance(texts, (list, tuple)) else dict(texts) if isinstance(texts, Mapping) else None
    if sets is None or not sets:
        raise UsageError("texts must be a list of strings or {label: list of strings}")
    for label, values in sets.items():
        if isinstance(values, str) or not values or not all(isinstance(x, str) and x.strip() for x in values):
            raise UsageError(f"texts {label!r} must be a non-empty list of non-empty strings")
    return {str(k): list(v) for k, v in sets.items()}


@torch.no_grad()
def token_losses(model, tokenizer, texts: Sequence[str], max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The cross-entropy of every predicted token of ``texts`` (each text on its own, as ``perplexity`` scores
    it) and the index of the text each belongs to; texts shorter than two tokens are left out."""
    losses, owners = [], []
    device = next(model.parameters()).device
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids.to(device)).logits[0, :-1].float().cpu()
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").numpy())
        owners.append(np.full(ids.shape[1] - 1, i))
    if not losses:
        raise UsageError("no text long enough (two tokens or more) to measure a loss")
    return np.concatenate(losses).astype(np.float64), np.concatenate(owners)


def _set_weights(model, wa, wb, t: float, path: str) -> None:
    params = dict(model.named_parameters())
    for name, a in wa.items():
        a, b = a.float(), wb[name].float()  # each point in float32 on the CPU, then cast to the model's dtype
        value = a + t * (b - a) if path == "linear" else slerp(t, a, b)
        params[name].data.copy_(value.to(device=params[name].device, dtype=params[name].dtype))


def interpolation_curve(a, b, texts, *, tokenizer=None, ts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                        path: str = "linear", pair: str | None = None, max_length: int = 256, device="cpu",
                        dtype="float32") -> pd.DataFrame:
    """The loss of ``texts`` along the path from model ``a`` (t = 0) to model ``b`` (t = 1); see the module's
    docstring for the columns. ``a``, ``b``: model folders, hub ids or torch modules of one architecture
    (neither is changed); ``texts``: a list of strings or ``{label: list}``; ``pair``: the label of the pair
    (default ``"a ↔ b"`` from the folders' names); ``tokenizer``: default, the first folder's. ``device``,
    ``dtype``: where and in which precision the model is measured (``io.devices``; ``"auto"``: the GPU if there
    is one, and ``a``'s own dtype); default float32 on the CPU."""
    if path not in PATHS:
        raise UsageError(f"path must be one of {PATHS}, not {path!r}")
    times, sets = _check_times(ts), _texts(texts)
    device, dtype = resolve_device(device), resolve_dtype(dtype, a)
    tok = _tokenizer_of(a, b, tokenizer)
    model = _load(a, device, dtype)
    wa, wb = _weights(model), _weights(_load(b, torch.device("cpu"), dtype))
    if wa.keys() != wb.keys() or any(wa[n].shape != wb[n].shape for n in wa):
        raise MismatchError("the two models differ in their tensors or shapes: a path needs one architecture")
    if pair is None:
        names = [Path(str(x)).name if isinstance(x, (str, Path)) else type(x).__name__ for x in (a, b)]
        pair = f"{names[0]} ↔ {names[1]}"
    measured = {}
    for t in times:
        _set_weights(model, wa, wb, t, path)
        for label, values in sets.items():
            measured[(t, label)] = token_losses(model, tok, values, max_length)
    rows = []
    for t in times:
        for label in sets:
            loss, owner = measured[(t, label)]
            at_a, at_b = measured[(0.0, label)][0], measured[(1.0, label)][0]
            row = {"pair": pair, "path": path, "t": t, "texts": label, "n_texts": len(set(owner.tolist())),
                   "tokens": len(loss)}
            for name, values in (("loss", loss), ("vs_a", loss - at_a), ("vs_b", loss - at_b),
                                 ("barrier", loss - ((1 - t) * at_a + t * at_b))):
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(values, owner)
            row["ppl"] = math.exp(row["loss"])
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def barriers(curve: pd.DataFrame) -> pd.DataFrame:
    """Per pair, path and text set: the row of the highest barrier inside the path (0 < t < 1; at the ends it is
    0 by definition), ``t`` saying where, and ``above_zero``: whether its 95% interval lies wholly above 0 (a
    bump of loss that these texts can show). A path measured at its ends only has no row."""
    keys = [k for k in ("pair", "path", "texts") if k in curve.columns]
    curve = curve[(curve["t"] > 0) & (curve["t"] < 1)].reset_index(drop=True)  # a concatenation repeats the index
    top = curve.loc[curve.groupby(keys, sort=False)["barrier"].idxmax()]
    top = top[keys + ["t", "barrier", "barrier_lo", "barrier_hi", "loss", "ppl"]].reset_index(drop=True)
    top["above_zero"] = top["barrier_lo"] > 0
    return top


def _tensors(spec):
    """Something that gives tensors by name: a ``ChatVector`` as it is, anything else through ``open_weights``."""
    from chatvec_lab.core.vector import ChatVector
    from chatvec_lab.io.sources import open_weights

    if isinstance(spec, ChatVector):
        return spec, list(spec.names)
    source = open_weights(spec)
    return source, list(source.keys())


def slerp_norms(a, b, t: float = 0.5) -> pd.DataFrame:
    """Per tensor, what the line and the sphere do to the norm between ``a`` and ``b`` (model folders, modules or
    ``ChatVector``s: weights or deltas) at ``t``: ``cosine`` of the two tensors, ``norm_a``, ``norm_b``,
    ``lerp_norm`` (of (1 − t)·a + t·b), ``slerp_norm`` (of ``core.spherical.slerp``, mergekit's), ``linear``
    (True where |cosine| > 0.9995, where mergekit's slerp takes the line), and each norm over the
    interpolated endpoint norms (1 − t)·‖a‖ + t·‖b‖ (``lerp_ratio``, ``slerp_ratio``)."""
    t = float(t)
    sa, names = _tensors(a)
    sb, names_b = _tensors(b)
    if set(names) != set(names_b):
        raise MismatchError("the two hold different tensors: compare two models (or two vectors) of one architecture")
    rows = []
    for name in names:
        x, y = sa[name].double(), sb[name].double()
        if x.shape != y.shape:
            raise MismatchError(f"tensor {name!r}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        na, nb = float(x.norm()), float(y.norm())
        cos = float((x.flatten() @ y.flatten()) / (na * nb)) if na > 0 and nb > 0 else math.nan
        ends = (1 - t) * na + t * nb
        lerp_norm = float(((1 - t) * x + t * y).norm())
        slerp_norm = float(slerp(t, x.float(), y.float()).double().norm())
        rows.append({"tensor": name, "cosine": cos, "norm_a": na, "norm_b": nb, "lerp_norm": lerp_norm,
                     "slerp_norm": slerp_norm, "linear": bool(abs(cos) > LINEAR_ABOVE),
                     "lerp_ratio": lerp_norm / ends if ends else math.nan,
                     "slerp_ratio": slerp_norm / ends if ends else math.nan})
    return pd.DataFrame(rows)


def permute_mlp_units(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose MLP hidden units are shuffled in every block (rows of ``gate_proj`` and
    ``up_proj``, columns of ``down_proj``, one random order per block): the same function, other weights.
    Llama-style MLPs only (``mlp.gate_proj``/``up_proj``/``down_proj``)."""
    out = copy.deepcopy(model)
    blocks = [m for name, m in out.named_modules() if name.endswith("mlp") and hasattr(m, "up_proj")]
    if not blocks or not all(hasattr(m, "gate_proj") and hasattr(m, "down_proj") for m in blocks):
        raise UsageError("permute_mlp_units needs Llama-style MLPs (mlp.gate_proj, mlp.up_proj, mlp.down_proj)")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for mlp in blocks:
            order = torch.randperm(mlp.up_proj.weight.shape[0], generator=gen)
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight[order])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[order])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])
    return out
