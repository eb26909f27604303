"""The geometry of chat vectors: norms, cosines, sign agreement, spectra, distributions.

Everything streams: ``vector_stats`` walks the tensors once, a block of rows of every vector at a time
(saved vectors are read a block ahead), and keeps only numbers, so memory stays at a few blocks plus the
sampled values (``sample`` per tensor), whatever the vectors' size. The per-block numbers come from
``kernels``.
Results are tidy DataFrames with ``layer`` and ``module`` columns, to group as you like.

    stats = vector_stats({"chat": cv, "chat-alt": cv_alt, "cp": cp_vec}, base=toy.path("base"))
    cosine_matrix(stats)          # N × N
    layer_norms(stats)            # layer × vector
    top_layers(stats, "chat")     # which layers change most
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from chatvec_lab.errors import MismatchError, NonFiniteError
from chatvec_lab.kernels import accumulate, top_values
from chatvec_lab.naming import MODULE_ORDER, parse
from chatvec_lab.sources import open_weights
from chatvec_lab.vector import ChatVector

SAMPLE_PER_TENSOR = 2048
STATS_CHUNK = 1 << 20  # values per vector per block: a few MB, so blocks stay in cache between passes


def _excess_kurtosis(values: np.ndarray) -> float:
    if len(values) < 4:
        return math.nan
    x = values.astype(np.float64)
    d = x - x.mean()
    var = (d * d).mean()
    return float((d**4).mean() / var**2 - 3) if var > 0 else math.nan


@dataclass
class VectorStats:
    """Per-tensor numbers for several vectors, from one streaming pass."""

    tensors: pd.DataFrame  # one row per (tensor, vector)
    pairs: pd.DataFrame  # one row per (tensor, vector pair)
    samples: dict[str, dict[str, np.ndarray]]  # vector → module → sampled values
    names: list[str]


def _open_all(vectors) -> dict[str, ChatVector]:
    if isinstance(vectors, ChatVector):
        return {"vector": vectors}
    if isinstance(vectors, (list, tuple)):
        vectors = {Path(str(v)).name if not isinstance(v, ChatVector) else f"v{i + 1}": v for i, v in enumerate(vectors)}
    return {k: ChatVector.open(v) for k, v in vectors.items()}


@torch.no_grad()
def vector_stats(vectors, base=None, include: str | None = None, sample: int = SAMPLE_PER_TENSOR,
                 seed: int = 0, progress: bool = False) -> VectorStats:
    """Norms (and ‖Δ‖/‖θ_base‖ with ``base``), pairwise dot products and sign agreement, moments, samples.

    One pass over the tensors, in blocks of values. Norms, means and dot products are accumulated in
    float64 across blocks (float32 within runs of a few thousand values) and sign counts are exact;
    quantiles and excess kurtosis come from ``sample`` coordinates per tensor (all of them for tensors
    that small)."""
    import re
    from tqdm.auto import tqdm

    vecs = _open_all(vectors)
    keys = list(vecs)
    first = vecs[keys[0]]
    for k in keys[1:]:
        missing = set(first.names) ^ set(vecs[k].names)
        if missing:
            raise MismatchError(f"vectors {keys[0]!r} and {k!r} differ in tensors, e.g. {sorted(missing)[0]!r}")
    base_src = open_weights(base) if base is not None else None
    pattern = re.compile(include) if include else None
    names = [n for n in first.names if not (pattern and not pattern.search(n))]
    for k in keys[1:]:
        for name in names:
            if vecs[k].shapes[name] != first.shapes[name]:
                raise MismatchError(f"{name!r}: vector {k!r} has shape {vecs[k].shapes[name]}, "
                                    f"{keys[0]!r} has {first.shapes[name]}")
    gen = torch.Generator().manual_seed(seed)
    pairs_of = list(itertools.combinations(keys, 2))
    rows, pair_rows = [], []
    samples: dict[str, dict[str, list]] = {k: {} for k in keys}

    def finish(name: str, acc: np.ndarray, pacc: np.ndarray, picked: dict[str, list]) -> None:
        info, n = parse(name), math.prod(first.shapes[name])
        base_norm = math.nan
        if base_src is not None and name in base_src:
            from chatvec_lab.apply import squared_norm
            base_norm = math.sqrt(squared_norm(base_src.get(name)))
        tops = top_values(acc[:, 2])
        for k, top in zip(keys, tops):
            if not math.isfinite(top):
                raise NonFiniteError(f"tensor {name!r} in vector {k!r} holds NaN/Inf values")
        for k, (s1, s2, _), top in zip(keys, acc, tops):
            values = np.concatenate(picked[k]) if picked[k] else np.zeros(0, dtype=np.float32)
            mean = s1 / n if n else math.nan
            var = max(s2 / n - mean * mean, 0.0) if n else math.nan
            norm = math.sqrt(s2)
            rows.append({"name": name, "layer": info.layer, "module": info.module, "group": info.group,
                         "vector": k, "numel": n, "norm": norm, "base_norm": base_norm,
                         "rel_norm": norm / base_norm if base_norm and base_norm > 0 else math.nan,
                         "mean": mean, "std": math.sqrt(var) if var == var else math.nan,
                         "kurtosis": _excess_kurtosis(values), "max_abs": top if n else math.nan})
            if len(values):
                samples[k].setdefault(info.module, []).append(values)
        norms = {k: math.sqrt(a[1]) for k, a in zip(keys, acc)}
        for (a, b), (dot, agree, total) in zip(pairs_of, pacc):
            pair_rows.append({"name": name, "layer": info.layer, "module": info.module, "group": info.group,
                              "a": a, "b": b, "dot": dot, "norm_a": norms[a], "norm_b": norms[b],
                              "sign_agree": int(agree), "sign_total": int(total)})

    with contextlib.ExitStack() as stack:
        for v in vecs.values():
            stack.enter_context(v.prefetching(names))
        bar = stack.enter_context(tqdm(total=len(names), desc="stats", unit="tensor", disable=not progress))
        streams = [vecs[k].stream(names, chunk=STATS_CHUNK, copy=False, check=False) for k in keys]
        for name, tensor_blocks in itertools.groupby(zip(*streams), key=lambda parts: parts[0][0]):
            n = math.prod(first.shapes[name])
            acc = np.zeros((len(keys), 3))  # per vector: Σx, Σx², max |x| (as float32 bits)
            pacc = np.zeros((len(pairs_of), 3))  # per pair: dot, same-sign count, both-nonzero count
            picked: dict[str, list] = {k: [] for k in keys}
            # a sample of coordinates for the distribution summaries: all of them for small tensors
            idx = np.arange(n) if n <= sample else np.sort(torch.randint(0, n, (sample,), generator=gen).numpy())
            offset = 0
            for parts in tensor_blocks:
                flat = [block.reshape(-1).numpy() for _, _, block in parts]
                size = flat[0].size
                accumulate(flat, acc, pacc)
                lo, hi = np.searchsorted(idx, (offset, offset + size))
                if hi > lo:
                    local = idx[lo:hi] - offset
                    for k, x in zip(keys, flat):
                        picked[k].append(x[local])  # fancy indexing copies: the block's buffer is reused
                offset += size
            finish(name, acc, pacc, picked)
            bar.update()
    tensors = pd.DataFrame(rows)
    pairs = pd.DataFrame(pair_rows, columns=["name", "layer", "module", "group", "a", "b", "dot", "norm_a", "norm_b",
                                             "sign_agree", "sign_total"])
    for df in (tensors, pairs):
        if len(df):
            df["layer"] = df["layer"].astype("Int64")
    return VectorStats(tensors, pairs, {k: {m: np.concatenate(v) for m, v in d.items()} for k, d in samples.items()}, keys)


def _cos(dot: float, na2: float, nb2: float) -> float:
    return dot / math.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else math.nan


def cosine_matrix(stats: VectorStats) -> pd.DataFrame:
    """Global cosine similarity between every two vectors (N × N, named index and columns)."""
    norms2 = stats.tensors.assign(n2=stats.tensors["norm"] ** 2).groupby("vector")["n2"].sum()
    m = pd.DataFrame(np.eye(len(stats.names)), index=stats.names, columns=stats.names)
    for (a, b), g in stats.pairs.groupby(["a", "b"]):
        c = _cos(g["dot"].sum(), norms2[a], norms2[b])
        m.loc[a, b] = m.loc[b, a] = c
    m.index.name = None
    return m


def cosine_by(stats: VectorStats, by: str | Sequence[str] = "layer") -> pd.DataFrame:
    """Cosine between each pair of vectors within each group (e.g. per layer, per module, per tensor)."""
    df = stats.pairs.assign(na2=stats.pairs["norm_a"] ** 2, nb2=stats.pairs["norm_b"] ** 2)
    keys = [by] if isinstance(by, str) else list(by)
    g = df.groupby(keys + ["a", "b"], dropna=False)[["dot", "na2", "nb2"]].sum().reset_index()
    g["cosine"] = [_cos(d, x, y) for d, x, y in zip(g["dot"], g["na2"], g["nb2"])]
    g["pair"] = g["a"] + " · " + g["b"]
    return g[keys + ["a", "b", "pair", "cosine"]]


def sign_agreement(stats: VectorStats, by: str | Sequence[str] | None = "layer") -> pd.DataFrame:
    """Share of coordinates where two vectors have the same sign (TIES-merging's conflict measure; 0.5 = chance)."""
    keys = ([by] if isinstance(by, str) else list(by)) if by else []
    g = stats.pairs.groupby(keys + ["a", "b"], dropna=False)[["sign_agree", "sign_total"]].sum().reset_index()
    g["sign_agreement"] = g["sign_agree"] / g["sign_total"].where(g["sign_total"] > 0)
    g["pair"] = g["a"] + " · " + g["b"]
    return g[keys + ["a", "b", "pair", "sign_agreement"]]


def norms_by(stats: VectorStats, by: str | Sequence[str] = ("layer", "module")) -> pd.DataFrame:
    """‖Δ‖ and ‖Δ‖/‖θ_base‖ aggregated (root of summed squares) per group and vector."""
    keys = [by] if isinstance(by, str) else list(by)
    df = stats.tensors.assign(n2=stats.tensors["norm"] ** 2, b2=stats.tensors["base_norm"] ** 2)
    g = df.groupby(keys + ["vector"], dropna=False)[["n2", "b2", "numel"]].sum(min_count=1).reset_index()
    g["norm"] = np.sqrt(g["n2"])
    g["rel_norm"] = g["norm"] / np.sqrt(g["b2"])
    return g[keys + ["vector", "numel", "norm", "rel_norm"]]


def layer_norms(stats: VectorStats) -> pd.DataFrame:
    """‖Δ‖ per layer (rows; embeddings and other non-layer tensors under ``-``) and vector (columns)."""
    df = norms_by(stats, "layer")
    df["layer"] = df["layer"].astype(object).where(df["layer"].notna(), "-")
    table = df.pivot(index="layer", columns="vector", values="norm")[stats.names]
    table.columns.name = None
    return table


def top_layers(stats: VectorStats, vector: str | None = None, n: int = 5, relative: bool = False) -> pd.DataFrame:
    """Which layers change most: the ``n`` largest per-layer norms (or relative norms) of one vector."""
    vector = vector or stats.names[0]
    df = norms_by(stats, "layer")
    df = df[(df["vector"] == vector) & df["layer"].notna()]
    col = "rel_norm" if relative else "norm"
    return df.sort_values(col, ascending=False).head(n)[["layer", "norm", "rel_norm"]].reset_index(drop=True)


def aligned(stats: VectorStats, a: str, b: str, threshold: float = 0.3) -> dict:
    """Are two vectors aligned? Global cosine, sign agreement, and a one-line verdict."""
    cos = cosine_matrix(stats).loc[a, b]
    sa = sign_agreement(stats, by=None)
    row = sa[((sa["a"] == a) & (sa["b"] == b)) | ((sa["a"] == b) & (sa["b"] == a))]
    agree = float(row["sign_agreement"].iloc[0]) if len(row) else math.nan
    if cos >= threshold:
        verdict = f"aligned: cosine {cos:.2f} ≥ {threshold}"
    elif cos <= -threshold:
        verdict = f"opposed: cosine {cos:.2f} ≤ −{threshold}"
    else:
        verdict = f"nearly orthogonal: |cosine| {abs(cos):.2f} < {threshold} (random directions give ≈ 0)"
    return {"cosine": float(cos), "sign_agreement": agree, "verdict": verdict}


TIDY_VECTOR_COLUMNS = ["norm", "rel_norm", "mean", "std", "max_abs"]
TIDY_PAIR_COLUMNS = ["vector_a", "vector_b", "pair", "cosine", "sign_agreement"]


def tidy_table(stats: VectorStats) -> pd.DataFrame:
    """Every per-tensor number in one long table, as ``chatvec compare --csv`` writes it.

    Two kinds of rows, in the tensors' order, named by ``kind``:

    * ``"vector"``, one per (tensor, vector): ``vector``, ``norm`` (‖Δ‖), ``rel_norm`` (‖Δ‖/‖θ_base‖, only
      when the stats were computed with a ``base``), ``mean``, ``std``, ``max_abs``;
    * ``"pair"``, one per (tensor, vector pair): ``vector_a``, ``vector_b``, ``pair`` (``"a · b"``), ``cosine``
      and ``sign_agreement`` (share of coordinates, nonzero in both, that have the same sign).

    Both kinds carry ``tensor``, ``layer`` (empty outside the layers), ``module``, ``group`` and ``numel``;
    columns of the other kind are empty. E.g. ``df[df.kind == "pair"]`` plotted with ``x="layer",
    y="cosine", hue="module"``, or ``df[df.kind == "vector"]`` with ``y="norm", hue="vector"``."""
    t, p = stats.tensors, stats.pairs
    keys = ["tensor", "layer", "module", "group", "numel"]
    with_base = "base_norm" in t and bool(t["base_norm"].notna().any())
    vector_cols = [c for c in TIDY_VECTOR_COLUMNS if with_base or c != "rel_norm"]
    columns = ["kind", *keys, "vector", *vector_cols, *TIDY_PAIR_COLUMNS]
    if not len(t):
        return pd.DataFrame(columns=columns)
    vec = t.rename(columns={"name": "tensor"}).assign(kind="vector")[["kind", *keys, "vector", *vector_cols]]
    numel = dict(zip(t["name"], t["numel"]))
    pairs = pd.DataFrame({
        "kind": "pair", "tensor": p["name"], "layer": p["layer"], "module": p["module"], "group": p["group"],
        "numel": p["name"].map(numel), "vector_a": p["a"], "vector_b": p["b"], "pair": p["a"] + " · " + p["b"],
        "cosine": [_cos(d, na * na, nb * nb) for d, na, nb in zip(p["dot"], p["norm_a"], p["norm_b"])],
        "sign_agreement": p["sign_agree"] / p["sign_total"].where(p["sign_total"] > 0)})
    order = {name: i for i, name in enumerate(dict.fromkeys(t["name"]))}
    frames = [vec] + ([pairs] if len(pairs) else [])
    df = pd.concat(frames, ignore_index=True)
    df = df.assign(_t=df["tensor"].map(order), _k=(df["kind"] == "pair").astype(int))
    df = df.sort_values(["_t", "_k"], kind="stable").reset_index(drop=True).reindex(columns=columns)
    return df.astype({"layer": "Int64", "cosine": float, "sign_agreement": float})


def distribution(stats: VectorStats, quantiles: Sequence[float] = (0.01, 0.25, 0.5, 0.75, 0.99)) -> pd.DataFrame:
    """Per vector and module kind: quantiles of sampled coordinates, std and mean excess kurtosis."""
    rows = []
    for vec, modules in stats.samples.items():
        for module, values in modules.items():
            t = stats.tensors[(stats.tensors["vector"] == vec) & (stats.tensors["module"] == module)]
            row = {"vector": vec, "module": module, "tensors": len(t), "std": float(np.std(values)),
                   "kurtosis": float(np.average(t["kurtosis"].fillna(0), weights=t["numel"]))}
            row.update({f"q{q:g}": float(np.quantile(values, q)) for q in quantiles})
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["order"] = df["module"].map({m: i for i, m in enumerate(MODULE_ORDER)})
        df = df.sort_values(["vector", "order"]).drop(columns="order").reset_index(drop=True)
    return df


# ------------------------------------------------------------------ spectra

@torch.no_grad()
def singular_values(matrix: torch.Tensor, k: int = 32, method: str = "auto", seed: int = 0) -> torch.Tensor:
    """Top ``k`` singular values; randomized (``torch.svd_lowrank``) for large matrices."""
    m = matrix.to(torch.float32)
    if m.dim() != 2:
        raise ValueError(f"singular values need a matrix, got shape {tuple(m.shape)}")
    k = min(k, *m.shape)
    if method == "exact" or (method == "auto" and min(m.shape) <= 512):
        return torch.linalg.svdvals(m)[:k]
    torch.manual_seed(seed)
    _, s, _ = torch.svd_lowrank(m, q=min(k + 10, *m.shape), niter=4)
    return s[:k]


def effective_rank(s, kind: str = "entropy") -> float:
    """``entropy``: exp of the entropy of the normalised singular values (Roy & Vetterli);
    ``stable``: ‖A‖_F² / ‖A‖_2². Both ≈ r for r equal singular values."""
    s = torch.as_tensor(s, dtype=torch.float64)
    s = s[s > s.max() * 1e-12] if len(s) else s
    if not len(s):
        return 0.0
    if kind == "stable":
        return float((s**2).sum() / s.max() ** 2)
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def spectra(vector, k: int = 32, include: str | None = None, method: str = "auto") -> pd.DataFrame:
    """Per weight matrix: its top singular values (a list), effective and stable rank, energy in the top 1/top 8."""
    import re

    vec = ChatVector.open(vector)
    pattern = re.compile(include) if include else None
    rows = []
    for name in vec.names:
        if len(vec.shapes[name]) != 2 or (pattern and not pattern.search(name)):
            continue
        info = parse(name)
        t = vec[name]
        s = singular_values(t, k=k, method=method)
        fro2 = float(t.double().pow(2).sum())
        energy = (s.double() ** 2).cumsum(0) / fro2 if fro2 > 0 else torch.zeros_like(s, dtype=torch.float64)
        rows.append({"name": name, "layer": info.layer, "module": info.module, "shape": tuple(t.shape),
                     "singular_values": s.tolist(), "effective_rank": effective_rank(s),
                     "stable_rank": effective_rank(s, "stable"),
                     "energy_top1": float(energy[0]) if len(energy) else math.nan,
                     "energy_top8": float(energy[min(7, len(energy) - 1)]) if len(energy) else math.nan})
    df = pd.DataFrame(rows)
    if len(df):
        df["layer"] = df["layer"].astype("Int64")
    return df


def save_compare_plots(stats: VectorStats, folder) -> list[Path]:
    """The figures of ``chatvec compare``, as PNG files in ``folder``."""
    import matplotlib.pyplot as plt
    from chatvec_lab import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"cosine_matrix": plots.plot_cosine_matrix(cosine_matrix(stats))}
    for name in stats.names:
        figures[f"layer_norms_{name}"] = plots.plot_layer_norms(stats, vector=name)
    if len(stats.names) > 1:
        figures["layer_cosine"] = plots.plot_layer_cosine(stats)
        figures["sign_agreement"] = plots.plot_sign_agreement(stats)
    paths = []
    for key, fig in figures.items():
        path = folder / f"{key}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
