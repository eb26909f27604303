"""The ablation atlas: the right weights in each cell, references, norm matching, summaries, the CLI."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.behaviour.atlas import (Cell, cell_coefficient, atlas, cell_norms, cell_of, cells_of, heatmap_table,
                               norm_matched_alpha, rank_cells, summarize_atlas)
from chatvec_lab.errors import UsageError
from chatvec_lab.core.live import LiveModel
from chatvec_lab.io.naming import parse

PROMPTS = ["Erzähl mir etwas über die Liebe.", "Du bist ein Idiot."]


@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)


def test_cells_cover_the_vector_once(cv):
    cells = cells_of(cv)
    assert len(cells) == 4 * 7 + 3  # 4 layers × 7 module kinds, embeddings, lm_head, norms
    assert cells[0] == Cell("layer 0", "attn_q") and cells[-3:] == [Cell(r, "all") for r in ("embeddings", "lm_head", "norms")]
    owners = [cell_of(parse(n)) for n in cv.names]
    assert set(owners) == set(cells)
    assert cell_of(parse("model.layers.2.input_layernorm.weight")) == Cell("norms", "all")


def test_each_design_changes_exactly_its_cell(cv):
    model, _ = toy.load("cp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    live = LiveModel(model, {"v": cv})
    cell = Cell("layer 2", "mlp_up")
    live.set(v=cell_coefficient(cell, "keep-only", 0.7))
    params = dict(model.named_parameters())
    for name in cv.names:
        inside = cell_of(parse(name)) == cell
        expected = before[name] + (0.7 * cv[name] if inside else 0)
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-7)
    assert live.rewritten == 1
    # the next cell rewrites the two cells involved only, not the model
    live.set(v=cell_coefficient(Cell("layer 3", "attn_q"), "keep-only", 0.7))
    assert live.rewritten == 2
    live.set(v=cell_coefficient(cell, "knock-out", 1.0))
    for name in cv.names:
        inside = cell_of(parse(name)) == cell
        torch.testing.assert_close(params[name].detach(), before[name] + (0 if inside else cv[name]), rtol=0, atol=1e-7)
    live.reset()
    assert all(torch.equal(params[n].detach(), before[n]) for n in cv.names)


def test_norm_matched_alpha_gives_the_cell_the_full_vectors_relative_change(cv):
    model, _ = toy.load("cp")
    state = dict(model.state_dict())
    norms = cell_norms(cv, state)
    assert math.isclose(norms["norm_share"].sum(), 1.0, rel_tol=1e-9)
    full = math.sqrt(norms["vector_sq"].sum() / norms["target_sq"].sum())
    cell = Cell("layer 1", "attn_k")
    a = norm_matched_alpha(norms, cell, "keep-only")
    names = [n for n in cv.names if cell_of(parse(n)) == cell]
    v = math.sqrt(sum(float(cv[n].double().pow(2).sum()) for n in names))
    t = math.sqrt(sum(float(state[n].double().pow(2).sum()) for n in names))
    assert math.isclose(a * v / t, full, rel_tol=1e-9)
    assert 0.5 < norm_matched_alpha(norms, cell, "knock-out") < 2  # the rest is nearly the whole vector


def test_atlas_table_summary_ranking_and_heatmap(cv):
    cells = [Cell("layer 0", "mlp_down"), Cell("lm_head", "all")]
    df = atlas(toy.path("cp"), cv, PROMPTS, alphas=(1.0,), cells=cells, max_new_tokens=6, progress=False)
    # target + full + 2 cells × 2 designs × (1 grid α + the matched α), one seed, 2 prompts each
    assert len(df) == (1 + 1 + 2 * 2 * 2) * 2
    assert set(df["design"]) == {"target", "full", "keep-only", "knock-out"}
    assert set(df["alpha_kind"]) == {"grid", "norm-matched"}
    assert df.loc[df["design"] == "target", "alpha"].eq(0).all()
    s = summarize_atlas(df)
    assert {"ended_turn", "ended_turn_lo", "ended_turn_hi", "ended_turn_effect", "share_de_effect"} <= set(s.columns)
    keep = s[(s["design"] == "keep-only")]
    target_rate = float(s.loc[s["design"] == "target", "ended_turn"].iloc[0])
    assert (keep["ended_turn_effect"] == keep["ended_turn"] - target_rate).all()
    ranking = rank_cells(s, design="keep-only", alpha_kind="grid")
    assert len(ranking) == 2 and ranking["effect_per_norm"].is_monotonic_decreasing
    table = heatmap_table(s, "ended_turn", "keep-only", "grid", 1.0)
    assert list(table.index) == ["layer 0", "lm_head"] and "mlp_down" in table.columns and "all" in table.columns
    from chatvec_lab.plots import plot_atlas
    fig = plot_atlas(s, "ended_turn", "keep-only", "grid", alpha=1.0)
    assert fig.axes and "keep-only" in fig.axes[0].get_title()


def test_atlas_refuses_bad_input(cv):
    with pytest.raises(UsageError):
        atlas(toy.path("cp"), cv, [], progress=False)
    with pytest.raises(UsageError, match="design"):
        atlas(toy.path("cp"), cv, PROMPTS, designs=("keep-some",), progress=False)


def test_cli_atlas_writes_its_folder_and_refuses_to_overwrite(cv, tmp_path):
    from chatvec_lab.cli import main

    vec = tmp_path / "cv"
    cv.save(vec)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "atlas"
    args = ["atlas", "--target", str(toy.path("cp")), "--vector", str(vec), "--prompts", str(prompts), "-o", str(out),
            "--max-new-tokens", "3", "--quick", "-q"]
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"atlas.csv", "summary.csv", "ranking-keep-only.csv", "atlas-keep-only-ended_turn.png"} <= names
    assert len(pd.read_csv(out / "summary.csv")) == 2 + 31 * 2 * 2
    assert main(args) == 2  # exists: refused, one line


def test_live_model_rewrites_a_tensor_someone_else_wrote_to(cv):
    model, _ = toy.load("cp")
    name = "model.layers.0.mlp.up_proj.weight"
    param = dict(model.named_parameters())[name]
    before = param.detach().clone()
    live = LiveModel(model, {"v": cv})
    with torch.no_grad():
        param.add_(1.0)  # behind the live model's back
    live.reset()
    assert torch.equal(param.detach(), before)  # back to the target, bit for bit
    live.set(v=1.0)
    model.load_state_dict({name: before}, strict=False)  # another write it did not make
    live.set(v=1.0)
    torch.testing.assert_close(param.detach(), before + cv[name], rtol=0, atol=1e-7)


def test_bad_coefficient_rules_are_usage_errors(cv):
    from chatvec_lab.core.apply import coefficient_for
    info = parse("model.layers.0.mlp.up_proj.weight")
    for bad in ({"[": 1.0}, {".": "x"}, {".": float("nan")}, lambda i: float("inf")):
        with pytest.raises(UsageError):
            coefficient_for(info, bad)
    with pytest.raises(UsageError, match="method"):
        cv.low_rank(4, method="svd")


@pytest.mark.parametrize("seeds", [10**20, 0, -1, 2.5, "3", True, [0, 0]])
def test_atlas_refuses_bad_seeds_before_any_work(seeds):
    """Review round 3 (L3): atlas(seeds=10**20) through the API ate memory; 2.5 / "3" gave bare TypeErrors."""
    from chatvec_lab import ChatVector, toy
    from chatvec_lab.errors import UsageError
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    with pytest.raises(UsageError, match="seed"):
        atlas(toy.path("cp"), cv, ["Hallo"], seeds=seeds, progress=False)


def test_norm_matched_effects_have_their_reference_without_alpha_one():
    """Review round 3 (D6): `--alphas 0.5` made every norm-matched effect NaN, exit 0."""
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    cell = cells_of(cv)[0]
    df = atlas(toy.path("cp"), cv, ["Hallo, wie geht es?"], alphas=(0.5,), cells=[cell], designs=("knock-out",),
               max_new_tokens=4, scorers=("language",), progress=False)
    s = summarize_atlas(df)
    matched = s[s["alpha_kind"] == "norm-matched"]
    assert len(matched) and matched["ended_turn_effect"].notna().all()
