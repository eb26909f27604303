"""Pictures of vectors: norms by layer, cosines, sign agreement, spectra, interference."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from chatvec_lab.io.naming import MODULE_ORDER
from chatvec_lab.plots.style import CMAP, DIVERGING, heatmap, new_axes, style_axes


def plot_layer_norms(stats, vector: str | None = None, ax=None, relative: bool = False):
    """‖Δ‖ (or ‖Δ‖/‖θ_base‖) per layer, one line per module kind."""
    from chatvec_lab.analysis.geometry import norms_by

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
    from chatvec_lab.analysis.geometry import norms_by

    vector = vector or stats.names[0]
    df = norms_by(stats, ("layer", "module"))
    df = df[(df["vector"] == vector) & df["layer"].notna()]
    table = df.pivot(index="layer", columns="module", values="rel_norm")
    table = table[[m for m in MODULE_ORDER if m in table.columns]]
    fig, ax = new_axes(ax)
    heatmap(ax, table, CMAP, annotate=table.size <= 120, fmt="{:.3f}", label="‖Δ‖ / ‖θ_base‖")
    ax.set_title(f"Relative change per layer and module: {vector}", fontsize=11)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    return fig


def plot_cosine_matrix(cos: pd.DataFrame, ax=None, title: str = "Cosine similarity between vectors"):
    """Annotated sources × sources heatmap of cosine similarity."""
    fig, ax = new_axes(ax, figsize=(1.2 * len(cos) + 3, 1.0 * len(cos) + 2))
    heatmap(ax, cos, DIVERGING, annotate=True, vmin=-1, vmax=1, label="cosine")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("vector")
    ax.set_ylabel("vector")
    return fig


def plot_layer_cosine(stats, pairs: list[tuple[str, str]] | None = None, ax=None, by: str = "layer"):
    """Cosine between two vectors, layer by layer (one line per pair)."""
    from chatvec_lab.analysis.geometry import cosine_by

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
    from chatvec_lab.analysis.geometry import sign_agreement

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
    from chatvec_lab.analysis.geometry import cosine_matrix

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


def plot_interference(table: pd.DataFrame, value: str = "trimmed_conflict", ax=None):
    """A heatmap of one ``interference`` column: layers (rows, the outer parts below) × module kinds."""
    cells = table[table["layer"] != "all"]
    grid = cells.pivot_table(index="layer", columns="module", values=value, aggfunc="first")
    order = [m for m in MODULE_ORDER if m in grid.columns]
    layers = sorted([r for r in grid.index if r != "outer"], key=int) + (["outer"] if "outer" in grid.index else [])
    grid = grid.reindex(index=layers, columns=order)
    fig, ax = new_axes(ax, figsize=(0.9 * grid.shape[1] + 3, 0.45 * grid.shape[0] + 1.8))
    heatmap(ax, grid, CMAP, annotate=True, vmin=0, vmax=1 if value != "cosine" else None, label=value)
    ax.set_title(f"Interference between the two sources: {value.replace('_', ' ')}", fontsize=11)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    return fig
