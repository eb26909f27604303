"""Merge methods and low rank as lazy vector operations: equal to the formulas, and to mergekit where it is here."""
from __future__ import annotations

import pytest
import torch

from chatvec_lab import ChatVector, apply_to_model, toy
from chatvec_lab.errors import UsageError
from chatvec_lab.core.merge import merge
from chatvec_lab.core.transforms import low_rank, magnitude, sign_consensus

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight",
         "lm_head.weight"]


@pytest.fixture(scope="module")
def vectors():
    base = toy.path("base")
    return (ChatVector.from_models(base, toy.path("chat"), hash_files=False),
            ChatVector.from_models(base, toy.path("chat-alt"), hash_files=False))


def _naive_trim(t, density):
    k = int(density * t.numel())
    flat = t.reshape(-1)
    keep = flat.abs().argsort(descending=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view(t.shape)


def _naive_ties(deltas, weights, density):
    trimmed = torch.stack([_naive_trim(d, density) for d in deltas])
    w = torch.tensor(weights).reshape(-1, *([1] * deltas[0].dim()))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == elected).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def test_trim_and_ties_equal_their_formulas(vectors):
    cv, alt = vectors
    trimmed = cv.trim(0.2)
    merged = merge([(cv, 1.0), (alt, 0.7)], method="ties", density=0.2)
    for name in NAMES:
        assert torch.equal(trimmed[name], _naive_trim(cv[name], 0.2))
        assert (trimmed[name] != 0).sum() == int(0.2 * cv[name].numel())
        torch.testing.assert_close(merged[name], _naive_ties([cv[name], alt[name]], [1.0, 0.7], 0.2), rtol=0, atol=0)
    assert merged.metadata["merge"]["method"] == "ties" and merged.metadata["merge"]["normalize"] is True


def test_equal_to_mergekit_on_the_toy_family(vectors):
    sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit is in the bench extra")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    cv, alt = vectors
    for name in NAMES:
        a, b = cv[name], alt[name]
        assert torch.equal(cv.trim(0.3)[name], sparsify.magnitude(a, 0.3))
        assert torch.equal(cv.breadcrumbs(0.5, gamma=0.02)[name], sparsify.magnitude_outliers(a, 0.5, gamma=0.02))
        # mergekit's ties and breadcrumbs_ties: sparsify, weight, sign mask (get_mask), disjoint sum / weights
        for method, sparse in (("ties", lambda t: sparsify.magnitude(t, 0.3)),
                               ("breadcrumbs_ties", lambda t: sparsify.magnitude_outliers(t, 0.3, gamma=0.02))):
            deltas = torch.stack([sparse(a), sparse(b)])
            weights = torch.tensor([1.0, 0.5]).reshape(-1, *([1] * a.dim()))
            deltas = deltas * weights
            mask = gta.get_mask(deltas, method="sum")
            mixed = (deltas * mask).sum(0)
            if method == "ties":  # normalize: on for ties, off for breadcrumbs_ties (mergekit's defaults)
                divisor = (weights * mask).sum(0)
                divisor[divisor == 0] = 1
                mixed = mixed / divisor
            ours = merge([(cv, 1.0), (alt, 0.5)], method=method, density=0.3, gamma=0.02)[name]
            torch.testing.assert_close(ours, mixed, rtol=0, atol=0)


def test_dare_is_seeded_keeps_its_density_and_l1_norm(vectors):
    cv, alt = vectors
    name = NAMES[0]
    d = cv[name]
    a, again, other = cv.dare(0.3, seed=1)[name], cv.dare(0.3, seed=1)[name], cv.dare(0.3, seed=2)[name]
    assert torch.equal(a, again) and not torch.equal(a, other)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01  # 98k entries: the binomial's sd is 0.0015
    torch.testing.assert_close(a.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)  # mergekit's l1 rescale
    inverse = cv.dare(0.3, seed=1, rescale="inverse")[name]
    torch.testing.assert_close(inverse[a != 0], d[a != 0] / 0.3)
    # dare_linear: the two sources get different masks, and the result is their weighted sum
    m = merge([(cv, 1.0), (alt, 1.0)], method="dare_linear", density=0.5, seed=4)[name]
    ma, mb = cv.dare(0.5, seed=4)[name], alt.dare(0.5, seed=5)[name]
    torch.testing.assert_close(m, ma + mb)
    assert not torch.equal(ma != 0, mb != 0)


def test_low_rank_is_the_truncated_svd(vectors):
    cv, _ = vectors
    name = NAMES[0]
    d = cv[name]
    s = torch.linalg.svdvals(d.double())
    for r in (1, 8, 32):
        approx = cv.low_rank(r)[name]
        assert torch.linalg.matrix_rank(approx.double(), rtol=1e-6) <= r
        err = (approx.double() - d.double()).norm()
        torch.testing.assert_close(err, s[r:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart–Young
    torch.testing.assert_close(cv.low_rank(min(d.shape))[name], d)
    assert torch.equal(cv.low_rank(4)[NAMES[2]], cv[NAMES[2]])  # 1-D tensors stay whole
    assert cv.low_rank_bytes(8) < cv.low_rank_bytes(64) < 4 * cv.parameters


def test_randomized_low_rank_matches_exact_on_a_large_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2100, 40, generator=gen) @ torch.randn(40, 2200, generator=gen)
    m += 1e-3 * torch.randn(m.shape, generator=gen)
    exact, fast = low_rank(m, 40, "exact"), low_rank(m, 40, "randomized", seed=3)
    assert (fast - exact).norm() / exact.norm() < 1e-4
    assert torch.equal(fast, low_rank(m, 40, "randomized", seed=3))


def test_merged_vectors_apply_and_record_what_they_are(vectors):
    cv, alt = vectors
    merged = merge({cv: 1.0, alt: 1.0}, method="ties", density=0.5)
    model, report = apply_to_model(toy.path("cp"), [(merged, 1.0)], dtype=torch.float32)
    assert report.tensors["status"].str.startswith("added").all()
    paths = {str(p) for p in merged.input_paths()}
    assert str(toy.path("chat-alt").resolve()) in paths or any("chat-alt" in p for p in paths)
    cp = toy.load("cp")[0]
    delta = dict(model.named_parameters())[NAMES[0]].detach() - dict(cp.named_parameters())[NAMES[0]].detach()
    torch.testing.assert_close(delta, merged[NAMES[0]], rtol=0, atol=1e-6)


def test_bad_settings_fail_at_once_with_the_reason(vectors):
    cv, alt = vectors
    for call in (lambda: cv.trim(0), lambda: cv.trim(1.5), lambda: cv.dare(0.5, rescale="l7"),
                 lambda: cv.low_rank(-1), lambda: cv.breadcrumbs(0.5, gamma=1.2),
                 lambda: merge([(cv, 1.0)], method="slerp"), lambda: merge([(cv, "1")]),
                 lambda: merge([], method="ties"), lambda: merge([(cv, 1.0), (alt, 1.0)], consensus="vote")):
        with pytest.raises(UsageError):
            call()
    assert torch.equal(sign_consensus(torch.tensor([[1.0, -2.0], [-3.0, 0.0]]), torch.ones(2)),
                       torch.tensor([-3.0, -2.0]))
    assert torch.equal(magnitude(torch.tensor([3.0, -1.0, 2.0]), 2 / 3), torch.tensor([3.0, 0.0, 2.0]))
