"""The lab's one plotting style: axes, titles, heatmaps, colour maps."""
from __future__ import annotations


import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


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


def heatmap(ax, table: pd.DataFrame, cmap: str, annotate: bool, fmt: str = "{:.2f}", vmin=None, vmax=None,
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


