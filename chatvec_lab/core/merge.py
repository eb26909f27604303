"""Merging several chat vectors into one, lazily, tensor by tensor: linear, TIES, DARE, model breadcrumbs.

    merged = merge([(cv_chat, 1.0), (cv_alt, 1.0)], method="ties", density=0.2)
    apply_vectors(cp, [(merged, 1.0)], out="cp-merged")

Each method is the mergekit method of the same name, on deltas from one base (tested against mergekit on the
toy family): sparsify each source (``dare_*``: random, seeded per tensor; ``breadcrumbs*``: drop the largest
``gamma`` and the smallest; ``ties``: keep the largest), weight it, and mix — by TIES' elected sign and
disjoint mean (``ties``, ``dare_ties``, ``breadcrumbs_ties``) or a weighted sum (``linear``, ``dare_linear``,
``breadcrumbs``), divided by the weights that took part when ``normalize``. The result is a ``ChatVector``
whose tensors are computed when asked for, so merging two 7B vectors holds a few tensors in memory.

Whole models from a mergekit YAML config — every method of ``core/merge_methods.REGISTRY`` (also
task_arithmetic, della, slerp, nuslerp, multislerp, karcher, model_stock), per-model weight and density —
are merged by ``core/model_merge.merge_from_config`` (``chatvec merge CONFIG.yml -o OUT``).
"""
from __future__ import annotations

import torch

from chatvec_lab.errors import UsageError
from chatvec_lab.core.transforms import bernoulli, check_settings, magnitude, magnitude_outliers, sign_consensus
from chatvec_lab.core.vector import ChatVector, Transformed, check_compatible, without_vocabulary

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


def merge(vectors, method: str = "ties", density: float = 1.0, gamma: float = 0.01, seed: int = 0,
          consensus: str = "sum", normalize: bool | None = None, rescale: str | None = "l1") -> ChatVector:
    """One vector from ``[(vector, weight), …]`` (or ``{vector: weight}``); see the module's docstring.

    ``normalize`` defaults as in mergekit: on for ``ties``, off for the others. ``rescale`` (DARE): ``l1``
    keeps each sparsified delta's L1 norm (mergekit), ``inverse`` divides by ``density`` (the paper)."""
    if method not in METHODS:
        raise UsageError(f"merge method must be one of {METHODS}, not {method!r}")
    if normalize is None:
        normalize = method == "ties"
    pairs = list(vectors.items()) if isinstance(vectors, dict) else list(vectors)
    if not pairs:
        raise UsageError("no vector to merge")
    pairs = [(ChatVector.open(v), w) for v, w in pairs]
    for vec, weight in pairs:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise UsageError(f"a merge weight must be a number, not {weight!r}")
    first = pairs[0][0]
    for vec, _ in pairs[1:]:
        check_compatible(first, vec)
    vecs = [v for v, _ in pairs]
    weights = torch.tensor([float(w) for _, w in pairs], dtype=torch.float32)
    kind = method.split("_")[0]

    def sparsified(i: int, name: str, d: torch.Tensor) -> torch.Tensor:
        if kind == "ties":
            return magnitude(d, density)
        if kind == "dare":
            return bernoulli(d, density, seed + i, name, rescale)  # a different mask for each source
        if kind == "breadcrumbs":
            return magnitude_outliers(d, density, gamma)
        return d

    def compute(name: str) -> torch.Tensor:
        deltas = [sparsified(i, name, vec[name]) for i, vec in enumerate(vecs)]
        weighted = torch.stack(deltas) * weights.reshape(-1, *([1] * deltas[0].dim()))
        if method.endswith("ties"):
            return sign_consensus(weighted, weights, consensus, normalize)
        mixed = weighted.sum(0)
        total = float(weights.sum())
        return mixed / total if normalize and abs(total) > 1e-8 else mixed

    settings = {"method": method, "density": density, "gamma": gamma, "seed": seed, "consensus": consensus,
                "normalize": normalize, "rescale": rescale, "weights": [float(w) for _, w in pairs]}
    check_settings(density, gamma, rescale, consensus)  # now, not mid-apply
    meta = {"format": first.metadata.get("format"), "merge": settings,
            "combination_of": [without_vocabulary(v.metadata) for v in vecs]}
    if first.vocabulary is not None:
        meta |= {"vocabulary": first.vocabulary.to_json(), "chat_rows": first.chat_rows}
    term = Transformed(compute, vecs, f"{method} merge of {len(vecs)} vectors")
    return ChatVector([(1.0, term)], first.shapes, meta, base_config=first.base_config)
