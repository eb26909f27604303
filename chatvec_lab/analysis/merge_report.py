"""What a merge did, per layer and source: how much of each source survived, the sign conflicts it resolved,
and how the merged delta points relative to each source, against chance.

    report = MergeReport(["chat", "chat-alt"])
    merge_from_config("merge.yml", "out", observer=report)     # observes every tensor as it is merged
    table = report.table()                                     # one row per (layer, source)

Everything is measured on deltas from the base: ``Δᵢ = θᵢ − θ_base`` for each source and ``Δ = θ_merged −
θ_base`` for the result, per layer (``layer`` is the block's number; tensors outside the blocks are grouped
by their module: ``embed``, ``lm_head``, ``final_norm`` …). Columns:

- ``norm_share``: the share of ‖Δᵢ‖² on entries where the merged delta is non-zero and has Δᵢ's sign, i.e.
  what of the source survived (trim, drop and sign election all remove some; a plain average keeps all
  entries whose sign it does not overturn);
- ``cosine``: cos(Δ, Δᵢ); ``chance``: 1/√n, the typical |cosine| of random directions in the layer's n
  coordinates; ``grade``: ``analysis.geometry.grade_cosine`` (orthogonal / weakly aligned / aligned …);
- ``conflicts``: entries where two sources' deltas have opposite signs (the same for every source of a layer);
  ``resolved``: those where the merge took a side (a non-zero merged delta), ``resolved_with``: those where
  the side taken was this source's.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

from chatvec_lab.analysis.geometry import chance_cosine, grade_cosine
from chatvec_lab.errors import UsageError
from chatvec_lab.io.naming import parse

COLUMNS = ["layer", "source", "n", "norm_share", "cosine", "chance", "grade", "conflicts", "resolved",
           "resolved_with", "source_norm", "merged_norm"]


def layer_label(name: str):
    """The block's number, or the module of a tensor outside the blocks."""
    info = parse(name)
    return info.layer if info.layer is not None else info.module


class MergeReport:
    """An observer for ``merge_from_config``: sums, per layer and source, what ``table()`` reports."""

    def __init__(self, sources: list[str], on_finish=None):
        self.sources = [str(s) for s in sources]
        self.on_finish = on_finish
        self.sums: dict = defaultdict(lambda: defaultdict(float))

    def observe(self, name: str, base, sources, merged) -> None:
        if base is None:
            raise UsageError("a merge report measures deltas from the base: this method has none (give "
                             "base_model and a method that uses it)")
        if len(sources) != len(self.sources):
            raise UsageError(f"the report was made for {len(self.sources)} sources, the merge has {len(sources)}")
        layer = layer_label(name)
        dm = (merged.double() - base.double()).reshape(-1)
        deltas = [(s.double() - base.double()).reshape(-1) for s in sources]
        signs = torch.stack([d.sign() for d in deltas])
        conflict = (signs.max(0).values > 0) & (signs.min(0).values < 0)
        taken = conflict & (dm != 0)
        merged_sign = dm.sign()
        n_conflicts, n_taken = int(conflict.sum()), int(taken.sum())
        for source, d in zip(self.sources, deltas):
            acc = self.sums[(layer, source)]
            survived = (merged_sign == d.sign()) & (dm != 0)
            acc["n"] += d.numel()
            acc["source_sq"] += float(d.square().sum())
            acc["survived_sq"] += float(d[survived].square().sum())
            acc["dot"] += float(dm @ d)
            acc["merged_sq"] += float(dm.square().sum())
            acc["conflicts"] += n_conflicts
            acc["resolved"] += n_taken
            acc["resolved_with"] += int((taken & (merged_sign == d.sign())).sum())

    def table(self) -> pd.DataFrame:
        """One row per (layer, source), blocks first in order, then the other tensors; see the module's doc."""
        rows = []
        for (layer, source), acc in self.sums.items():
            denom = (acc["source_sq"] * acc["merged_sq"]) ** 0.5
            cos = acc["dot"] / denom if denom > 0 else float("nan")
            rows.append({"layer": layer, "source": source, "n": int(acc["n"]),
                         "norm_share": acc["survived_sq"] / acc["source_sq"] if acc["source_sq"] > 0 else float("nan"),
                         "cosine": cos, "chance": chance_cosine(acc["n"]), "grade": grade_cosine(cos, acc["n"]),
                         "conflicts": int(acc["conflicts"]), "resolved": int(acc["resolved"]),
                         "resolved_with": int(acc["resolved_with"]), "source_norm": acc["source_sq"] ** 0.5,
                         "merged_norm": acc["merged_sq"] ** 0.5})
        df = pd.DataFrame(rows, columns=COLUMNS)
        order = {s: i for i, s in enumerate(self.sources)}
        df["_block"] = df["layer"].map(lambda x: 0 if isinstance(x, int) else 1)
        df["_layer"] = df["layer"].map(lambda x: x if isinstance(x, int) else -1)
        df["_name"] = df["layer"].map(lambda x: "" if isinstance(x, int) else str(x))
        df["_source"] = df["source"].map(order)
        return df.sort_values(["_block", "_layer", "_name", "_source"]).drop(
            columns=["_block", "_layer", "_name", "_source"]).reset_index(drop=True)

    def finish(self, folder) -> None:
        """Write the table (``merge_report.csv``) into the output's folder, then call ``on_finish(table,
        folder)`` (the CLI draws the plot there: plots sit above analysis)."""
        table = self.table()
        save_table(table, folder)
        if self.on_finish is not None:
            self.on_finish(table, Path(folder))


def summary(table: pd.DataFrame) -> str:
    """A few lines: per source, the norm share that survived and the cosine with the merged delta, over all."""
    lines = []
    for source, part in table.groupby("source", sort=False):
        share = (part["norm_share"] * part["source_norm"] ** 2).sum() / (part["source_norm"] ** 2).sum()
        dot = (part["cosine"] * part["source_norm"] * part["merged_norm"]).sum()
        cos = dot / (((part["source_norm"] ** 2).sum() * (part["merged_norm"] ** 2).sum()) ** 0.5)
        lines.append(f"{source}: {share:.1%} of its squared norm survived; cosine with the merged delta {cos:.3f}")
    conflicts = table.drop_duplicates("layer")
    total, resolved = int(conflicts["conflicts"].sum()), int(conflicts["resolved"].sum())
    if total:
        lines.append(f"sign conflicts: {total:,} entries, {resolved:,} resolved to a side ({resolved / total:.1%})")
    return "\n".join(lines)


def save_table(table: pd.DataFrame, folder) -> Path:
    """``merge_report.csv`` in ``folder``."""
    path = Path(folder) / "merge_report.csv"
    table.to_csv(path, index=False)
    return path
