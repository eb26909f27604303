"""Per-tensor transforms of a delta, as pure functions: the building blocks of merge methods and low rank.

Each takes and returns float32 tensors and never modifies its input. The vector algebra (``vector.py``)
applies them lazily, one tensor at a time; ``merge.py`` combines several sources with them.

- ``magnitude``: keep the ``max(1, int(density · numel))`` entries with the largest |value| (TIES' trim;
  "magnitude" in mergekit, whose rule this is: a positive density keeps at least one entry of a non-empty
  tensor). Which of several entries with the same |value| at the cut is kept is decided by the permutation of
  ``torch.argsort(|value|, descending=True)``, an unstable sort: the same sort mergekit runs, so both keep
  the same entries with the same torch, but the choice is not "by position" and may differ between torch versions
  and builds (a build with x86-simd-sort sorts floats with it instead of ``std::sort``).
- ``magnitude_outliers``: drop the ``gamma`` share of largest entries, then the smallest, keeping ``density``
  (model breadcrumbs).
- ``bernoulli``: keep each entry with probability ``density`` from a seeded generator, rescaled so the
  delta keeps its L1 norm (mergekit's DARE) or by 1/density (the DARE paper's expectation-preserving form).
- ``sign_consensus``: TIES' elected sign and disjoint mean over several deltas.
- ``low_rank``: the best rank-r approximation of a matrix (truncated SVD; randomized for large matrices).
"""
from __future__ import annotations

import functools
import zlib

import torch

from chatvec_lab.errors import UsageError


def check_settings(density: float = 1.0, gamma: float = 0.0, rescale: str | None = None,
                   consensus: str = "sum") -> None:
    """Refuse bad settings before any tensor is read (a lazy vector would otherwise fail mid-apply)."""
    _check_density(density)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 <= gamma < 1:
        raise UsageError(f"gamma must be in [0, 1), not {gamma!r}")
    if rescale not in RESCALES:
        raise UsageError(f"rescale must be one of {RESCALES}, not {rescale!r}")
    if consensus not in ("sum", "count"):
        raise UsageError(f"consensus method must be 'sum' or 'count', not {consensus!r}")


MAX_RANK = 2**31 - 1  # far above any matrix's rank; a larger number overflows the tables' int64 columns


