"""A picture of what a merge did (``analysis/merge_report.py``'s table): per layer, the norm share of each
source that survived (bars) and the cosine of the merged delta with each source (points, chance shaded)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from chatvec_lab.plots.style import new_axes, style_axes


def plot_merge_report(table: pd.DataFrame, ax=None):
    """Bars: ``norm_share`` per layer and source; points on the right axis: ``cosine`` with ±3× chance shaded."""
    fig, ax = new_axes(ax, figsize=(8.0, 4.0))
    layers = list(dict.fromkeys(table["layer"]))
    sources = list(dict.fromkeys(table["source"]))
    width = 0.8 / max(1, len(sources))
    xs = np.arange(len(layers))
    right = ax.twinx()
    chance = table.drop_duplicates("layer").set_index("layer")["chance"].reindex(layers).to_numpy(dtype=float)
    right.fill_between(xs, -3 * chance, 3 * chance, color="0.5", alpha=0.25, step="mid", zorder=0,
                       label="±3× chance (random directions)")
    for i, source in enumerate(sources):
        rows = table[table["source"] == source].set_index("layer").reindex(layers)
        offset = (i - (len(sources) - 1) / 2) * width
        bars = ax.bar(xs + offset, rows["norm_share"], width=width, alpha=0.6, label=f"{source}: norm share kept")
        right.plot(xs + offset, rows["cosine"], "o", color=bars.patches[0].get_facecolor()[:3] if bars.patches else None,
                   markersize=4, label=f"{source}: cosine with the merge")
    ax.set_xticks(xs, [str(x) for x in layers], rotation=90 if len(layers) > 12 else 0, fontsize=7)
    ax.set_ylim(0, 1.05)
    right.set_ylim(-1.05, 1.05)
    right.set_ylabel("cos(Δ_merged, Δ_source)")
    style_axes(ax, "What the merge kept of each source, per layer", "layer", "share of ‖Δ_source‖² kept")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper center", ncols=2,
              bbox_to_anchor=(0.5, -0.16))
    return fig
