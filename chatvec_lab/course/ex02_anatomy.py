"""The exercises of notebook 02_anatomy: the relative change ‖Δ‖/‖θ_base‖ of one tensor, and the effective rank
of one delta from its singular values (each a ``truth`` and a ``judge``: ``chatvec_lab.course.checking``)."""
from __future__ import annotations

import math

import torch

from chatvec_lab.course.checking import Exercise, Wrong, as_number, close
from chatvec_lab.course.measuring import raw_tensor, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


def _relative_change_truth(base, chat, tensor):
    delta = vector_of(base, chat)[tensor].double()
    base_t = raw_tensor(base, tensor).double()
    chat_t = raw_tensor(chat, tensor).double()
    return {"ratio": float(delta.norm() / base_t.norm()), "delta": float(delta.norm()),
            "over_chat": float(delta.norm() / chat_t.norm()),
            "norm_gap": float(abs(chat_t.norm() - base_t.norm()) / base_t.norm())}


def _relative_change_judge(answer, truth, ctx):
    v = as_number(answer)
    if close(v, truth["ratio"], 1e-3):
        return "Notebook 2's heatmap shows this ratio for every tensor: which modules change most for their size."
    if close(v, truth["delta"], 1e-3):
        raise Wrong("that is ‖Δ‖ alone: divide by the norm of the base's tensor.")
    if close(v, truth["over_chat"], 1e-4):
        raise Wrong("divided by the chat model's norm: the reference is the base's tensor, ‖θ_base‖.")
    if close(v, truth["norm_gap"], 1e-3):
        raise Wrong("that is the change of the norm, (‖θ_chat‖ − ‖θ_base‖)/‖θ_base‖; take the norm of the "
                    "difference, ‖θ_chat − θ_base‖.")
    raise Wrong(f"not ‖θ_chat − θ_base‖ / ‖θ_base‖ for {ctx['tensor']} (Frobenius norms, over all entries).")


EXERCISES.append(Exercise(
    name="relative_change",
    notebook="02_anatomy",
    title="the relative change ‖Δ‖/‖θ_base‖ of one tensor, by hand",
    question=(
        "Compute the relative change `‖θ_chat − θ_base‖ / ‖θ_base‖` (Frobenius norms: the square root of the "
        "sum of squares over all entries) of the tensor `model.layers.0.self_attn.q_proj.weight`, by hand from "
        "the two state dicts or from the vector. Your answer is one number."),
    params={"base": None, "chat": None, "tensor": "model.layers.0.self_attn.q_proj.weight"},
    truth=_relative_change_truth,
    judge=_relative_change_judge,
    hints=("tensor.norm() is the Frobenius norm of the whole tensor.",
           "The numerator is the norm of the difference; the denominator is the base's tensor.")))


def _effective_rank_truth(base, chat, tensor):
    from chatvec_lab.analysis.geometry import spectrum

    delta = vector_of(base, chat)[tensor].double()
    s = torch.linalg.svdvals(delta)
    s = s[s > 0]
    p, q = s / s.sum(), s**2 / (s**2).sum()
    entropy = float(-(p * p.log()).sum())
    return {"effective": spectrum(delta, method="exact")["effective_rank"],
            "stable": float((s**2).sum() / s[0] ** 2), "squared": math.exp(float(-(q * q.log()).sum())),
            "mixed_bases": 2 ** entropy, "entropy": entropy,
            "rank": float(min(delta.shape))}


def _effective_rank_judge(answer, truth, ctx):
    v = as_number(answer)
    if close(v, truth["effective"], 1e-3):
        return ("Set it next to a random matrix of the same shape, as notebook 2 does, before calling a change "
                "low-rank.")
    if close(v, truth["stable"], 1e-3):
        raise Wrong("that is the stable rank, ‖Δ‖²/σ₁²; the effective rank is exp of the entropy of σᵢ/Σσ.")
    if close(v, truth["squared"], 1e-3):
        raise Wrong("weighted by σ²: the effective rank (Roy & Vetterli) uses pᵢ = σᵢ/Σσ, not σᵢ²/Σσ².")
    if close(v, truth["entropy"], 1e-3):
        raise Wrong("that is the entropy itself: the effective rank is its exponential.")
    if close(v, truth["mixed_bases"], 1e-3):
        raise Wrong("the entropy in natural logarithms goes with exp(); 2**H mixes bases.")
    if close(v, truth["rank"], 1e-6):
        raise Wrong("that is the shorter side (every singular value is non-zero): the effective rank weighs "
                    "the singular values, pᵢ = σᵢ/Σσ.")
    raise Wrong(f"not exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ/Σσ of the delta of {ctx['tensor']}.")


EXERCISES.append(Exercise(
    name="effective_rank",
    notebook="02_anatomy",
    title="the effective rank of one delta from its singular values",
    question=(
        "Take the chat vector's delta for `model.layers.1.mlp.down_proj.weight`, its singular values σᵢ "
        "(`torch.linalg.svdvals`), pᵢ = σᵢ/Σσ, and compute the **effective rank** exp(−Σ pᵢ log pᵢ) (natural "
        "log). Your answer is one number; compare it with the shorter side of the matrix."),
    params={"base": None, "chat": None, "tensor": "model.layers.1.mlp.down_proj.weight"},
    truth=_effective_rank_truth,
    judge=_effective_rank_judge,
    hints=("The delta of one tensor is the chat vector indexed by the tensor's name (notebook 1 builds the vector); "
           "work in float64 so the logarithms of small weights do not round.",
           "The weights are the singular values, not their squares, and they sum to 1; the effective rank is the "
           "exponential of their entropy, between 1 and the shorter side of the matrix.")))
