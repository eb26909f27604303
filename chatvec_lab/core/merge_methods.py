"""The merge-method registry: one entry per method, name → ``MergeMethod`` (its parameters and its kernel).

    from chatvec_lab.core.merge_methods import REGISTRY
    REGISTRY["ties"].kernel(base, [a, b], {"weight": [1.0, 0.5], "density": [0.3, 0.3], ...}, name, seed)

Each kernel merges one tensor: ``base`` (None where the method has none) and the other inputs' tensors, in
the compute dtype (float32, or float64 where asked), with the parameters already resolved for that tensor
(``per_source`` ones as lists aligned with ``tensors``, ``shared`` ones as scalars). The arithmetic is
mergekit 0.1.5's, operation for operation, so float32 results are equal to the bit where no random mask is
drawn (``dare_*``, ``della*``: seeded per tensor here, torch's global generator in mergekit). The spherical
methods' kernels live in ``core/spherical.py``. Adding a method is one entry in ``REGISTRY``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from chatvec_lab.core import spherical
from chatvec_lab.core.transforms import magnitude, magnitude_outliers, tensor_seed

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class MergeMethod:
    """What a method needs: ``base`` is "required", "optional" or "input" (no base: the base model, when the
    config names one, is an ordinary input); parameter name → default (``REQUIRED``) per source and shared."""
    name: str
    kernel: Callable[..., torch.Tensor]
    base: str
    per_source: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    min_sources: int = 1  # inputs other than the base
    max_sources: int | None = None
    random: bool = False
    summary: str = ""
    types: dict = field(default_factory=dict)  # parameter → int / bool where not float
    # whether the kernel, with these parameters, treats each element on its own (then a merge may run it on a
    # block of rows at a time, its temporaries kept in cache, with the same result); None: never
    elementwise: Callable[[dict], bool] | None = None
    promotes: bool = False  # the kernel takes the other inputs in their own dtype (it computes in the base's)


# ------------------------------------------------------------------------------------------------ sparsifying


def rescaled(tensor: torch.Tensor, masked: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's L1 rescale of a masked delta: times ``‖tensor‖₁ / ‖masked‖₁`` (as tensors), unless either
    norm is below ``eps``."""
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(tensor_seed(seed + index, name))  # one mask per source and tensor


