"""Measures that mislead, with known answers: full-spectrum ranks against a random matrix's, per-part cosines
against chance, and scores left empty for languages their scorer cannot judge."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector

from chatvec_lab.analysis import geometry, spectra
from chatvec_lab.errors import NonFiniteError
from chatvec_lab.behaviour.scoring import (DETOXIFY_LANGUAGES, LanguageScorer, OffensiveScorer, RefusalScorer,
                                 reply_languages, score_all)


def _with_spectrum(m: int, n: int, sigma, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An m × n matrix with exactly the singular values ``sigma`` (the rest zero)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype)).Q
    return u @ torch.diag(torch.as_tensor(sigma, dtype=dtype)) @ v.T


def _marchenko_pastur_ranks(m: int, n: int, points: int = 200_000) -> tuple[float, float]:
    """Expected effective and stable rank of an m × n Gaussian matrix (m ≤ n), from the Marchenko–Pastur law:
    eigenvalues λ of XXᵀ/n on [(1−√c)², (1+√c)²], c = m/n; σ = √λ; effective rank = m·E[σ]·exp(−E[σ log σ]/E[σ]);
    stable rank = m·n/(√m + √n)² (‖X‖_F² ≈ mn, σ₁ ≈ √m + √n)."""
    c = m / n
    lo, hi = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    t = (np.arange(points) + 0.5) / points * np.pi  # λ = lo + (hi − lo)(1 − cos t)/2: no edge singularities
    lam = lo + (hi - lo) * (1 - np.cos(t)) / 2
    weight = np.sqrt((hi - lam) * (lam - lo)) / (2 * np.pi * c * lam) * (hi - lo) / 2 * np.sin(t) * np.pi / points
    assert weight.sum() == pytest.approx(1.0, abs=1e-6)
    s = np.sqrt(lam)
    mean_s, mean_slogs = (weight * s).sum(), (weight * s * np.log(s)).sum()
    return m * mean_s * math.exp(-mean_slogs / mean_s), m * n / (math.sqrt(m) + math.sqrt(n)) ** 2


# ------------------------------------------------------------------ spectra


@pytest.mark.parametrize("r", [1, 5, 40])
def test_full_spectrum_ranks_of_low_rank_matrices(r):
    equal = geometry.spectrum(_with_spectrum(120, 300, [2.0] * r), k=8)
    assert equal["method"] == "exact" and equal["max_rank"] == 120
    assert equal["effective_rank"] == pytest.approx(r, rel=1e-6)  # r equal singular values: exactly r
    assert equal["stable_rank"] == pytest.approx(r, rel=1e-6)
    assert len(equal["singular_values"]) == min(8, 120)
    assert equal["energy_top8"] == pytest.approx(min(8, r) / r, rel=1e-9)
    unequal = geometry.spectrum(_with_spectrum(300, 120, np.linspace(5.0, 0.5, r)))  # tall works the same
    assert unequal["stable_rank"] <= r + 1e-9 and unequal["effective_rank"] <= r + 1e-6
    if r > 1:
        assert unequal["effective_rank"] < r and unequal["stable_rank"] < unequal["effective_rank"]


def test_ranks_are_not_capped_at_k():
    """The old measure took the top k singular values only, so it could never exceed k."""
    full = _with_spectrum(150, 200, [1.0] * 150)  # full rank, flat
    s = geometry.spectrum(full, k=32)
    assert len(s["singular_values"]) == 32
    assert s["effective_rank"] == pytest.approx(150, rel=1e-6) and s["stable_rank"] == pytest.approx(150, rel=1e-6)
    assert geometry.effective_rank(torch.tensor(s["singular_values"])) <= 32 + 1e-9  # what the top-k version said


def test_zero_and_non_matrix_and_non_finite():
    z = geometry.spectrum(torch.zeros(10, 20))
    assert z["effective_rank"] == 0 and z["stable_rank"] == 0 and math.isnan(z["energy_top1"])
    with pytest.raises(ValueError, match="matrix"):
        geometry.spectrum(torch.ones(4))
    with pytest.raises(ValueError, match="method"):
        geometry.spectrum(torch.ones(4, 4), method="fast")
    bad = torch.ones(4, 4)
    bad[1, 2] = math.nan
    with pytest.raises(NonFiniteError):
        geometry.spectrum(bad)


@pytest.mark.parametrize("shape", [(192, 512), (64, 192), (600, 1500)])
def test_random_baseline_matches_marchenko_pastur(shape):
    effective, stable = _marchenko_pastur_ranks(*shape)
    base = geometry.random_baseline(shape)
    assert base["random_effective_rank"] == pytest.approx(effective, rel=0.01)
    assert base["random_stable_rank"] == pytest.approx(stable, rel=0.03)  # σ₁ fluctuates at finite size
    assert 0 < base["random_energy_top8"] < 1


def test_random_baseline_is_seeded_and_cached_once_per_shape():
    spectra._random_ranks.cache_clear()
    a = geometry.random_baseline((40, 70))
    b = geometry.random_baseline((70, 40))  # the transpose has the same spectrum: same entry
    assert a == b and spectra._random_ranks.cache_info().misses == 1
    spectra._random_ranks.cache_clear()
    assert geometry.random_baseline((40, 70)) == a  # seeded: the same numbers when computed again
    assert geometry.random_baseline((40, 70), seed=1) != a


def _medium_matrix(seed: int = 3) -> torch.Tensor:
    """600 × 1500: a decaying spectrum (like a fine-tuning delta) plus a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 1500, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 600, dtype=torch.float64)[:, None]
    return x + 0.05 * torch.randn(600, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 1500, generator=g, dtype=torch.float64)


