"""Pictures of paths between models (``analysis/interpolation.py``'s tables): the loss along a path with the
straight chord between its endpoints, and what the line and the sphere do to each tensor's norm."""
from __future__ import annotations

import numpy as np
import pandas as pd

from chatvec_lab.errors import UsageError
from chatvec_lab.plots.style import new_axes, style_axes


def plot_interpolation(curve: pd.DataFrame, metric: str = "loss", texts: str | None = None, ax=None):
    """``metric`` (``loss``, ``barrier``, ``vs_a`` or ``vs_b``) against t, one line per pair, path and text set
    (only ``texts`` if given), its 95% interval shaded; for the loss, each path's chord between its endpoints
    dashed (no barrier: the curve stays on or below it)."""
    if metric not in ("loss", "barrier", "vs_a", "vs_b"):
        raise UsageError(f"metric must be loss, barrier, vs_a or vs_b, not {metric!r}")
    data = curve if texts is None else curve[curve["texts"] == texts]
    if data.empty:
        raise UsageError(f"no rows for texts {texts!r}")
    fig, ax = new_axes(ax, figsize=(7.0, 4.2))
    keys = [k for k in ("pair", "path", "texts") if k in data.columns]
    for key, part in data.groupby(keys, sort=False):
        part = part.sort_values("t")
        label = " · ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if k != "linear")
        line, = ax.plot(part["t"], part[metric], marker="o", markersize=3, label=label)
        ax.fill_between(part["t"], part[f"{metric}_lo"], part[f"{metric}_hi"], color=line.get_color(), alpha=0.15)
        if metric == "loss":
            ends = part[part["t"].isin([0.0, 1.0])].set_index("t")["loss"]
            if len(ends) == 2:
                ax.plot([0, 1], [ends[0.0], ends[1.0]], linestyle="--", linewidth=1, color=line.get_color(), alpha=0.7)
    if metric != "loss":
        ax.axhline(0, color="0.3", linewidth=0.8)
    ylabel = {"loss": "loss per token (nats)", "barrier": "loss above the chord (nats)",
              "vs_a": "loss minus endpoint a's (nats)", "vs_b": "loss minus endpoint b's (nats)"}[metric]
    title = "Loss along the path (dashed: the chord between the endpoints)" if metric == "loss" else \
        f"{ylabel[:1].upper()}{ylabel[1:]} along the path"
    style_axes(ax, title, "t (0: model a, 1: model b)", ylabel)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_slerp_norms(table: pd.DataFrame, ax=None, title: str = "Norm at t on the line and on the sphere"):
    """Per tensor, its norm on the line (``lerp_ratio``) and on the sphere (``slerp_ratio``), each over the
    interpolated endpoint norms (1 = kept); tensors where mergekit's slerp takes the line are ringed."""
    fig, ax = new_axes(ax, figsize=(8.0, 3.8))
    xs = np.arange(len(table))
    ax.axhline(1.0, color="0.3", linewidth=0.8)
    ax.plot(xs, table["lerp_ratio"], "o", markersize=4, label="line (lerp)")
    ax.plot(xs, table["slerp_ratio"], "s", markersize=4, label="sphere (slerp)")
    linear = table["linear"].to_numpy(dtype=bool)
    if linear.any():
        ax.plot(xs[linear], table["slerp_ratio"][linear], "o", markersize=9, markerfacecolor="none",
                markeredgecolor="0.3", label="|cos| > 0.9995: slerp takes the line")
    short = [str(n).replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "")
             .replace("mlp.", "") for n in table["tensor"]]
    ax.set_xticks(xs, short, rotation=90, fontsize=6)
    style_axes(ax, title, "tensor", "norm / interpolated endpoint norms")
    ax.legend(fontsize=7, loc="best")
    return fig
