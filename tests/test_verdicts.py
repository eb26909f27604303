"""Verdicts about a cosine are set against chance (1/√d): a test for each boundary, both signs."""
from __future__ import annotations

import math

import pytest
import torch

from chatvec_lab import ChatVector

from chatvec_lab.analysis import geometry
from chatvec_lab.errors import UsageError
from chatvec_lab.analysis.geometry import (ALIGNED_COSINE, ORTHOGONAL_WITHIN_CHANCE, aligned, chance_cosine, describe_cosine,
                                  grade_cosine)

D = 10_000  # chance level 1/√d = 0.01
CHANCE = 0.01


def test_chance_level():
    assert chance_cosine(D) == pytest.approx(CHANCE)
    assert chance_cosine(2_360_000) == pytest.approx(6.51e-4, rel=1e-3)
    assert math.isnan(chance_cosine(0))


@pytest.mark.parametrize("sign", [1, -1])
def test_orthogonal_only_within_a_few_chance_levels(sign):
    k = ORTHOGONAL_WITHIN_CHANCE
    assert grade_cosine(0.0, D) == "orthogonal"
    assert grade_cosine(sign * (k - 0.01) * CHANCE, D) == "orthogonal"
    assert grade_cosine(sign * k * CHANCE, D) == "orthogonal"  # the boundary itself is still chance
    assert grade_cosine(sign * (k + 0.01) * CHANCE, D) == ("weakly aligned" if sign > 0 else "weakly opposed")


@pytest.mark.parametrize("sign", [1, -1])
def test_aligned_from_the_threshold_on(sign):
    word = "aligned" if sign > 0 else "opposed"
    assert grade_cosine(sign * (ALIGNED_COSINE - 1e-3), D) == f"weakly {word}"
    assert grade_cosine(sign * ALIGNED_COSINE, D) == word
    assert grade_cosine(sign * (ALIGNED_COSINE + 1e-3), D) == word
    assert grade_cosine(sign * 1.0, D) == word
    # the threshold grades size, never orthogonality: a small threshold does not make chance "aligned"
    assert grade_cosine(sign * 0.02, D, threshold=0.01) == "orthogonal"
    assert grade_cosine(sign * 0.05, D, threshold=0.01) == word
    assert grade_cosine(sign * 0.5, D, threshold=0.6) == f"weakly {word}"


def test_the_boundaries_move_with_the_dimension():
    # the same cosine is chance in 100 dimensions (0.2 = 2 chance levels) and far beyond it in a million
    assert grade_cosine(0.2, 100) == "orthogonal"
    assert grade_cosine(0.2, 1_000_000) == "weakly aligned"
    assert grade_cosine(0.5, 4) == "orthogonal"  # 1 chance level in 4 dimensions, however large it looks


def test_cosine_0_28_of_the_toys_size_is_not_orthogonal():
    d = 2_360_000
    assert grade_cosine(0.28, d) == "weakly aligned" and grade_cosine(-0.28, d) == "weakly opposed"
    text = describe_cosine(0.28, d, what="global cosine")
    assert "orthogonal" not in text
    assert text.startswith("weakly aligned: global cosine 0.28 = 430× chance")
    assert "1/√d = 6.5e-04" in text and "d = 2,360,000" in text


@pytest.mark.parametrize("multiple,shown", [(2.9, "2.9×"), (3.1, "3.1×"), (150.3, "150×"), (-4.0, "4.0×")])
def test_the_verdict_states_chance_and_the_multiple(multiple, shown):
    text = describe_cosine(multiple * CHANCE, D)
    assert f"= {shown} chance" in text and "chance 1/√d = 1.0e-02" in text and "d = 10,000" in text
    assert text.startswith(grade_cosine(multiple * CHANCE, D) + ":")


def test_undefined_and_bad_thresholds():
    assert grade_cosine(math.nan, D) == "undefined"
    assert describe_cosine(math.nan, D).startswith("undefined")
    assert grade_cosine(0.5, 0) == "undefined"
    for bad in (0, -0.3, 1.5, math.nan, "x"):
        with pytest.raises(UsageError):
            grade_cosine(0.5, D, threshold=bad)


def _pair(cos: float, seed: int = 0) -> tuple[dict, dict]:
    """Two vectors over the same tensors whose global cosine is exactly ``cos``."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (32, 16) for i in range(4)}
    shapes["model.embed_tokens.weight"] = (40, 16)
    a = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    r = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    dot = sum(float((a[n] * r[n]).sum()) for n in a)
    aa = sum(float((t * t).sum()) for t in a.values())
    r = {n: r[n] - dot / aa * a[n] for n in a}  # orthogonal to a over all coordinates
    rr = sum(float((t * t).sum()) for t in r.values())
    b = {n: cos * a[n] / math.sqrt(aa) + math.sqrt(1 - cos * cos) * r[n] / math.sqrt(rr) for n in a}
    return ({n: t.float() for n, t in a.items()}, {n: t.float() for n, t in b.items()})


DIM = 4 * 32 * 16 + 40 * 16  # 2688 coordinates: chance 0.0193


@pytest.mark.parametrize("multiple,grade", [(2.8, "orthogonal"), (-2.8, "orthogonal"), (3.2, "weakly aligned"),
                                            (-3.2, "weakly opposed")])
def test_aligned_verdict_at_the_chance_boundary(multiple, grade):
    a, b = _pair(multiple / math.sqrt(DIM))
    stats = geometry.vector_stats({"a": ChatVector.from_tensors(a), "b": ChatVector.from_tensors(b)})
    res = aligned(stats, "a", "b")
    assert res["cosine"] * math.sqrt(DIM) == pytest.approx(multiple, abs=1e-3)
    assert res["verdict"].startswith(f"{grade}: global cosine")
    assert f"= {abs(multiple):.1f}× chance" in res["verdict"] and f"d = {DIM:,}" in res["verdict"]
    assert set(res) == {"cosine", "sign_agreement", "verdict", "driver", "blocks_cosine", "parts"}


@pytest.mark.parametrize("cos,grade", [(0.29, "weakly aligned"), (0.31, "aligned"), (-0.29, "weakly opposed"),
                                       (-0.31, "opposed")])
def test_aligned_verdict_at_the_threshold(cos, grade):
    a, b = _pair(cos)
    stats = geometry.vector_stats({"a": ChatVector.from_tensors(a), "b": ChatVector.from_tensors(b)})
    res = aligned(stats, "a", "b")
    assert res["verdict"].startswith(f"{grade}: global cosine {cos:.2f} = ")
    # the blocks' cosine is graded against their own chance level
    assert "; inside the blocks " in res["verdict"] and res["verdict"].count("× chance (chance 1/√d = ") == 2
    assert aligned(stats, "a", "b", threshold=abs(cos) + 0.05)["verdict"].startswith("weakly ")
    assert not aligned(stats, "a", "b", threshold=abs(cos) - 0.05)["verdict"].startswith("weakly ")