def check_rank(rank, method: str) -> None:
    """A rank is an integer from 0 to ``MAX_RANK`` (one above a matrix's own rank keeps that matrix whole)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise UsageError(f"rank must be a non-negative integer, not {rank!r}")
    if rank > MAX_RANK:
        raise UsageError(f"rank {rank} is far larger than any matrix (at most {MAX_RANK}; a rank above a matrix's "
                         "own keeps it whole)")
    if method not in ("auto", "exact", "randomized"):
        raise UsageError(f"method must be 'auto', 'exact' or 'randomized', not {method!r}")


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise UsageError(f"density must be a number in (0, 1], not {density!r}")


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    _check_density(density)
    if density >= 1:
        return delta.clone()
    if delta.numel() == 0:
        return delta.clone()
    k = max(1, int(density * delta.numel()))  # mergekit's rule: a positive density keeps at least one entry
    # argsort(|delta|, descending=True) is this sort's permutation; sorting |delta| in its own buffer, which then
    # becomes the mask, holds one copy of the tensor less (at an 8B model's embeddings: 2 GB)
    mask, order = delta.abs().reshape(-1), torch.empty(delta.numel(), dtype=torch.int64)
    torch.sort(_sort_keys(mask), descending=True, out=(_sort_keys(mask), order))
    mask.zero_()[order[:k]] = 1
    del order
    return delta * mask.view(delta.shape)


def _sort_keys(magnitudes: torch.Tensor) -> torch.Tensor:
    """What to sort for the permutation of ``magnitudes``: float32 magnitudes without NaN as their bits, int32
    (for non-negative floats the same order, so the same comparisons and the same permutation; an integer
    comparison skips the float comparator's NaN tests: 14% faster), where this torch's sort agrees (checked once)."""
    if magnitudes.dtype == torch.float32 and _integer_keys_agree() and not torch.isnan(magnitudes).any():
        return magnitudes.view(torch.int32)
    return magnitudes


@functools.cache
def _integer_keys_agree() -> bool:
    """Whether sorting float32 magnitudes and their int32 bits gives one permutation, on 300,000 entries full of
    equal values (as deltas of bfloat16 weights are): true of ``std::sort``; a torch built with another sort is
    checked rather than assumed."""
    gen = torch.Generator().manual_seed(0)
    sample = (torch.randn(300_000, generator=gen) * 0.01).to(torch.bfloat16).float().abs()
    floats, bits = torch.sort(sample, descending=True), torch.sort(sample.view(torch.int32), descending=True)
    return torch.equal(floats.indices, bits.indices)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    check_settings(density, gamma)
    if density >= 1:
        return delta.clone()
    n = delta.numel()
    keep_n, top = int(density * n), int(gamma * n)
    bottom = n - keep_n - top
    if bottom < 0:  # not enough room: remove fewer of the largest
        top, bottom = top + bottom, 0
    order = torch.sort(delta.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[bottom:n - top]] = 1
    return delta * mask.view(delta.shape)


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one tensor: the same for the same (seed, name), whatever order tensors are read in."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


RESCALES = ("l1", "inverse", None)


def bernoulli(delta: torch.Tensor, density: float, seed: int, name: str, rescale: str | None = "l1") -> torch.Tensor:
    check_settings(density, rescale=rescale)
    if density >= 1:
        return delta.clone()
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    mask = torch.rand(delta.shape, generator=gen) < density
    out = delta * mask
    if rescale == "inverse":
        return out / density
    if rescale == "l1":
        before, after = float(delta.abs().sum()), float(out.abs().sum())
        if before >= 1e-7 and after >= 1e-7:  # as mergekit: a vanishing norm is left unscaled
            return out * (before / after)
    return out


def sign_consensus(weighted: torch.Tensor, weights: torch.Tensor, method: str = "sum",
                   normalize: bool = True) -> torch.Tensor:
    """TIES: ``weighted`` is (sources, …) of weight·delta. The elected sign of each entry is that of the sum
    (``sum``) or of the majority count (``count``), 0 counting as +; entries that disagree with it (or are
    0) are left out, and the rest summed, divided by the weights that took part (``normalize``)."""
    check_settings(consensus=method)
    sign = weighted.sign()
    total = weighted.sum(0) if method == "sum" else sign.sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0)
    agree = (sign == elected).to(weighted.dtype)
    mixed = (weighted * agree).sum(0)
    if not normalize:
        return mixed
    w = weights.reshape(-1, *([1] * (weighted.dim() - 1)))
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def low_rank_factors(matrix: torch.Tensor, rank: int, method: str = "auto",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the rank-``rank`` truncated SVD of a 2-D float32 matrix (B: m × r, A: r × n;
    ``r = min(rank, m, n)``; the singular values go to B). ``auto``: exact below 2,048 on the short side,
    randomized (``torch.svd_lowrank``, 4 power iterations, seeded) above; a rank at or past full is exact."""
    if matrix.dim() != 2:
        raise UsageError(f"low_rank needs a matrix, got shape {tuple(matrix.shape)}")
    check_rank(rank, method)
    r = min(rank, *matrix.shape)
    m = matrix.to(torch.float64)  # float64 for the factorisation; the factors go back to the input's dtype
    if r == min(matrix.shape) or method == "exact" or (method == "auto" and min(matrix.shape) < 2048):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        b, a = u[:, :r] * s[:r], vh[:r]
    else:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(m, q=min(r + 8, min(m.shape)), niter=4)
        finally:
            torch.random.set_rng_state(state)
        b, a = u[:, :r] * s[:r], v[:, :r].T
    return b.to(matrix.dtype).contiguous(), a.to(matrix.dtype).contiguous()


def low_rank(matrix: torch.Tensor, rank: int, method: str = "auto", seed: int = 0) -> torch.Tensor:
    """The rank-``rank`` truncated SVD of a 2-D float32 matrix (see ``low_rank_factors``); a rank at or past
    full returns a copy, rank 0 zeros."""
    if matrix.dim() != 2:
        raise UsageError(f"low_rank needs a matrix, got shape {tuple(matrix.shape)}")
    check_rank(rank, method)
    if rank >= min(matrix.shape):
        return matrix.clone()
    if rank == 0:
        return torch.zeros_like(matrix)
    b, a = low_rank_factors(matrix.to(torch.float64), rank, method, seed)
    return (b @ a).to(matrix.dtype)
