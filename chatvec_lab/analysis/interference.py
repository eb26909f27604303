"""How two chat vectors from different sources get in each other's way, per layer × module.

    table = interference(cv_chat, cv_alt, density=0.2)

For each tensor the two deltas ``a`` and ``b`` are compared entry by entry, before and after TIES' trim
(keep each one's ``density`` share of largest |entries|):

- ``cosine``: of the whole deltas;
- ``sign_conflict``: among entries where both are non-zero, the share with opposite signs (two unrelated
  random vectors give 0.5; one vector and a scaled copy 0);
- ``trimmed_overlap``: the share of entries kept by both trims; ``trimmed_conflict``: among those, the
  share with opposite signs — the conflicts TIES' sign election has to settle;
- ``kept_a`` / ``kept_b``: the share of each source's L1 mass (after the trim) whose sign agrees with the
  elected sign, i.e. what the TIES merge keeps of each source.

Rows are summed per (layer, module) over tensors, weighted by entries; one tensor in memory at a time.
"""
from __future__ import annotations

import pandas as pd
import torch

from chatvec_lab.io.naming import parse
from chatvec_lab.core.transforms import check_settings, magnitude
from chatvec_lab.core.vector import ChatVector, check_compatible

COLUMNS = ("cosine", "sign_conflict", "trimmed_overlap", "trimmed_conflict", "kept_a", "kept_b")


def tensor_interference(a: torch.Tensor, b: torch.Tensor, density: float) -> dict[str, float]:
    """The sums behind :func:`interference` for one pair of tensors (float64 totals)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    both = (a != 0) & (b != 0)
    ta, tb = magnitude(a.float(), density).double(), magnitude(b.float(), density).double()
    kept_both = (ta != 0) & (tb != 0)
    elected = torch.where(ta + tb >= 0, 1.0, -1.0).double()
    return {
        "entries": a.numel(), "dot": float(a @ b), "a2": float(a @ a), "b2": float(b @ b),
        "both": int(both.sum()), "opposite": int((both & (a.sign() != b.sign())).sum()),
        "kept_both": int(kept_both.sum()), "kept_opposite": int((kept_both & (ta.sign() != tb.sign())).sum()),
        "l1_a": float(ta.abs().sum()), "l1_b": float(tb.abs().sum()),
        "agree_a": float(ta.abs()[ta.sign() == elected].sum()), "agree_b": float(tb.abs()[tb.sign() == elected].sum()),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def interference(a: ChatVector, b: ChatVector, density: float = 0.2, by=("layer", "module")) -> pd.DataFrame:
    """One row per ``by`` group (and ``all``) with the columns of the module docstring; see there."""
    check_settings(density)
    a, b = ChatVector.open(a), ChatVector.open(b)
    check_compatible(a, b)
    rows = []
    for name in a.names:
        if name not in b.shapes:
            continue
        info = parse(name)
        sums = tensor_interference(a[name], b[name], density)
        rows.append({"tensor": name, "layer": "outer" if info.layer is None else info.layer,
                     "module": info.module, **sums})
    per_tensor = pd.DataFrame(rows)
    groups = [(key if isinstance(key, tuple) else (key,), g) for key, g in per_tensor.groupby(list(by), sort=False)]
    groups.append((("all",) * len(by), per_tensor))
    out = []
    for key, g in groups:
        s = g.sum(numeric_only=True)
        out.append({**dict(zip(by, key)), "entries": int(s["entries"]),
                    "cosine": _ratio(s["dot"], (s["a2"] * s["b2"]) ** 0.5),
                    "sign_conflict": _ratio(s["opposite"], s["both"]),
                    "trimmed_overlap": _ratio(s["kept_both"], s["entries"]),
                    "trimmed_conflict": _ratio(s["kept_opposite"], s["kept_both"]),
                    "kept_a": _ratio(s["agree_a"], s["l1_a"]), "kept_b": _ratio(s["agree_b"], s["l1_b"])})
    return pd.DataFrame(out)
