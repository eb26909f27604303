"""Pictures of behaviour: sweeps, the atlas, rank curves, merges, benchmark scores."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from chatvec_lab.plots.style import CMAP, DIVERGING, RATES, heatmap, new_axes, style_axes


def plot_atlas(summary: pd.DataFrame, metric: str = "ended_turn", design: str = "keep-only",
               alpha_kind: str = "norm-matched", alpha: float | None = None, effect: bool = True, ax=None):
    """The atlas as a heatmap: layers × module kinds, the outer rows (embeddings, lm_head, norms) below; each
    cell annotated with its value. ``effect``: the change against the design's reference (keep-only: the
    target alone; knock-out: what is lost from the full vector), else the metric itself."""
    from chatvec_lab.behaviour.atlas import heatmap_table

    value = f"{metric}_effect" if effect else metric
    table = heatmap_table(summary, value, design, alpha_kind, alpha)
    fig, ax = new_axes(ax, figsize=(0.9 * table.shape[1] + 3, 0.45 * table.shape[0] + 1.8))
    span = float(np.nanmax(np.abs(table.to_numpy(dtype=float)))) if table.size else 1.0
    heatmap(ax, table, DIVERGING if effect else CMAP, annotate=True, vmin=-span if effect else 0,
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
    from chatvec_lab.behaviour.sweep import METRIC_LABELS, summarize

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
    from chatvec_lab.behaviour.sweep import METRIC_LABELS

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
    from chatvec_lab.behaviour.sweep import METRIC_LABELS

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




def plot_eval(df: pd.DataFrame, ax=None, metrics: Sequence[str] | None = None,
              title: str = "Benchmark scores against the coefficient"):
    """Harness scores (``behaviour.harness.evaluate_harness``'s table) against α: a line per task and metric (and
    per value of the other vectors' α when there are several), its standard error as error bars. ``metrics``:
    only these (all by default)."""
    from chatvec_lab.errors import UsageError

    missing = [c for c in ("task", "metric", "alpha", "value", "stderr") if c not in df.columns]
    if missing:
        raise UsageError(f"plot_eval needs the columns task, metric, alpha, value, stderr; missing {missing}")
    rows = df if metrics is None else df[df["metric"].isin(list(metrics))]
    others = [c for c in df.columns if c.startswith("alpha_")][1:]  # alpha is the first vector's α
    fig, ax = new_axes(ax)
    for key, group in rows.groupby(["task", "metric", *others], sort=False):
        group = group.sort_values("alpha")
        label = f"{key[0]} · {key[1]}" + "".join(f", {c[6:]} = {v:g}" for c, v in zip(others, key[2:]))
        err = group["stderr"].to_numpy(dtype=float)
        ax.errorbar(group["alpha"], group["value"], yerr=np.where(np.isfinite(err), err, 0.0), marker="o",
                    capsize=3, label=label)
    first = next((c[6:] for c in df.columns if c.startswith("alpha_")), None)
    xlabel = f"coefficient α of {first}" if others else "coefficient α"
    style_axes(ax, title=title, xlabel=xlabel, ylabel="harness metric (± standard error)")
    if len(rows):
        ax.legend(fontsize=8, loc="best")
    return fig
