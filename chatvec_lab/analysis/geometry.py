"""The geometry of chat vectors: norms, cosines, sign agreement, distributions, verdicts against chance.

Everything streams: ``vector_stats`` walks the tensors once, a block of rows of every vector at a time
(saved vectors are read a block ahead), and keeps only numbers, so memory stays at a few blocks plus the
sampled values (``sample`` per tensor), whatever the vectors' size. The per-block numbers come from
``kernels``.
Results are tidy DataFrames with ``layer`` and ``module`` columns, to group as you like.

    stats = vector_stats({"chat": cv, "chat-alt": cv_alt, "cp": cp_vec}, base=toy.path("base"))
    cosine_matrix(stats)          # N × N
    layer_norms(stats)            # layer × vector
    top_layers(stats, "chat")     # which layers change most
    cosine_by_part(stats)         # cosines in the blocks, embeddings, lm_head, norms, against 1/√d
    aligned(stats, "chat", "cp")  # a verdict against chance (1/√d), naming the part driving the cosine
    spectra(cv)                   # full-spectrum effective/stable rank, next to a random matrix's

The spectra of the weight matrices are computed in :mod:`chatvec_lab.analysis.spectra`; ``spectra``,
``spectrum``, ``random_baseline``, ``singular_values``, ``effective_rank`` and ``SPECTRA_COLUMNS`` are also
importable from here, with the rest of a vector's geometry.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from chatvec_lab.analysis.spectra import SPECTRA_COLUMNS, effective_rank, random_baseline  # noqa: F401 (see above)
from chatvec_lab.analysis.spectra import singular_values, spectra, spectrum  # noqa: F401 (see above)
from chatvec_lab.core.kernels import accumulate, squared_norm, top_values
from chatvec_lab.core.vector import named_vectors
from chatvec_lab.errors import MismatchError, UnknownName, UsageError, check_finite
from chatvec_lab.io.naming import MODULE_ORDER, parse
from chatvec_lab.io.sources import open_weights

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

    vecs = named_vectors(vectors)
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
            base_norm = math.sqrt(squared_norm(base_src.get(name)))
        tops = top_values(acc[:, 2])
        for k, top in zip(keys, tops):
            check_finite(top, f"tensor {name!r} in vector {k!r}")  # its largest |value| is NaN/Inf only if a value is
        for k, (s1, s2, _), top in zip(keys, acc, tops):
            values = np.concatenate(picked[k]) if picked[k] else np.zeros(0, dtype=np.float32)
            mean = s1 / n if n else math.nan
            var = max(s2 / n - mean * mean, 0.0) if n else math.nan
            norm = math.sqrt(s2)
            rows.append({"name": name, "layer": info.layer, "module": info.module, "group": info.group,
                         "vector": k, "numel": n, "norm": norm, "base_norm": base_norm,
                         "rel_norm": norm / base_norm if base_norm and base_norm > 0 else math.nan,
                         "mean": mean, "std": math.sqrt(var) if not math.isnan(var) else math.nan,
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
    """The cosine, clamped to [-1, 1]: rounding would put a vector's cosine with its copy at 1.0000000000000002."""
    return min(1.0, max(-1.0, dot / math.sqrt(na2 * nb2))) if na2 > 0 and nb2 > 0 else math.nan


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


PARTS = ("blocks", "embeddings", "lm_head", "norms", "other")
PART_LABELS = {"all": "the whole vector", "blocks": "the blocks", "embeddings": "the embeddings",
               "lm_head": "lm_head", "norms": "the final norm", "other": "other tensors"}


def part_of(layer, module: str, group: str) -> str:
    """Which part of the model a tensor belongs to: ``blocks`` (anything inside a numbered transformer
    block), ``embeddings`` (token and position embeddings), ``lm_head``, ``norms`` (norms outside the
    blocks, e.g. the final norm) or ``other``."""
    if layer is not None and not pd.isna(layer):
        return "blocks"
    if module in ("embed", "pos_embed"):
        return "embeddings"
    if module == "lm_head":
        return "lm_head"
    return "norms" if group == "norm" else "other"


CHANCE_SIGN_AGREEMENT = 0.5


def _num(x: float) -> str:
    """Two decimals, or three for small numbers (0.025, not 0.03)."""
    return f"{x:.3f}" if abs(x) < 0.095 else f"{x:.2f}"


