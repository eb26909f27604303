"""Behaviour of vector variants side by side: low-rank versions of a vector, and merges of several sources.

    curve = rank_curve(toy.path("cp"), cv, ranks=[1, 4, 16, 64], prompts=chat_de, seeds=3)
    merges = merge_sweep(toy.path("cp"), {"chat": cv, "chat-alt": cv_alt}, alphas=[0.5, 1.0], prompts=chat_de)

Each variant is one more vector of one ``LiveModel`` (``sweep.sweep`` with a point per variant and α): the
model is loaded once and moves between variants by in-place changes. The tidy table has a row per
(variant, α, prompt, seed); ``summarize(table)`` gives means with 95% intervals per variant and α.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from chatvec_lab.errors import UsageError
from chatvec_lab.core.merge import METHODS, merge
from chatvec_lab.behaviour.sweep import summarize as summarize_sweep
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.core.vector import ChatVector

MERGE_SETTINGS = {  # the defaults mergekit's examples use for two sources
    "linear": {}, "ties": {"density": 0.2}, "dare_linear": {"density": 0.2}, "dare_ties": {"density": 0.2},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
}


UNTOUCHED = "untouched"  # the variant label of α = 0 rows: the target itself


def compare_variants(target, variants: Mapping[str, ChatVector], alphas: Sequence[float], prompts: Sequence[str],
                     **sweep_kwargs) -> pd.DataFrame:
    """``sweep`` over ``{label: vector}``, one variant at a time at each α; adds ``variant`` and ``alpha``.

    At α = 0 every variant is the untouched target: it is run once and labelled ``UNTOUCHED`` (not counted
    once per variant, which would label it as the first variant and multiply its replies)."""
    if not variants:
        raise UsageError("no variant to compare")
    if UNTOUCHED in variants:
        raise UsageError(f"{UNTOUCHED!r} labels the α = 0 rows: rename that variant")
    labels = list(variants)
    alphas = [float(a) for a in alphas]
    points = ([{label: 0.0 for label in labels}] if 0.0 in alphas else []) + \
        [{label: a} for label in labels for a in alphas if a != 0.0]
    df = sweep(target, dict(variants), points, prompts, **sweep_kwargs)
    alpha_columns = [f"alpha_{label}" for label in labels]
    active = df[alpha_columns].ne(0)
    df.insert(0, "variant", [labels[row.argmax()] if row.any() else UNTOUCHED for row in active.to_numpy()])
    df["alpha"] = df[alpha_columns].sum(axis=1)
    return df.drop(columns=alpha_columns)


def rank_curve(target, vector: ChatVector, ranks: Sequence[int], prompts: Sequence[str],
               alphas: Sequence[float] = (1.0,), method: str = "auto", **sweep_kwargs) -> pd.DataFrame:
    """Behaviour of ``vector.low_rank(r)`` for each r, and of the full vector (``rank`` = 0 marks it), with
    ``stored_bytes``: what the rank-r factors take in float32 (the full vector: its dense size)."""
    vector = ChatVector.open(vector)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise UsageError(f"ranks must be positive integers, not {ranks}")
    variants = {f"rank {r}": vector.low_rank(r, method=method) for r in ranks} | {"full": vector}
    df = compare_variants(target, variants, alphas, prompts, **sweep_kwargs)
    rank_of = {f"rank {r}": r for r in ranks} | {"full": 0, UNTOUCHED: -1}  # -1: no vector at all (α = 0)
    dense = 4 * vector.parameters
    df.insert(1, "rank", df["variant"].map(rank_of))
    df.insert(2, "stored_bytes", [dense if r == 0 else 0 if r < 0 else vector.low_rank_bytes(r) for r in df["rank"]])
    return df


def merge_sweep(target, sources: Mapping[str, ChatVector], prompts: Sequence[str], alphas: Sequence[float] = (1.0,),
                methods: Sequence[str] = METHODS, settings: Mapping[str, dict] | None = None, seed: int = 0,
                **sweep_kwargs) -> pd.DataFrame:
    """Each source alone and each merge method over all sources (weights 1), at each α."""
    if len(sources) < 2:
        raise UsageError("merge_sweep needs at least two sources")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UsageError(f"unknown merge method(s) {sorted(unknown)}: choose from {METHODS}")
    clash = set(sources) & set(methods)
    if clash:
        raise UsageError(f"source name(s) {sorted(clash)} are merge methods' names too: rename the source(s)")
    settings = {**MERGE_SETTINGS, **(settings or {})}
    opened = {name: ChatVector.open(v) for name, v in sources.items()}
    variants: dict[str, ChatVector] = dict(opened)
    for method in methods:
        variants[method] = merge([(v, 1.0) for v in opened.values()], method=method, seed=seed, **settings[method])
    return compare_variants(target, variants, alphas, prompts, **sweep_kwargs)


def summarize(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and 95% interval of each metric per variant and α (keeping ``rank``/``stored_bytes`` if there)."""
    keys = [k for k in ("variant", "rank", "stored_bytes", "alpha") if k in df.columns]
    out = summarize_sweep(df, metrics, by=keys)
    if "rank" in out.columns:  # the full vector (rank 0) last, the ranks in numeric order
        out = out.assign(_order=out["rank"].replace(0, float("inf")).replace(-1, float("-inf"))).sort_values(["_order", "alpha"])
        out = out.drop(columns="_order").reset_index(drop=True)
    return out
