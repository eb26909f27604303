"""Rank curves, merge sweeps and interference between sources: the tables say what they claim."""
from __future__ import annotations

import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.behaviour.ablations import compare_variants, merge_sweep, rank_curve, summarize
from chatvec_lab.errors import UsageError
from chatvec_lab.analysis.interference import interference
from chatvec_lab.core.merge import merge

PROMPTS = ["Erzähl mir was über Geld.", "Was weißt du über Liebe?"]
FAST = dict(scorers=["turn_end"], max_new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)


def test_interference_of_a_vector_with_itself_and_its_negative():
    a = ChatVector.from_tensors({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))})
    same = interference(a, a * 2.0, density=0.5).set_index("layer")
    assert same.loc["all", "cosine"] == pytest.approx(1.0)
    assert same.loc["all", "sign_conflict"] == 0 and same.loc["all", "trimmed_conflict"] == 0
    assert same.loc["all", "trimmed_overlap"] == pytest.approx(0.5)
    assert same.loc["all", "kept_a"] == pytest.approx(1.0)
    opposite = interference(a, a * -0.5, density=0.5).set_index("layer")
    assert opposite.loc["all", "cosine"] == pytest.approx(-1.0) and opposite.loc["all", "sign_conflict"] == 1
    # the larger source wins every sign election: TIES keeps all of it and none of the other
    assert opposite.loc["all", "kept_a"] == 1 and opposite.loc["all", "kept_b"] == 0


def test_interference_of_two_random_vectors_is_near_chance():
    g = torch.Generator().manual_seed(1)
    a, b = (ChatVector.from_tensors({"lm_head.weight": torch.randn(64, 64, generator=g)}) for _ in range(2))
    row = interference(a, b, density=0.3).set_index("layer").loc["all"]
    assert abs(row["cosine"]) < 0.05 and 0.45 < row["sign_conflict"] < 0.55
    assert 0.07 < row["trimmed_overlap"] < 0.11  # 0.3 × 0.3 kept by both


def test_interference_on_the_toy_family_rows_cover_every_cell(cv):
    alt = ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False)
    table = interference(cv, alt)
    assert len(table) == 4 * 8 + 3 + 1  # 4 layers × (7 modules + norm), embed, lm_head, final norm, all
    assert table[["cosine", "sign_conflict", "kept_a"]].notna().all().all()


def test_rank_curve_marks_ranks_bytes_and_reaches_the_full_vector(cv):
    df = rank_curve(toy.path("cp"), cv, [2, 1000], PROMPTS, **FAST)
    s = summarize(df).set_index("variant")
    assert set(s.index) == {"rank 2", "rank 1000", "full"}
    assert s.loc["rank 2", "stored_bytes"] < s.loc["full", "stored_bytes"]
    # past every matrix's rank the low-rank vector is the vector: same replies for the same seeds
    assert (df[df.variant == "rank 1000"]["reply"].tolist() == df[df.variant == "full"]["reply"].tolist())
    with pytest.raises(UsageError, match="ranks"):
        rank_curve(toy.path("cp"), cv, [0], PROMPTS, **FAST)


def test_merge_sweep_puts_sources_and_methods_side_by_side(cv):
    alt = ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False)
    df = merge_sweep(toy.path("cp"), {"chat": cv, "chat-alt": alt}, PROMPTS, alphas=[0.5, 1.0],
                     methods=["linear", "ties"], **FAST)
    assert set(df["variant"]) == {"chat", "chat-alt", "linear", "ties"}
    assert set(df["alpha"]) == {0.5, 1.0} and len(df) == 4 * 2 * len(PROMPTS)
    # rows are labelled by the state the model was in: the same replies as that merge swept alone
    summed = compare_variants(toy.path("cp"), {"sum": merge([(cv, 1.0), (alt, 1.0)], "linear")}, [0.5], PROMPTS, **FAST)
    assert df[(df.variant == "linear") & (df.alpha == 0.5)]["reply"].tolist() == summed["reply"].tolist()
    with pytest.raises(UsageError, match="two sources"):
        merge_sweep(toy.path("cp"), {"chat": cv}, PROMPTS, **FAST)
    with pytest.raises(UsageError, match="unknown merge"):
        merge_sweep(toy.path("cp"), {"chat": cv, "alt": alt}, PROMPTS, methods=["average"], **FAST)