def cosine_by_part(stats: VectorStats, a: str | None = None, b: str | None = None) -> pd.DataFrame:
    """Cosine and sign agreement of each vector pair over the whole vector (part ``all``) and over each part
    (``part_of``: the blocks, embeddings, lm_head, norms outside the blocks), each next to what unrelated
    directions give in that many dimensions. ``a``/``b`` pick one pair (either order).

    Columns: ``a``, ``b``, ``pair``, ``part``, ``tensors``, ``dim`` (coordinates), ``cosine``,
    ``random_cosine`` (1/√dim: the typical |cosine| of two random directions in ``dim`` dimensions, its
    standard deviation), ``times_random`` (cosine·√dim: how many of those it is), ``contribution`` (the
    part's dot product over the *whole* vectors' norms; the parts' contributions add up to the global
    cosine), ``sign_agreement``, ``sign_chance`` (0.5) and ``sign_chance_spread`` (1/√n: two standard
    deviations of the share of same signs among n coordinates that agree by chance)."""
    p, t = stats.pairs, stats.tensors
    columns = ["a", "b", "pair", "part", "tensors", "dim", "cosine", "random_cosine", "times_random",
               "contribution", "sign_agreement", "sign_chance", "sign_chance_spread"]
    if a is not None or b is not None:
        p = p[((p["a"] == a) & (p["b"] == b)) | ((p["a"] == b) & (p["b"] == a))] if b is not None else \
            p[(p["a"] == a) | (p["b"] == a)]
        if not len(p):
            raise UnknownName(f"no pair of vectors {a!r} and {b!r} in these stats (vectors: {stats.names})")
    numel = dict(zip(t["name"], t["numel"]))
    df = p.assign(part=[part_of(layer, module, group) for layer, module, group in zip(p["layer"], p["module"], p["group"])],
                  dim=p["name"].map(numel), na2=p["norm_a"] ** 2, nb2=p["norm_b"] ** 2, tensors=1)
    sums = ["dot", "na2", "nb2", "dim", "sign_agree", "sign_total", "tensors"]
    whole = df.groupby(["a", "b"], sort=False)[sums].sum().reset_index().assign(part="all")
    parts = df.groupby(["a", "b", "part"], sort=False)[sums].sum().reset_index()
    g = pd.concat([whole, parts], ignore_index=True)
    totals = whole.set_index(["a", "b"])
    norm_whole = [math.sqrt(totals.loc[(x, y), "na2"] * totals.loc[(x, y), "nb2"]) for x, y in zip(g["a"], g["b"])]
    g["cosine"] = [_cos(d, x, y) for d, x, y in zip(g["dot"], g["na2"], g["nb2"])]
    g["random_cosine"] = 1 / np.sqrt(g["dim"].astype(float))
    g["times_random"] = g["cosine"] * np.sqrt(g["dim"].astype(float))
    g["contribution"] = [d / n if n > 0 else math.nan for d, n in zip(g["dot"], norm_whole)]
    total = g["sign_total"].astype(float)
    g["sign_agreement"] = g["sign_agree"] / total.where(total > 0)
    g["sign_chance"] = CHANCE_SIGN_AGREEMENT
    g["sign_chance_spread"] = 1 / np.sqrt(total.where(total > 0))
    g["pair"] = g["a"] + " · " + g["b"]
    order = {name: i for i, name in enumerate(("all",) + PARTS)}
    g = g.assign(_o=g["part"].map(order)).sort_values(["a", "b", "_o"], kind="stable")
    return g[columns].astype({"tensors": int, "dim": int}).reset_index(drop=True)


# Verdicts about a cosine are set against chance: two random directions in d dimensions have a cosine of mean
# 0 and standard deviation 1/√d (the "chance level"), so |cosine|·√d says how many chance levels it is from 0.
ORTHOGONAL_WITHIN_CHANCE = 3.0  # |cos| ≤ 3/√d: as orthogonal as random directions (3 standard deviations)
ALIGNED_COSINE = 0.3  # above chance and |cos| ≥ this: "aligned" / "opposed"; above chance and below it: "weakly …"
COSINE_GRADES = ("orthogonal", "weakly aligned", "aligned", "weakly opposed", "opposed", "undefined")


def chance_cosine(dim: float) -> float:
    """The chance level of a cosine in ``dim`` dimensions: 1/√dim, the standard deviation of the cosine of two
    random directions (its typical |value|)."""
    return 1 / math.sqrt(dim) if dim and dim > 0 else math.nan


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UsageError(f"threshold {threshold!r} is not a number") from None
    if not 0 < t <= 1:
        raise UsageError(f"threshold {threshold!r} must be a |cosine| in (0, 1]")
    return t


def grade_cosine(cosine: float, dim: float, threshold: float = ALIGNED_COSINE) -> str:
    """One of ``COSINE_GRADES`` for a cosine measured over ``dim`` coordinates:

    * ``"orthogonal"`` — |cos| ≤ ``ORTHOGONAL_WITHIN_CHANCE``/√dim: no more than random directions give;
    * ``"weakly aligned"`` / ``"weakly opposed"`` — beyond chance, but |cos| < ``threshold``;
    * ``"aligned"`` / ``"opposed"`` — beyond chance and |cos| ≥ ``threshold`` (``ALIGNED_COSINE``, 0.3);
    * ``"undefined"`` — the cosine is NaN (a zero vector) or ``dim`` is not positive.

    So the chance test decides whether there is any alignment, and ``threshold`` only grades its size: a
    cosine within chance is never "aligned", whatever ``threshold``, and one beyond chance is never
    "orthogonal", however small."""
    threshold = _check_threshold(threshold)
    if not (math.isfinite(cosine) and dim and dim > 0):
        return "undefined"
    if abs(cosine) * math.sqrt(dim) <= ORTHOGONAL_WITHIN_CHANCE:
        return "orthogonal"
    strength = "" if abs(cosine) >= threshold else "weakly "
    return strength + ("aligned" if cosine > 0 else "opposed")