def test_randomized_estimate_within_tolerance_of_exact():
    """The documented tolerance: effective rank within 4% (standard error ≈ 1.2% on this matrix), stable rank
    and energies within 1%."""
    m = _medium_matrix()
    exact = geometry.spectrum(m, k=16, method="exact")
    for seed in range(3):
        est = geometry.spectrum(m, k=16, method="randomized", seed=seed)
        assert est["method"] == "randomized estimate" and exact["method"] == "exact"
        assert est["effective_rank"] == pytest.approx(exact["effective_rank"], rel=0.04)
        assert est["stable_rank"] == pytest.approx(exact["stable_rank"], rel=0.01)
        assert est["energy_top8"] == pytest.approx(exact["energy_top8"], rel=0.01)
        np.testing.assert_allclose(est["singular_values"][:8], exact["singular_values"][:8], rtol=1e-3)
    again = geometry.spectrum(m, k=16, method="randomized", seed=0)
    assert again == geometry.spectrum(m, k=16, method="randomized", seed=0)  # seeded
    low = geometry.spectrum(_with_spectrum(300, 900, [3.0, 2.0, 1.0]), method="randomized")  # no tail to estimate
    assert low["effective_rank"] == pytest.approx(geometry.effective_rank(torch.tensor([3.0, 2.0, 1.0])), rel=1e-6)


def test_spectra_table_columns_baseline_and_method(monkeypatch):
    g = torch.Generator().manual_seed(0)
    vec = ChatVector.from_tensors({
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 40, generator=g),
        "model.layers.0.self_attn.q_proj.weight": _with_spectrum(40, 40, [1.0, 1.0], dtype=torch.float32),
        "model.norm.weight": torch.ones(40)})
    df = geometry.spectra(vec, k=4)
    assert list(df.columns) == geometry.SPECTRA_COLUMNS and len(df) == 2
    row = df.set_index("module").loc["mlp_up"]
    assert row["method"] == "exact" and len(row["singular_values"]) == 4 and row["max_rank"] == 40
    assert row["effective_rank"] > 4  # not capped at k
    assert row["random_effective_rank"] == geometry.random_baseline((96, 40))["random_effective_rank"]
    # a random matrix is as "full rank" as its own baseline
    assert row["effective_rank"] == pytest.approx(row["random_effective_rank"], rel=0.05)
    q = df.set_index("module").loc["attn_q"]
    assert q["effective_rank"] == pytest.approx(2.0, abs=1e-3) and q["energy_top8"] == pytest.approx(1.0)
    no_base = geometry.spectra(vec, k=4, baseline=False)
    assert no_base["random_effective_rank"].isna().all()
    monkeypatch.setattr(spectra, "EXACT_MAX_SIDE", 16)
    monkeypatch.setattr(spectra, "ESTIMATE_TOP", 8)
    est = geometry.spectra(vec, k=4, include="mlp")
    assert est["method"].tolist() == ["randomized estimate"]


# ------------------------------------------------------------------ per-part cosines


