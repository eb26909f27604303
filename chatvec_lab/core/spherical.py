"""Spherical merge kernels, one tensor at a time: slerp, nuslerp, multislerp, karcher, model_stock.

Each is a registry kernel (``core/merge_methods.py``): ``kernel(base, tensors, params, name, seed)`` on
tensors in the compute dtype, with mergekit 0.1.5's arithmetic operation for operation (its batched kernels
on a batch of one tensor), so float32 results are equal to mergekit's to the bit where torch's kernels are.
"""
from __future__ import annotations

import torch

SLERP_CHUNK = 1024 * 1024  # mergekit's bound on full-precision scratch per output


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (flattened), linear where they are (anti)collinear."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    step = max(1, SLERP_CHUNK // a.shape[0])
    chunks = range(0, a.shape[1], step)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + step].to(dtype), dim=1, keepdim=True) for s in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + step].to(dtype), dim=1, keepdim=True) for s in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + step].to(dtype) / norm_a) * (b[:, s:s + step].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in chunks:
        result[:, s:s + step] = coef_a * a[:, s:s + step].to(dtype) + coef_b * b[:, s:s + step].to(dtype)
    return result.reshape(v0.shape)


def slerp_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """slerp: from the base (``t = 0``) to the other model (``t = 1``)."""
    return slerp(p["t"], base, tensors[0])


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """Spherical interpolation over the whole tensor (``flatten``) or row by row (``dim``)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def nuslerp_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """nuslerp: ``t = w₂ / (w₁ + w₂)`` (0.5 for weights summing to 0); on deltas when there is a base."""
    w = p["weight"]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if p["nuslerp_row_wise"] else -1
    if base is not None:
        return base + nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=p["nuslerp_flatten"])
    return nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=p["nuslerp_flatten"])


def multislerp_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """multislerp: project the (deltas of the) inputs on the unit sphere, average in the tangent space at
    their weighted mean direction, map back, scale to the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    eps = p["eps"]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(p["weight"], dtype=stacked.dtype)
    if p["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            res = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return res + base if base is not None else res
        raise ValueError(f"multislerp: the weighted sum of the inputs' directions is zero for {name!r} "
                         "(antipodal inputs with balancing weights); use different weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the inputs' directions, scaled by their weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """karcher: the equal-weight Karcher mean of every input (the base model too, when the config names one)."""
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=p["max_iter"], tol=p["tol"])


def model_stock_kernel(base, tensors, p, name: str = "", seed: int = 0) -> torch.Tensor:
    """model_stock: ``t·mean(θᵢ) + (1 − t)·θ₀`` with ``t = k·cos / (1 + (k − 1)·cos)``, cos the mean pairwise
    cosine of the deltas (per row with ``filter_wise``); where the denominator vanishes, the base."""
    w0, ws, shape = base, list(tensors), base.shape
    if p["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)