def sparsify(kind: str | None, delta: torch.Tensor, density: float, rescale: bool, gamma: float, epsilon: float,
             gen: Callable[[], torch.Generator]) -> torch.Tensor:
    """One source's delta after the method's sparsification (mergekit's ``sparsify``)."""
    if kind is None or density >= 1:
        return delta
    if kind == "magnitude":
        return rescaled(delta, magnitude(delta, density), rescale)
    if kind == "magnitude_outliers":
        return rescaled(delta, magnitude_outliers(delta, density, gamma), rescale)
    if kind == "random":
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32), generator=gen())
        return rescaled(delta.float(), delta.float() * mask, rescale).to(delta.dtype)
    if kind == "della":
        return della_magprune(delta, density, epsilon, rescale, gen())
    raise ValueError(kind)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   gen: torch.Generator) -> torch.Tensor:
    """DELLA: keep each entry with a probability from ``density − ε`` (smallest |value| of its row) to
    ``density + ε`` (largest), ranks spread linearly (mergekit's ``della_magprune``)."""
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon {epsilon} must keep density ± epsilon in (0, 1) (density {density})")
    shape = delta.shape
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=gen).to(torch.float32)
    t = t.to(torch.float32)
    return rescaled(t, t * mask, rescale).to(delta.dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------ kernels


def task_arithmetic_kernel(sparsification: str | None, consensus: bool):
    """Generalized task arithmetic (mergekit's ``GeneralizedTaskArithmeticMerge``): sparsify each delta from
    the base, weight it, mix by TIES' elected sign (``consensus``) or sum, divide by the weights that took
    part (``normalize``), times ``lambda``, added to the base."""

    def kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
        if not tensors:
            return base
        deltas = base.new_empty((len(tensors), *base.shape))
        for i, t in enumerate(tensors):
            torch.sub(t, base, out=deltas[i])  # in the base's dtype, whatever t's (its values are exact there)
            if sparsification is None or p["density"][i] >= 1:
                continue
            gamma, epsilon = (p.get(k, [0.0] * len(tensors))[i] for k in ("gamma", "epsilon"))
            deltas[i] = sparsify(sparsification, deltas[i], p["density"][i], p["rescale"], gamma, epsilon,
                                 lambda i=i: _generator(seed, name, i))
        weights = torch.tensor(p["weight"], dtype=deltas.dtype)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if consensus:
            mask = sign_mask(deltas)
            mixed = deltas.mul_(mask).sum(dim=0)  # deltas * mask, in place: the same bits
            divisor = mask.to(deltas.dtype).mul_(weights).sum(dim=0)  # weights * mask
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if p["normalize"]:
            mixed /= divisor
        if p["lambda"] != 1:
            mixed *= p["lambda"]
        return mixed.add_(base)  # base + mixed, in place (its own fresh tensor): the same bits, one allocation less
    return kernel


def sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' election (sign of the sum, 0 counting as +): True where a source's sign is the elected one."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def linear_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """Σ wᵢ·θᵢ (the inputs' own weights, not deltas), divided by Σ wᵢ when ``normalize``."""
    first = tensors[0]
    weight = torch.tensor(p["weight"], dtype=first.dtype)
    result = torch.zeros_like(first)
    for tensor, coefficient in zip(tensors, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if p["normalize"]:
        result.div_(weight.sum())
    return result


def _gta(name, sparsification, consensus, normalize, rescale, summary, extra=None):
    per = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    return MergeMethod(name, task_arithmetic_kernel(sparsification, consensus), "required", per, shared,
                       random=sparsification in ("random", "della"), summary=summary,
                       types={"normalize": bool, "rescale": bool, "int8_mask": bool}, promotes=True,
                       elementwise=lambda p: sparsification is None or all(d >= 1 for d in p["density"]))


REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", linear_kernel, "input", {"weight": REQUIRED}, {"normalize": True},
                summary="weighted mean of the models' weights", types={"normalize": bool},
                elementwise=lambda p: True),
    _gta("task_arithmetic", None, False, False, False, "base + Σ wᵢ·Δᵢ"),
    _gta("ties", "magnitude", True, True, False, "trim to density, elect signs, disjoint mean"),
    _gta("dare_ties", "random", True, False, True, "random drop (rescaled), elect signs, disjoint sum"),
    _gta("dare_linear", "random", False, False, True, "random drop (rescaled), weighted sum"),
    _gta("breadcrumbs", "magnitude_outliers", False, False, False, "drop largest gamma and smallest, weighted sum",
         {"gamma": 0.01}),
    _gta("breadcrumbs_ties", "magnitude_outliers", True, False, False,
         "drop largest gamma and smallest, elect signs", {"gamma": 0.01}),
    _gta("della", "della", True, True, True, "magnitude-ranked random drop, elect signs", {"epsilon": 0.15}),
    _gta("della_linear", "della", False, False, True, "magnitude-ranked random drop, weighted sum",
         {"epsilon": 0.15}),
    MergeMethod("slerp", spherical.slerp_kernel, "required", {}, {"t": REQUIRED}, min_sources=1, max_sources=1,
                summary="spherical interpolation from the base (t=0) to the other model (t=1)"),
    MergeMethod("nuslerp", spherical.nuslerp_kernel, "optional", {"weight": REQUIRED},
                {"nuslerp_row_wise": False, "nuslerp_flatten": True}, min_sources=2, max_sources=2,
                summary="spherical interpolation of two models (or their deltas from the base)",
                types={"nuslerp_row_wise": bool, "nuslerp_flatten": bool}),
    MergeMethod("multislerp", spherical.multislerp_kernel, "optional", {"weight": REQUIRED},
                {"normalize_weights": True, "eps": 1e-8}, summary="barycentric interpolation on the hypersphere",
                types={"normalize_weights": bool}),
    MergeMethod("karcher", spherical.karcher_kernel, "input", {}, {"max_iter": 10, "tol": 1e-5}, min_sources=1,
                summary="Riemannian (Karcher) mean of the models' weights", types={"max_iter": int}),
    MergeMethod("model_stock", spherical.model_stock_kernel, "required", {}, {"filter_wise": False}, min_sources=2,
                summary="interpolate the mean of the models toward the base by their angle",
                types={"filter_wise": bool}),
)}