def _times(multiple: float) -> str:
    return f"{multiple:.1f}×" if multiple < 9.95 else f"{multiple:,.0f}×"


def describe_cosine(cosine: float, dim: float, threshold: float = ALIGNED_COSINE, what: str = "cosine") -> str:
    """A cosine's grade (``grade_cosine``) with the numbers behind it: the cosine, how many chance levels it is
    from 0 and the chance level 1/√d with d, e.g. "weakly aligned: cosine 0.28 = 430× chance (chance 1/√d =
    6.5e-04, d = 2,361,024)". ``what`` names the cosine ("global cosine", "cosine inside the blocks" …)."""
    grade = grade_cosine(cosine, dim, threshold)
    if grade == "undefined":
        return f"undefined: {what} is not defined (a vector is zero over these coordinates)" if dim and dim > 0 \
            else f"undefined: {what} over no coordinates"
    return f"{grade}: {what} {_num(cosine)} = {_against_chance(cosine, dim)}"


def _against_chance(cosine: float, dim: float) -> str:
    chance = chance_cosine(dim)
    return f"{_times(abs(cosine) / chance)} chance (chance 1/√d = {chance:.1e}, d = {int(dim):,})"


def aligned(stats: VectorStats, a: str, b: str, threshold: float = ALIGNED_COSINE) -> dict:
    """Are two vectors aligned? Global cosine and sign agreement, where they come from, and a verdict against
    chance.

    The verdict grades the global cosine over its d coordinates (``grade_cosine``): "orthogonal" only within
    ``ORTHOGONAL_WITHIN_CHANCE`` (3) chance levels 1/√d of 0, what two random directions give; beyond that
    "weakly aligned"/"weakly opposed" while |cosine| < ``threshold`` and "aligned"/"opposed" from it on.
    ``threshold`` (default ``ALIGNED_COSINE`` = 0.3, a |cosine| in (0, 1]) thus grades the size of an alignment
    that chance cannot explain; it no longer decides orthogonality. The verdict states the chance level and
    the multiple, names the part (``cosine_by_part``) that gives more than half of the global cosine when that
    is not the transformer blocks, and grades the blocks' own cosine against their own chance level, e.g.
    "weakly aligned: global cosine 0.28 = 430× chance (chance 1/√d = 6.5e-04, d = 2,361,024), driven by lm_head
    (cosine 0.87 = 548× chance in its d = 393,216, 0.18 of the 0.28); inside the blocks 0.12: weakly aligned, 152×
    chance (chance 1/√d = 8.0e-04, d = 1,574,400)" (the toy's chat and chat-alt vectors).
    Returns ``cosine``, ``sign_agreement``, ``verdict``, ``driver`` (that part), ``blocks_cosine`` and
    ``parts`` (the pair's ``cosine_by_part`` rows)."""
    threshold = _check_threshold(threshold)
    parts = cosine_by_part(stats, a, b)
    whole = parts[parts["part"] == "all"].iloc[0]
    cos, agree = float(whole["cosine"]), float(whole["sign_agreement"])
    verdict = describe_cosine(cos, int(whole["dim"]), threshold, "global cosine")
    each = parts[(parts["part"] != "all") & parts["contribution"].notna()]
    driver = None
    if len(each) and math.isfinite(cos) and cos != 0:
        top = each.loc[each["contribution"].abs().idxmax()]
        if top["contribution"] / cos > 0.5:  # a part that gives more than half of the global figure
            driver = str(top["part"])
            if driver != "blocks":
                verdict += (f", driven by {PART_LABELS[driver]} (cosine {_num(top['cosine'])} = "
                            f"{_times(abs(top['times_random']))} chance in its d = {int(top['dim']):,}, "
                            f"{_num(top['contribution'])} of the {_num(cos)})")
    blocks = parts[parts["part"] == "blocks"]
    blocks_cos = float(blocks["cosine"].iloc[0]) if len(blocks) else math.nan
    if math.isfinite(blocks_cos) and len(each) > 1:
        d = int(blocks["dim"].iloc[0])
        verdict += (f"; inside the blocks {_num(blocks_cos)}: {grade_cosine(blocks_cos, d, threshold)}, "
                    f"{_against_chance(blocks_cos, d)}")
    elif math.isfinite(blocks_cos):
        verdict += f"; all in the blocks {_num(blocks_cos)}"  # the same coordinates as the global figure
    return {"cosine": cos, "sign_agreement": agree, "verdict": verdict, "driver": driver,
            "blocks_cosine": blocks_cos, "parts": parts}


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
