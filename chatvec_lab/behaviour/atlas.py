"""The ablation atlas: where in the weights a chat vector's behaviour lives.

The vector is cut into *cells*: one per layer block × module kind (``attn_q`` … ``mlp_down``), plus three outer
rows (``embeddings``, ``lm_head``, ``norms``: every norm of the model). Two designs per cell:

- *keep-only*: the vector in that cell alone (target + α·v_cell);
- *knock-out*: the vector everywhere but that cell (target + α·(v − v_cell)).

Each at the grid's α values and at a *norm-matched* α: the α at which the cell's own weights change by the same
relative amount as the full vector at α = 1 changes the whole model (‖α·v_cell‖/‖θ_cell‖ = ‖v‖/‖θ‖). A partial
vector carries a fraction of the norm, so at α = 1 "no effect" can mean "too small", not "not here": the matched
α separates the two. References: the target alone (α = 0) and the full vector at each α.

Every change is made in place on one ``LiveModel``: moving from one cell to the next rewrites only the tensors
whose coefficient changes.

    df = atlas(toy.path("cp"), cv, prompts, alphas=(1.0,))
    s = summarize_atlas(df)                  # one row per cell × design × α, with 95% intervals
    rank_cells(s)                            # cells by effect per unit of the vector's norm
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from chatvec_lab.behaviour.engines import EngineSpec, TransformersEngine, load_target, runtime_key
from chatvec_lab.errors import UsageError
from chatvec_lab.analysis.intervals import estimate, metric_kind
from chatvec_lab.behaviour.cache import CellCache, check_cache_dir, files_key, vector_key
from chatvec_lab.behaviour.grid import CellRunner, check_seeds, GridCell, GridSettings, LocalExecutor, run_grid
from chatvec_lab.io.naming import MODULE_ORDER, parse
from chatvec_lab.core.plan import Cell, cell_coefficient, cell_of  # the regions live with the coefficient rules
from chatvec_lab.core.model_merge import open_source
from chatvec_lab.io.sources import module_state, open_weights
from chatvec_lab.core.vector import ChatVector

__all__ = ["Cell", "cell_of", "cells_of", "cell_norms", "norm_matched_alpha", "cell_coefficient", "atlas",
           "summarize_atlas", "rank_cells", "heatmap_table", "OUTER_ROWS", "DESIGNS", "METRICS"]
OUTER_ROWS = ("embeddings", "lm_head", "norms")
DESIGNS = ("keep-only", "knock-out")
METRICS = ("ended_turn", "share_de", "refusal")


def cells_of(vector: ChatVector) -> list[Cell]:
    """The vector's cells: layers in order, modules in ``naming.MODULE_ORDER``, then the outer rows."""
    found = {cell_of(parse(n)) for n in vector.names}
    inner = sorted((c for c in found if c.row.startswith("layer ")),
                   key=lambda c: (int(c.row.split()[1]), MODULE_ORDER.index(c.module) if c.module in MODULE_ORDER else 99))
    outer = [c for r in OUTER_ROWS + ("other",) for c in found if c.row == r]
    return inner + outer