def test_cli_atlas_writes_rank_curve_interference_and_merges(tmp_path, cv):
    from chatvec_lab.cli import main as cli
    a, b = tmp_path / "cv", tmp_path / "cv-alt"
    cv.save(a)
    ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False).save(b)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    args = ["atlas", "--target", str(toy.path("cp")), "--vector", str(a), "--prompts", str(prompts), "-o", str(out),
            "--skip-map", "--ranks", "2,8", "--second-vector", str(b), "--max-new-tokens", "4", "-q"]
    assert cli(args) == 0
    written = {p.name for p in out.iterdir()}
    assert {"rank-curve.csv", "rank-summary.csv", "interference.csv", "merges.csv", "merge-summary.csv",
            "interference.png", "merges.png", "rank-curve-rank-alpha1.png"} <= written
    assert "atlas.csv" not in written
    import pandas as pd
    assert set(pd.read_csv(out / "merge-summary.csv")["variant"]) == {"cv", "cv-alt", "linear", "ties", "dare_linear",
                                                                      "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
    assert cli(args) == 2  # the folder exists now: kept unless --overwrite
    nothing = ["atlas", "--target", str(toy.path("cp")), "--vector", str(a), "--prompts", str(prompts),
               "-o", str(tmp_path / "new"), "--skip-map", "-q"]
    assert cli(nothing) == 2 and not (tmp_path / "new").exists()


def _rate(row, name: str) -> str:
    return f"{row[name]:.2f} ({row[name + '_lo']:.2f}–{min(row[name + '_hi'], 1.0):.2f})"


def test_the_docs_rank_and_merge_figures_are_the_shipped_results():
    """Each figure the docs state about ranks and merges (docs/atlas.md, moved there from the README) is read from
    data/ablations-toy (regenerated by the command the page gives): a re-run that changes them fails here until
    the page follows."""
    from pathlib import Path

    import pandas as pd
    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs" / "atlas.md").read_text(encoding="utf-8")
    ranks = pd.read_csv(root / "data" / "ablations-toy" / "rank-summary.csv").set_index(["variant", "alpha"])
    merges = pd.read_csv(root / "data" / "ablations-toy" / "merge-summary.csv").set_index(["variant", "alpha"])
    for variant in ("rank 16", "rank 8", "rank 2", "rank 1", "full"):
        assert _rate(ranks.loc[(variant, 1.0)], "ended_turn") in readme, variant
    for variant, alpha in [("linear", 0.5), ("breadcrumbs_ties", 0.5), ("breadcrumbs", 0.5), ("dare_linear", 0.5),
                           ("dare_ties", 0.5), ("ties", 1.0), ("chat", 1.0), ("chat-alt", 1.0)]:
        assert _rate(merges.loc[(variant, alpha)], "ended_turn") in readme, (variant, alpha)
    # the claims in words: rank 16 within the full vector's interval; the plain mean at least as good as either source
    r16, full = ranks.loc[("rank 16", 1.0)], ranks.loc[("full", 1.0)]
    assert full["ended_turn_lo"] <= r16["ended_turn"] and r16["stored_bytes"] < 0.15 * full["stored_bytes"]
    mean = merges.loc[("linear", 0.5), "ended_turn"]
    assert mean >= merges.loc[("chat", 1.0), "ended_turn"] and mean >= merges.loc[("chat-alt", 1.0), "ended_turn"]
    assert all(mean >= merges.loc[(m, a), "ended_turn"] for m, a in [("ties", 1.0), ("dare_ties", 0.5), ("dare_linear", 0.5)])
    conflicts = pd.read_csv(root / "data" / "ablations-toy" / "interference.csv").set_index(["layer", "module"])
    overall, head, embed = (conflicts.loc[k] for k in [("all", "all"), ("outer", "lm_head"), ("outer", "embed")])
    stated = [f"cosine {overall['cosine']:.2f}", f"opposite signs on {overall['sign_conflict']:.2f}",
              f"{overall['trimmed_conflict']:.2f} of the entries both keep", f"keeps {overall['kept_a']:.2f}",
              f"cosine {head['cosine']:.2f}, trimmed conflict {head['trimmed_conflict']:.3f}",
              f"cosine {embed['cosine']:.2f}, conflict {embed['trimmed_conflict']:.2f}"]
    for text in stated:
        assert text in readme, text


def test_sources_named_like_merge_methods_are_not_replaced(cv):
    with pytest.raises(UsageError, match="merge methods' names"):
        merge_sweep(toy.path("cp"), {"ties": cv, "alt": cv * 0.5}, PROMPTS, methods=["ties"], **FAST)


def test_cli_atlas_checks_the_second_vector_before_any_work(tmp_path, cv, capsys):
    from chatvec_lab.cli import main as cli
    (tmp_path / "ties").mkdir()
    cv.save(tmp_path / "ties" / "v")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    base = ["atlas", "--target", str(toy.path("cp")), "--prompts", str(prompts), "--skip-map", "--ranks", "1",
            "--max-new-tokens", "2", "-q"]
    v = str(tmp_path / "ties" / "v")
    assert cli(base + ["--vector", v, "--second-vector", v, "-o", str(tmp_path / "o1")]) == 2
    assert "twice" in capsys.readouterr().err
    assert cli(base + ["--vector", v, "--second-vector", v + "/", "--density", "1.5", "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "density" in err or "twice" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_alpha_zero_rows_are_the_untouched_target_once():
    """Review round 3 (L2): α = 0 rows were labelled as the first variant and counted once per variant."""
    from chatvec_lab.behaviour.ablations import UNTOUCHED, compare_variants
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    df = compare_variants(toy.path("cp"), {"a": cv, "b": cv * 0.5}, [0.0, 1.0], PROMPTS[:2], seeds=1,
                          max_new_tokens=4, scorers=("language",), progress=False)
    zero = df[df["alpha"] == 0]
    assert set(zero["variant"]) == {UNTOUCHED} and len(zero) == 2
    assert set(df[df["alpha"] == 1]["variant"]) == {"a", "b"}
