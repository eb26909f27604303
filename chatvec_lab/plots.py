"""Pictures of chat vectors. Each ``plot_*(data, ax=None, ...) -> Figure``, titled and labelled, one style."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from chatvec_lab.naming import MODULE_ORDER

CMAP = "viridis"
RATES = ("ended_turn", "share_de", "refusal")  # metrics in [0, 1]: a drawn interval is clipped to that range
DIVERGING = "RdBu_r"


def new_axes(ax=None, figsize=(6.4, 4.0)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax.figure, ax


def style_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if xlabel == "layer":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _heatmap(ax, table: pd.DataFrame, cmap: str, annotate: bool, fmt: str = "{:.2f}", vmin=None, vmax=None,
             label: str = ""):
    values = table.to_numpy(dtype=float)
    im = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    if annotate:
        lo, hi = np.nanmin(values), np.nanmax(values)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                if np.isfinite(v):
                    light = (v - lo) / (hi - lo + 1e-12) < 0.5 if cmap == CMAP else abs(v) > 0.6
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                            color="white" if light else "black")
    ax.figure.colorbar(im, ax=ax, shrink=0.85, label=label)
    return im


def plot_layer_norms(stats, vector: str | None = None, ax=None, relative: bool = False):
    """‖Δ‖ (or ‖Δ‖/‖θ_base‖) per layer, one line per module kind."""
    from chatvec_lab.geometry import norms_by

    vector = vector or stats.names[0]
    df = norms_by(stats, ("layer", "module"))
    df = df[(df["vector"] == vector) & df["layer"].notna()]
    col = "rel_norm" if relative else "norm"
    fig, ax = new_axes(ax)
    for module in [m for m in MODULE_ORDER if m in set(df["module"])]:
        part = df[df["module"] == module].sort_values("layer")
        ax.plot(part["layer"].astype(int), part[col], marker="o", markersize=3, label=module)
    style_axes(ax, f"{'Relative norm' if relative else 'Norm'} of the vector by layer: {vector}", "layer",
               "‖Δ‖ / ‖θ_base‖" if relative else "‖Δ‖")
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_relative_norms_heatmap(stats, vector: str | None = None, ax=None):
    """Layer × module heatmap of ‖Δ‖/‖θ_base‖ (needs ``vector_stats(..., base=...)``)."""
    from chatvec_lab.geometry import norms_by

    vector = vector or stats.names[0]
    df = norms_by(stats, ("layer", "module"))
    df = df[(df["vector"] == vector) & df["layer"].notna()]
    table = df.pivot(index="layer", columns="module", values="rel_norm")
    table = table[[m for m in MODULE_ORDER if m in table.columns]]
    fig, ax = new_axes(ax)
    _heatmap(ax, table, CMAP, annotate=table.size <= 120, fmt="{:.3f}", label="‖Δ‖ / ‖θ_base‖")
    ax.set_title(f"Relative change per layer and module: {vector}", fontsize=11)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    return fig


def plot_cosine_matrix(cos: pd.DataFrame, ax=None, title: str = "Cosine similarity between vectors"):
    """Annotated sources × sources heatmap of cosine similarity."""
    fig, ax = new_axes(ax, figsize=(1.2 * len(cos) + 3, 1.0 * len(cos) + 2))
    _heatmap(ax, cos, DIVERGING, annotate=True, vmin=-1, vmax=1, label="cosine")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("vector")
    ax.set_ylabel("vector")
    return fig


def plot_layer_cosine(stats, pairs: list[tuple[str, str]] | None = None, ax=None, by: str = "layer"):
    """Cosine between two vectors, layer by layer (one line per pair)."""
    from chatvec_lab.geometry import cosine_by

    df = cosine_by(stats, by)
    df = df[df[by].notna()]
    if pairs:
        wanted = {f"{a} · {b}" for a, b in pairs} | {f"{b} · {a}" for a, b in pairs}
        df = df[df["pair"].isin(wanted)]
    fig, ax = new_axes(ax)
    for pair, part in df.groupby("pair"):
        part = part.sort_values(by)
        ax.plot(part[by].astype(int), part["cosine"], marker="o", markersize=3, label=pair)
    ax.axhline(0, color="0.5", linewidth=0.8)
    style_axes(ax, "Cosine similarity by layer", by, "cosine")
    ax.legend(fontsize=8)
    return fig


def plot_sign_agreement(stats, ax=None):
    """Share of coordinates with the same sign, per layer and pair (0.5 is what unrelated vectors give)."""
    from chatvec_lab.geometry import sign_agreement

    df = sign_agreement(stats, "layer")
    df = df[df["layer"].notna()]
    fig, ax = new_axes(ax)
    for pair, part in df.groupby("pair"):
        part = part.sort_values("layer")
        ax.plot(part["layer"].astype(int), part["sign_agreement"], marker="o", markersize=3, label=pair)
    ax.axhline(0.5, color="0.5", linestyle="--", linewidth=0.8, label="chance")
    style_axes(ax, "Sign agreement by layer", "layer", "share of coordinates with the same sign")
    ax.legend(fontsize=8)
    return fig


def plot_spectra(spectra_df: pd.DataFrame, ax=None, normalize: bool = True, max_lines: int = 12):
    """Singular values of matrix deltas (normalised to the largest), one line per tensor."""
    fig, ax = new_axes(ax)
    for _, row in spectra_df.head(max_lines).iterrows():
        s = np.asarray(row["singular_values"], dtype=float)
        if normalize and len(s) and s[0] > 0:
            s = s / s[0]
        ax.plot(np.arange(1, len(s) + 1), s, marker=".", linewidth=1,
                label=f"L{row['layer']} {row['module']} (eff. rank {row['effective_rank']:.1f})")
    ax.set_yscale("log")
    style_axes(ax, "Singular-value spectra of the vector's matrices", "index",
               "σᵢ / σ₁" if normalize else "σᵢ")
    ax.legend(fontsize=6, ncol=2)
    return fig


def save_compare_plots(stats, folder) -> list[Path]:
    """The figures of ``chatvec compare``, as PNG files in ``folder``."""
    from chatvec_lab.geometry import cosine_matrix

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"cosine_matrix": plot_cosine_matrix(cosine_matrix(stats))}
    for name in stats.names:
        figures[f"layer_norms_{name}"] = plot_layer_norms(stats, vector=name)
    if len(stats.names) > 1:
        figures["layer_cosine"] = plot_layer_cosine(stats)
        figures["sign_agreement"] = plot_sign_agreement(stats)
    paths = []
    for key, fig in figures.items():
        path = folder / f"{key}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_atlas(summary: pd.DataFrame, metric: str = "ended_turn", design: str = "keep-only",
               alpha_kind: str = "norm-matched", alpha: float | None = None, effect: bool = True, ax=None):
    """The atlas as a heatmap: layers × module kinds, the outer rows (embeddings, lm_head, norms) below; each
    cell annotated with its value. ``effect``: the change against the design's reference (keep-only: the
    target alone; knock-out: what is lost from the full vector), else the metric itself."""
    from chatvec_lab.atlas import heatmap_table

    value = f"{metric}_effect" if effect else metric
    table = heatmap_table(summary, value, design, alpha_kind, alpha)
    fig, ax = new_axes(ax, figsize=(0.9 * table.shape[1] + 3, 0.45 * table.shape[0] + 1.8))
    span = float(np.nanmax(np.abs(table.to_numpy(dtype=float)))) if table.size else 1.0
    _heatmap(ax, table, DIVERGING if effect else CMAP, annotate=True, vmin=-span if effect else 0,
             vmax=span if effect else 1, label=value)
    which = f"α = {alpha:g}" if alpha is not None and alpha_kind == "grid" else "norm-matched α"
    if not effect:
        title = f"{design}: {metric} per cell ({which})"
    elif design == "knock-out":
        title = f"knock-out: {metric} lost from the full vector without the cell ({which})"
    else:
        title = f"keep-only: {metric} gained over the target by the cell alone ({which})"
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer / part")
    return fig


def plot_scores(df: pd.DataFrame, metrics: Sequence[str] | None = None, ax=None, current: float | None = None,
                title: str = "Scores against the coefficient"):
    """Each metric's mean (with its 95% interval) against α; ``current`` marks the slider's α."""
    from chatvec_lab.sweep import METRIC_LABELS, summarize

    metrics = metrics or [m for m in ("ended_turn", "share_de", "refusal", "offensive") if m in df.columns]
    summary = summarize(df, metrics)
    fig, ax = new_axes(ax)
    for m in metrics:
        ax.plot(summary["alpha"], summary[m], marker="o", label=METRIC_LABELS.get(m, m))
        ax.fill_between(summary["alpha"], summary[f"{m}_lo"], summary[f"{m}_hi"], alpha=0.15)
    if current is not None:
        ax.axvline(current, color="0.3", linestyle="--", linewidth=1, label=f"α = {current:g}")
    style_axes(ax, title=title, xlabel="coefficient α", ylabel="mean over prompts and seeds")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_rank_curve(summary: pd.DataFrame, metrics: Sequence[str] = ("ended_turn", "share_de"), x: str = "rank",
                    alpha: float = 1.0, ax=None):
    """Behaviour of the low-rank vector against its rank (``x="rank"``) or the bytes its factors take
    (``x="stored_bytes"``), with 95% intervals; the full vector as a dashed line per metric."""
    from chatvec_lab.sweep import METRIC_LABELS

    rows = summary[summary["alpha"] == alpha]
    low, full = rows[rows["rank"] > 0].sort_values("rank"), rows[rows["rank"] == 0]
    fig, ax = new_axes(ax)
    for m in metrics:
        line, = ax.plot(low[x], low[m], marker="o", label=METRIC_LABELS.get(m, m))
        lo, hi = low[f"{m}_lo"], low[f"{m}_hi"]
        if m in RATES:  # the summaries' intervals already stay in [0, 1]; a table made elsewhere may not
            lo, hi = lo.clip(0, 1), hi.clip(0, 1)
        ax.fill_between(low[x], lo, hi, alpha=0.15, color=line.get_color())
        if len(full):
            ax.axhline(float(full[m].iloc[0]), color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2 if x == "rank" else 10)
    label = "rank r of every matrix" if x == "rank" else "bytes stored (float32 factors)"
    style_axes(ax, f"Low-rank chat vector at α = {alpha:g} (dashed: full vector)", label, "mean over prompts and seeds")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_merges(summary: pd.DataFrame, metric: str = "ended_turn", ax=None):
    """One line per source and merge method: the metric (95% interval as error bars) against α."""
    from chatvec_lab.sweep import METRIC_LABELS

    fig, ax = new_axes(ax)
    variants = list(dict.fromkeys(summary["variant"]))
    width = 0.8 / max(1, len(variants))
    alphas = sorted(summary["alpha"].unique())
    for i, variant in enumerate(variants):
        rows = summary[summary["variant"] == variant].set_index("alpha").reindex(alphas)
        xs = np.arange(len(alphas)) + (i - (len(variants) - 1) / 2) * width
        lo, hi = rows[f"{metric}_lo"], rows[f"{metric}_hi"]
        if metric in RATES:
            lo, hi = lo.clip(0, 1), hi.clip(0, 1)
        err = np.vstack([rows[metric] - lo, hi - rows[metric]]).clip(min=0)
        ax.bar(xs, rows[metric], width=width, yerr=err, capsize=2, label=variant)
    ax.set_xticks(range(len(alphas)), [f"α = {a:g}" for a in alphas])
    style_axes(ax, f"Two sources, one vector: {METRIC_LABELS.get(metric, metric)}", "", METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=8, loc="best", ncols=2)
    return fig


def plot_interference(table: pd.DataFrame, value: str = "trimmed_conflict", ax=None):
    """A heatmap of one ``interference`` column: layers (rows, the outer parts below) × module kinds."""
    cells = table[table["layer"] != "all"]
    grid = cells.pivot_table(index="layer", columns="module", values=value, aggfunc="first")
    order = [m for m in MODULE_ORDER if m in grid.columns]
    layers = sorted([r for r in grid.index if r != "outer"], key=int) + (["outer"] if "outer" in grid.index else [])
    grid = grid.reindex(index=layers, columns=order)
    fig, ax = new_axes(ax, figsize=(0.9 * grid.shape[1] + 3, 0.45 * grid.shape[0] + 1.8))
    _heatmap(ax, grid, CMAP, annotate=True, vmin=0, vmax=1 if value != "cosine" else None, label=value)
    ax.set_title(f"Interference between the two sources: {value.replace('_', ' ')}", fontsize=11)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    return fig