def cell_norms(vector: ChatVector, state: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per cell: ‖v_cell‖², ‖θ_cell‖² (the target's weights), and the share of the vector's squared norm."""
    rows: dict[Cell, list[float]] = {}
    for name in vector.names:
        cell = cell_of(parse(name))
        v = vector[name].double()
        t = state[name].double() if name in state else torch.zeros(())
        acc = rows.setdefault(cell, [0.0, 0.0])
        acc[0] += float(v.pow(2).sum())
        acc[1] += float(t.pow(2).sum())
    total_v = sum(a for a, _ in rows.values())
    return pd.DataFrame([{"row": c.row, "module": c.module, "cell": c.label, "vector_sq": a, "target_sq": b,
                          "norm_share": a / total_v if total_v else math.nan} for c, (a, b) in rows.items()])


def norm_matched_alpha(norms: pd.DataFrame, cell: Cell, design: str) -> float:
    """The α at which the part of the vector a design keeps changes its own weights by the relative amount
    the full vector (α = 1) changes the whole model."""
    full = math.sqrt(norms["vector_sq"].sum() / norms["target_sq"].sum())
    here = (norms["row"] == cell.row) & (norms["module"] == cell.module)
    part = norms[here] if design == "keep-only" else norms[~here]
    v, t = part["vector_sq"].sum(), part["target_sq"].sum()
    return full * math.sqrt(t / v) if v > 0 else math.nan


def atlas(target, vector: ChatVector, prompts: Sequence[str], *, alphas: Sequence[float] = (1.0,),
          designs: Sequence[str] = DESIGNS, norm_matched: bool = True, cells: Sequence[Cell] | None = None,
          seeds: int = 1, max_new_tokens: int = 64, language: str = "de", tokenizer=None,
          scorers: Sequence[str] = ("language", "refusal"), batch_size: int | None = None, progress: bool = True,
          executor=None, cache_dir=None, device="auto", dtype="auto", **gen_kwargs) -> pd.DataFrame:
    """The tidy atlas: one row per cell × design × α × prompt × seed (and the references: ``design`` =
    ``target`` at α = 0, ``full`` at each α), with ``ended_turn`` and the scorers' columns.

    ``vector``: a vector, a saved vector's folder, or a merge's output folder (``chatvec merge``: merged − base).
    ``target``: a model folder (loaded on ``device`` in ``dtype``: ``auto`` is the GPU if there is one and the
    checkpoint's own dtype; see ``chatvec_lab.io.devices``) or a model (with ``tokenizer=``). ``alpha_kind`` says
    whether a row's α is from the grid or norm-matched; ``norm_share`` is the share of ‖v‖² the design keeps.
    ``executor`` / ``cache_dir``: as for ``sweep`` (``grid.RayExecutor`` spreads the cells over Ray actors, each
    with its own model; a per-cell cache lets an interrupted atlas resume). ``batch_size``: prompts generated
    together (None: every prompt of a cell, up to a memory-aware cap; see ``generation.generate``)."""
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("the atlas needs non-empty prompts")
    unknown = set(designs) - set(DESIGNS)
    if unknown:
        raise UsageError(f"unknown design(s) {sorted(unknown)}: choose from {DESIGNS}")
    seed_list = check_seeds(seeds)  # a count or distinct integer seeds: one clear line before any work
    try:
        alphas = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise UsageError(f"alphas must be numbers, not {alphas!r}") from None
    if not alphas or any(not math.isfinite(a) for a in alphas) or len(set(alphas)) != len(alphas):
        raise UsageError(f"alphas must be distinct finite numbers, not {alphas}")
    executor = executor if executor is not None else LocalExecutor()
    local = isinstance(executor, LocalExecutor)
    if isinstance(target, torch.nn.Module):
        if tokenizer is None:
            raise UsageError("pass tokenizer= with an in-memory model")
        if not local:
            raise UsageError("a distributed atlas loads the model in each worker: give the target as a folder or hub id")
        state = {n: t.detach() for n, t in module_state(target).items()}
    else:
        state = open_weights(target)
    runtime = runtime_key(target, None, device, dtype)  # a device this machine lacks is refused here
    vector = open_source(vector)  # a merge's output folder: merged − the base it records
    spec = None if local else EngineSpec.of(target, {"v": vector}, device=device, dtype=dtype, batch_size=batch_size)
    vector = ChatVector.open(vector)
    norms = cell_norms(vector, state)
    cells = list(cells) if cells is not None else cells_of(vector)
    # norm-matched effects are measured against the full vector at α = 1: run that reference even when the grid
    # lacks it (else every such effect is NaN)
    references = alphas + ([1.0] if norm_matched and 1.0 not in alphas else [])
    runs = [("target", None, "grid", 0.0)] + [("full", None, "grid", a) for a in references]
    for cell in cells:
        for design in designs:
            runs += [(design, cell, "grid", a) for a in alphas]
            if norm_matched:
                runs.append((design, cell, "norm-matched", norm_matched_alpha(norms, cell, design)))
    runs = [r for r in runs if not math.isnan(r[3])]
    grid_cells = []
    for design, cell, kind, alpha in runs:
        for seed in seed_list:
            grid_cells.append(GridCell(len(grid_cells), (("v", alpha),), seed, perplexity=False,
                                       region=(design, cell.row if cell else None, cell.module if cell else None)))
    settings = GridSettings(tuple(prompts), tuple(scorers), max_new_tokens, language,
                            gen_kwargs=tuple(gen_kwargs.items()))
    cache = None
    if cache_dir is not None and not isinstance(target, torch.nn.Module):
        check_cache_dir(cache_dir, [Path(target), *vector.input_paths()])
        cache = CellCache(cache_dir, {"atlas": 1, "target": files_key([target]), "vector": vector_key(vector),
                                      "runtime": runtime, **settings.key()}, prompts)
    engine = None

    def make_runner() -> CellRunner:
        nonlocal engine, tokenizer
        model, checkpoint = target, None
        if not isinstance(target, torch.nn.Module):
            model, tokenizer = load_target(target, device=device, dtype=dtype)
            checkpoint = target
        engine = TransformersEngine(model, tokenizer, {"v": vector}, batch_size=batch_size, checkpoint=checkpoint)
        return CellRunner(engine, settings)

    try:
        rows = run_grid(executor, make_runner, spec, settings, grid_cells, cache=cache, progress=progress)
    finally:
        if engine is not None:
            engine.live.reset()  # an in-memory target is left exactly as it was found
    frames = []
    per_cell = len(prompts)
    if len(rows) != per_cell * len(grid_cells):  # every cell is the prompts' rows, cached or fresh
        raise RuntimeError(f"the atlas grid returned {len(rows)} rows for {len(grid_cells)} cells × {per_cell} prompts")
    for gc, (design, cell, kind, alpha) in zip(grid_cells, (r for r in runs for _ in seed_list)):
        df = rows.iloc[gc.index * per_cell:(gc.index + 1) * per_cell].drop(columns=["alpha", "alpha_v"])
        df = df.reset_index(drop=True)
        if cell is None:
            share = 0.0 if design == "target" else 1.0
        else:
            here = (norms["row"] == cell.row) & (norms["module"] == cell.module)
            kept = norms.loc[here, "norm_share"].sum()
            share = kept if design == "keep-only" else 1.0 - kept
        df.insert(0, "norm_share", share)
        df.insert(0, "alpha_kind", kind)
        df.insert(0, "alpha", alpha)
        df.insert(0, "design", design)
        df.insert(0, "module", cell.module if cell else "all")
        df.insert(0, "row", cell.row if cell else "all")
        df.insert(0, "cell", cell.label if cell else design)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarize_atlas(df: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One row per cell × design × α: each metric's mean with a 95% interval, and its effect: keep-only against
    the target alone, knock-out against the full vector at the same α (for a norm-matched α, the full vector at
    α = 1).

    The intervals are ``sweep.summarize``'s (``chatvec_lab.analysis.intervals``): a rate (``ended_turn``, ``refusal``)
    gets the Wilson score interval on the effective number of replies (seeds of one prompt are clustered), so
    it stays inside [0, 1] and keeps a width when every reply agrees; ``share_de`` gets mean ± t·SE over
    prompts, clipped to [0, 1]."""
    metrics = [m for m in metrics if m in df.columns]
    kinds = {m: metric_kind(m, df[m]) for m in metrics}
    keys = ["cell", "row", "module", "design", "alpha_kind", "alpha", "norm_share"]
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key))
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = estimate(g[m], kinds[m], g["prompt"] if "prompt" in g else None)
        row["replies"] = len(g)
        rows.append(row)
    s = pd.DataFrame(rows)
    target = s[s["design"] == "target"]
    full = s[s["design"] == "full"].set_index("alpha")
    for m in metrics:
        base = float(target[m].iloc[0]) if len(target) else math.nan

        def reference(r):
            if r["design"] == "keep-only":
                return base
            a = r["alpha"] if r["alpha_kind"] == "grid" else 1.0
            return float(full.loc[a, m]) if a in full.index else math.nan
        ref = s.apply(reference, axis=1)
        effect = s[m] - ref
        s[f"{m}_effect"] = np.where(s["design"] == "knock-out", -effect, effect)  # knock-out: what is lost
    return s


def rank_cells(summary: pd.DataFrame, metric: str = "ended_turn", design: str = "keep-only",
               alpha_kind: str = "norm-matched") -> pd.DataFrame:
    """Cells ranked by effect per unit of the vector's norm (effect ÷ √norm_share of what the design keeps or
    removes), for one design and kind of α."""
    s = summary[(summary["design"] == design) & (summary["alpha_kind"] == alpha_kind)].copy()
    part = s["norm_share"] if design == "keep-only" else 1 - s["norm_share"]
    s["effect_per_norm"] = s[f"{metric}_effect"] / np.sqrt(part.clip(lower=1e-12))
    cols = ["cell", "alpha", "norm_share", metric, f"{metric}_lo", f"{metric}_hi", f"{metric}_effect",
            "effect_per_norm"]
    return s.sort_values("effect_per_norm", ascending=False)[cols].reset_index(drop=True)


def heatmap_table(summary: pd.DataFrame, value: str, design: str, alpha_kind: str = "grid",
                  alpha: float | None = None) -> pd.DataFrame:
    """``value`` as a table: layer rows × module columns, then the outer rows (their value in column ``all``)."""
    s = summary[(summary["design"] == design) & (summary["alpha_kind"] == alpha_kind)]
    if alpha is not None and alpha_kind == "grid":
        s = s[s["alpha"] == alpha]
    inner = s[s["row"].str.startswith("layer ")]
    table = inner.pivot_table(index="row", columns="module", values=value, aggfunc="first", sort=False)
    modules = [m for m in MODULE_ORDER if m in table.columns]
    table = table[modules]
    for r in OUTER_ROWS:
        outer = s[s["row"] == r]
        if len(outer):
            table.loc[r] = np.nan
            table.loc[r, "all"] = float(outer[value].iloc[0])
    return table