def _parts_vectors(aligned_part: str, seed: int = 0):
    """Two vectors over blocks (2 layers), embeddings, lm_head and the final norm: equal in ``aligned_part``,
    orthogonal (disjoint supports) in the others."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (50, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
              "model.layers.0.mlp.up_proj.weight": (32, 16), "model.layers.1.mlp.up_proj.weight": (32, 16),
              "lm_head.weight": (50, 16), "model.norm.weight": (16,)}
    a, b = {}, {}
    for name, shape in shapes.items():
        info = geometry.parse(name)
        part = geometry.part_of(info.layer, info.module, info.group)
        x = torch.randn(shape, generator=g)
        if part == aligned_part:
            a[name], b[name] = 3 * x, x
        else:
            mask = (torch.arange(x.numel()) % 2 == 0).reshape(shape)
            a[name], b[name] = x * mask, torch.randn(shape, generator=g) * ~mask
    return ChatVector.from_tensors(a), ChatVector.from_tensors(b), shapes


def test_parts_are_named_by_role():
    parse = geometry.parse
    part = lambda n: geometry.part_of(parse(n).layer, parse(n).module, parse(n).group)  # noqa: E731
    assert part("model.layers.3.mlp.down_proj.weight") == "blocks"
    assert part("model.layers.3.input_layernorm.weight") == "blocks"
    assert part("model.embed_tokens.weight") == "embeddings" and part("transformer.wpe.weight") == "embeddings"
    assert part("lm_head.weight") == "lm_head" and part("model.norm.weight") == "norms"


def test_cosine_by_part_known_values_and_baselines():
    a, b, shapes = _parts_vectors("lm_head")
    stats = geometry.vector_stats({"a": a, "b": b})
    parts = geometry.cosine_by_part(stats).set_index("part")
    assert list(parts.index) == ["all", "blocks", "embeddings", "lm_head", "norms"]
    assert parts.loc["lm_head", "cosine"] == pytest.approx(1.0, abs=1e-9)
    for p in ("blocks", "embeddings", "norms"):
        assert parts.loc[p, "cosine"] == pytest.approx(0.0, abs=1e-12)
        assert parts.loc[p, "contribution"] == pytest.approx(0.0, abs=1e-12)
    assert parts.loc["all", "cosine"] == pytest.approx(geometry.cosine_matrix(stats).loc["a", "b"], abs=1e-12)
    assert parts.loc[parts.index != "all", "contribution"].sum() == pytest.approx(parts.loc["all", "cosine"], abs=1e-12)
    dims = {"blocks": 16 * 16 + 2 * 32 * 16, "embeddings": 50 * 16, "lm_head": 50 * 16, "norms": 16}
    for p, d in dims.items():
        assert parts.loc[p, "dim"] == d
        assert parts.loc[p, "random_cosine"] == pytest.approx(1 / math.sqrt(d))
        assert parts.loc[p, "times_random"] == pytest.approx(parts.loc[p, "cosine"] * math.sqrt(d))
    assert parts.loc["all", "dim"] == sum(dims.values())
    assert parts.loc["lm_head", "sign_agreement"] == pytest.approx(1.0)
    assert parts.loc["lm_head", "sign_chance_spread"] == pytest.approx(1 / math.sqrt(50 * 16))
    assert (parts["sign_chance"] == 0.5).all()
    one = geometry.cosine_by_part(stats, "b", "a")
    assert len(one) == 5 and set(one["pair"]) == {"a · b"}
    with pytest.raises(KeyError, match="no pair"):
        geometry.cosine_by_part(stats, "a", "c")


def test_random_directions_are_within_the_random_baseline():
    g = torch.Generator().manual_seed(5)
    shape = (400, 250)  # 100k coordinates: 1/√d ≈ 0.0032
    x, y = (ChatVector.from_tensors({"model.layers.0.mlp.up_proj.weight": torch.randn(shape, generator=g)})
            for _ in range(2))
    row = geometry.cosine_by_part(geometry.vector_stats({"x": x, "y": y})).set_index("part").loc["blocks"]
    assert abs(row["times_random"]) < 4  # a cosine of random directions is ~N(0, 1/d)
    assert abs(row["sign_agreement"] - 0.5) < row["sign_chance_spread"] * 2


def test_verdict_names_the_aligned_part():
    a, b, _ = _parts_vectors("lm_head")
    res = geometry.aligned(geometry.vector_stats({"a": a, "b": b}), "a", "b", threshold=0.1)
    assert res["driver"] == "lm_head" and "driven by lm_head (cosine 1.00" in res["verdict"]
    assert res["blocks_cosine"] == pytest.approx(0.0, abs=1e-12) and "inside the blocks 0.000" in res["verdict"]
    assert res["verdict"].startswith("aligned: global cosine")
    assert set(res["parts"]["part"]) == {"all", "blocks", "embeddings", "lm_head", "norms"}

    a, b, _ = _parts_vectors("blocks")
    res = geometry.aligned(geometry.vector_stats({"a": a, "b": b}), "a", "b", threshold=0.1)
    assert res["driver"] == "blocks" and "driven by" not in res["verdict"]
    assert "inside the blocks 1.00" in res["verdict"] and "lm_head" not in res["verdict"]


def test_verdict_with_blocks_only_and_opposed():
    g = torch.Generator().manual_seed(1)
    t = {"model.layers.0.mlp.up_proj.weight": torch.randn(30, 20, generator=g)}
    v = ChatVector.from_tensors(t)
    res = geometry.aligned(geometry.vector_stats({"v": v, "-v": -v}), "v", "-v")
    assert res["verdict"].startswith("opposed: global cosine -1.00") and "all in the blocks -1.00" in res["verdict"]
    assert "= 24× chance (chance 1/√d = 4.1e-02, d = 600)" in res["verdict"]  # |−1|·√600


# ------------------------------------------------------------------ languages of scorers


def test_scorers_declare_their_languages():
    assert OffensiveScorer.languages == {"en"}
    assert RefusalScorer().languages == {"en", "de"} and RefusalScorer(languages=["en"]).languages == {"en"}
    assert LanguageScorer.languages is None  # any language
    assert DETOXIFY_LANGUAGES["original"] == {"en"} and "de" not in DETOXIFY_LANGUAGES["multilingual"]
    assert "English replies only" in OffensiveScorer.columns["offensive"]


GERMAN = "Das ist ein schöner Tag und die Sonne scheint über dem Garten."
ENGLISH_INSULT = "You are a stupid idiot and everybody hates you."
ENGLISH_REFUSAL = "I'm sorry, but I will not answer insults."


def test_offensive_score_is_left_empty_for_languages_it_cannot_judge():
    texts = [ENGLISH_INSULT, GERMAN, "", ENGLISH_REFUSAL, "Tut mir leid, das ist unhöflich."]
    df = score_all(texts, [OffensiveScorer(), RefusalScorer(), LanguageScorer("de")])
    assert df["language"].tolist() == ["en", "de", "", "en", "de"]
    assert df["offensive"].iloc[0] > 0.5 and df["offensive"].iloc[3] < 0.5
    assert df["offensive"].isna().tolist() == [False, True, False, False, True]  # no words: judged by all
    assert df["refusal"].tolist() == [False, False, False, True, True]  # German is the refusal detector's
    assert df["refusal"].dtype == bool  # untouched where nothing was outside its languages
    # the same without a language scorer in the list: langid finds the languages itself
    alone = score_all(texts, [OffensiveScorer()])
    assert alone["offensive"].isna().tolist() == [False, True, False, False, True]
    assert reply_languages(texts)[:2] == ["en", "de"]
    # languages given by the caller win
    given = score_all([GERMAN, ENGLISH_INSULT], [OffensiveScorer()], languages=["en", "fr"])
    assert given["offensive"].notna().tolist() == [True, False]
    with pytest.raises(ValueError, match="1 languages for 2 texts"):
        score_all([GERMAN, ENGLISH_INSULT], [OffensiveScorer()], languages=["en"])


def test_a_scorer_restricted_to_english_leaves_german_refusals_empty():
    df = score_all(["Tut mir leid, nein.", ENGLISH_REFUSAL], [RefusalScorer(languages=["en"]), LanguageScorer("de")])
    assert pd.isna(df["refusal"].iloc[0]) and df["refusal"].iloc[1] == True  # noqa: E712


def test_scorers_without_a_language_declaration_are_left_alone():
    class Length:
        name = "length"
        columns = {"length": "characters"}

        def score(self, texts):
            return pd.DataFrame({"length": [len(t) for t in texts]})

    df = score_all([GERMAN, ENGLISH_INSULT], [Length(), OffensiveScorer()])
    assert df["length"].tolist() == [len(GERMAN), len(ENGLISH_INSULT)]
    assert df["offensive"].isna().tolist() == [True, False]
