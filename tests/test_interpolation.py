"""The loss along a path between two models (analysis/interpolation.py) and its figures (plots/interpolation.py):
the endpoints are the models' own losses, the line's midpoint is the average of the weights, the sphere is
mergekit's slerp as ``chatvec merge`` writes it, a permutation of MLP units keeps the function, and the norms of
the line and the sphere are what the formulas say."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatvec_lab import toy
from chatvec_lab.analysis.interpolation import (barriers, interpolation_curve, permute_mlp_units, slerp_norms,
                                                token_losses)
from chatvec_lab.behaviour.scoring import perplexity
from chatvec_lab.errors import MismatchError, UsageError
from chatvec_lab.plots import plot_interpolation, plot_slerp_norms

TEXTS = {"de": ["Der Hund läuft schnell über die Wiese und bellt laut.", "Heute regnet es in der ganzen Stadt."],
         "en": ["The dog runs quickly across the meadow and barks.", "It is raining in the whole town today."]}


@pytest.fixture(scope="module")
def models():
    load = lambda m: AutoModelForCausalLM.from_pretrained(toy.path(m), dtype=torch.float32).eval()  # noqa: E731
    return {"chat": load("chat"), "cp": load("cp"), "tok": AutoTokenizer.from_pretrained(toy.path("cp"))}


@pytest.fixture(scope="module")
def curve():
    return interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, ts=[0.5])


def test_the_ends_are_the_models_own_losses_and_the_chord_is_zero_there(curve, models):
    assert sorted(set(curve["t"])) == [0.0, 0.5, 1.0]  # the ends are always measured
    c = curve.set_index(["texts", "t"])
    for lang, texts in TEXTS.items():
        for t, model in ((0.0, models["chat"]), (1.0, models["cp"])):
            assert c.loc[(lang, t), "loss"] == pytest.approx(math.log(perplexity(model, models["tok"], texts)), abs=1e-5)
            assert c.loc[(lang, t), "barrier"] == pytest.approx(0.0, abs=1e-9)
        assert c.loc[(lang, 0.0), "vs_a"] == pytest.approx(0.0, abs=1e-9)
        assert c.loc[(lang, 1.0), "vs_b"] == pytest.approx(0.0, abs=1e-9)
        assert c.loc[(lang, 0.5), "ppl"] == pytest.approx(math.exp(c.loc[(lang, 0.5), "loss"]))
        row = c.loc[(lang, 0.5)]
        for m in ("loss", "vs_a", "vs_b", "barrier"):
            assert row[f"{m}_lo"] < row[m] < row[f"{m}_hi"], (m, row)
        chord = (c.loc[(lang, 0.0), "loss"] + c.loc[(lang, 1.0), "loss"]) / 2
        assert row["barrier"] == pytest.approx(row["loss"] - chord, abs=1e-9)  # token-weighted means: linear
        assert row["vs_a"] == pytest.approx(row["loss"] - c.loc[(lang, 0.0), "loss"], abs=1e-9)
    assert set(curve["pair"]) == {"chat ↔ cp"} and set(curve["path"]) == {"linear"} and (curve["n_texts"] == 2).all()


def test_the_midpoint_is_the_average_of_the_weights(curve, models):
    a, b = models["chat"].state_dict(), models["cp"].state_dict()
    mid = AutoModelForCausalLM.from_pretrained(toy.path("chat"), dtype=torch.float32).eval()
    mid.load_state_dict({k: (a[k] + b[k]) / 2 for k in a})
    c = curve.set_index(["texts", "t"])
    for lang, texts in TEXTS.items():
        assert c.loc[(lang, 0.5), "loss"] == pytest.approx(math.log(perplexity(mid, models["tok"], texts)), abs=1e-4)


def test_the_sphere_is_what_chatvec_merge_writes_for_slerp(tmp_path, models):
    from chatvec_lab.core.model_merge import merge_from_config

    out = merge_from_config({"merge_method": "slerp", "base_model": str(toy.path("chat")),
                             "models": [{"model": str(toy.path("cp"))}], "parameters": {"t": 0.3},
                             "dtype": "float32"}, tmp_path / "slerp")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sphere = interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS["de"], ts=[0.3], path="slerp")
    assert set(sphere["texts"]) == {"texts"}
    at = sphere.set_index("t").loc[0.3, "loss"]
    assert at == pytest.approx(math.log(perplexity(merged, models["tok"], TEXTS["de"])), abs=1e-5)


def test_device_and_dtype_choose_where_and_in_which_precision_the_path_is_measured(curve, models):
    chat = models["chat"]
    before = {k: v.clone() for k, v in chat.state_dict().items()}
    half = interpolation_curve(chat, toy.path("cp"), TEXTS, ts=[0.5], tokenizer=models["tok"], device="cpu",
                               dtype="bfloat16").set_index(["texts", "t"])
    full = curve.set_index(["texts", "t"])
    bf16 = AutoModelForCausalLM.from_pretrained(toy.path("cp"), dtype=torch.bfloat16).eval()
    for lang, texts in TEXTS.items():
        assert half.loc[(lang, 0.0), "loss"] != full.loc[(lang, 0.0), "loss"]  # measured in bfloat16 …
        assert half.loc[(lang, 0.5), "loss"] == pytest.approx(full.loc[(lang, 0.5), "loss"], abs=0.05)  # … close
        assert half.loc[(lang, 1.0), "loss"] == pytest.approx(token_losses(bf16, models["tok"], texts)[0].mean(), abs=1e-9)
    assert next(chat.parameters()).dtype == torch.float32  # the module given is not changed
    assert all(torch.equal(before[k], v) for k, v in chat.state_dict().items())
    auto = interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, ts=[0.5], dtype="auto")  # the toy's own
    assert np.allclose(auto.set_index(["texts", "t"])["loss"], half["loss"], atol=1e-6)  # bfloat16 checkpoints
    with pytest.raises(UsageError, match="dtype"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, dtype="float8")
    with pytest.raises(UsageError, match="device"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, device="tpu")


def test_barriers_reads_the_inner_points_only():
    rows = [{"pair": "p", "path": "linear", "texts": "en", "t": t, "barrier": b, "barrier_lo": b - 0.1,
             "barrier_hi": b + 0.1, "loss": 1.0, "ppl": math.e} for t, b in ((0.0, 0.0), (0.5, 0.3), (0.7, 0.05), (1.0, 0.0))]
    rows += [{**r, "pair": "q", "barrier": -abs(r["barrier"]) - (0.2 if 0 < r["t"] < 1 else 0)} for r in rows]
    table = barriers(pd.concat([pd.DataFrame(rows[:4]), pd.DataFrame(rows[4:])]))  # a concatenation: a repeated index
    top = table.set_index("pair")
    assert top.loc["p", "t"] == 0.5 and top.loc["p", "above_zero"]
    assert 0 < top.loc["q", "t"] < 1 and top.loc["q", "barrier"] < 0  # below the chord: the highest inner point
    assert list(table.columns[:4]) == ["pair", "path", "texts", "t"]


def test_permuting_mlp_units_keeps_the_function_and_leaves_the_model_alone(models):
    chat = models["chat"]
    before = {k: v.clone() for k, v in chat.state_dict().items()}
    permuted = permute_mlp_units(chat, seed=3)
    ids = models["tok"](TEXTS["en"][0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(chat(ids).logits, permuted(ids).logits, atol=1e-4)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(permuted.state_dict()[name], chat.state_dict()[name])
    assert all(torch.equal(before[k], v) for k, v in chat.state_dict().items())  # the input is not modified
    with pytest.raises(UsageError, match="Llama-style"):
        permute_mlp_units(torch.nn.Linear(2, 2))


def test_a_permuted_copy_shows_a_barrier(models):
    from chatvec_lab.toy.evaluate import heldout_texts

    chat = models["chat"]  # over 15 texts (two give a t interval with one degree of freedom: too wide to tell)
    curve = interpolation_curve(chat, permute_mlp_units(chat, seed=0), heldout_texts()["en"], ts=[0.5],
                                tokenizer=models["tok"], pair="perm")
    row = barriers(curve).iloc[0]
    assert row["t"] == 0.5 and row["above_zero"] and row["barrier"] > 1


def test_token_losses_count_the_predicted_tokens(models):
    losses, owners = token_losses(models["cp"], models["tok"], ["x", *TEXTS["en"]])
    lengths = [len(models["tok"](t, add_special_tokens=False)["input_ids"]) for t in TEXTS["en"]]
    assert len(losses) == sum(n - 1 for n in lengths) and set(owners.tolist()) == {1, 2}  # "x" is one token: left out
    assert np.isfinite(losses).all() and (losses > 0).all()


def test_bad_inputs_get_one_clear_error(models):
    with pytest.raises(UsageError, match="path must be"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, path="cubic")
    with pytest.raises(UsageError, match="ts must be"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, ts=["half"])
    with pytest.raises(UsageError, match="ts must be"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), TEXTS, ts=[float("nan")])
    with pytest.raises(UsageError, match="non-empty list"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), {"de": []})
    with pytest.raises(UsageError, match="a list of strings"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), "one string")
    with pytest.raises(UsageError, match="folder, a hub id or a torch module"):
        interpolation_curve(3, toy.path("cp"), TEXTS, tokenizer=models["tok"])
    with pytest.raises(MismatchError, match="one architecture"):
        interpolation_curve(toy.path("cp"), toy.path("cp-xvocab"), TEXTS)
    with pytest.raises(UsageError, match="two tokens"):
        interpolation_curve(toy.path("chat"), toy.path("cp"), ["x"])


def test_slerp_norms_follow_the_formulas():
    a = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "p": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([[0.0, 3.0], [0.0, 0.0]]), "p": torch.tensor([2.0, 4.0, 6.0])}
    table = slerp_norms(a, b, t=0.5).set_index("tensor")
    w, p = table.loc["w"], table.loc["p"]
    assert w["cosine"] == pytest.approx(0.0) and not w["linear"]
    assert w["lerp_ratio"] == pytest.approx(1 / math.sqrt(2)) and w["slerp_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert p["cosine"] == pytest.approx(1.0) and p["linear"]  # parallel: mergekit takes the line
    assert p["lerp_ratio"] == pytest.approx(1.0) and p["slerp_ratio"] == pytest.approx(1.0)
    third = slerp_norms(a, b, t=0.25).set_index("tensor").loc["w"]  # orthogonal, equal norms: cos²+sin² of angles
    assert third["slerp_norm"] == pytest.approx(3.0, abs=1e-5)
    assert third["lerp_norm"] == pytest.approx(3.0 * math.hypot(0.75, 0.25))
    with pytest.raises(MismatchError):
        slerp_norms(a, {"w": b["w"]})


def test_slerp_norms_take_vectors_and_models():
    from chatvec_lab import ChatVector

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    lv = ChatVector.from_models(toy.path("base"), toy.path("cp"))
    on_vectors = slerp_norms(cv, lv)
    on_weights = slerp_norms(toy.path("chat"), toy.path("cp"))
    assert len(on_vectors) == len(on_weights) == len(cv.names)
    assert on_vectors["lerp_ratio"].median() < 0.8 < on_weights["lerp_ratio"].min()  # deltas point apart, weights not
    assert (on_weights["slerp_ratio"] - 1).abs().max() < 1e-3


def test_the_figures_draw_from_small_tables(curve):
    fig = plot_interpolation(curve, texts="de")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and ax.get_legend() is not None  # the loss and its chord
    fig = plot_interpolation(curve, metric="barrier")
    assert len(fig.axes[0].lines) == 3  # one per text set and the zero line
    with pytest.raises(UsageError):
        plot_interpolation(curve, metric="accuracy")
    with pytest.raises(UsageError):
        plot_interpolation(curve, texts="fr")
    table = slerp_norms({"w": torch.ones(3), "v": torch.tensor([1.0, 0, 0])},
                        {"w": torch.ones(3) * 2, "v": torch.tensor([0.0, 1, 0])})
    fig = plot_slerp_norms(table)
    assert len(fig.axes[0].lines) == 4  # the 1-line, the line's points, the sphere's, the ring of the linear tensor
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["w", "v"]
