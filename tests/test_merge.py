"""Merge methods and low rank as lazy vector operations: equal to the formulas, and to mergekit where it is here."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, apply_to_model, toy
from chatvec_lab.errors import UsageError
from chatvec_lab.core.merge import METHODS, merge
from chatvec_lab.core.transforms import low_rank, magnitude, sign_consensus

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight",
         "lm_head.weight"]


@pytest.fixture(scope="module")
def vectors():
    base = toy.path("base")
    return (ChatVector.from_models(base, toy.path("chat"), hash_files=False),
            ChatVector.from_models(base, toy.path("chat-alt"), hash_files=False))


def _naive_trim(t, density):
    k = max(1, int(density * t.numel()))  # mergekit's rule: a positive density keeps at least one entry
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_trim_keeps_what_argsort_keeps_among_equal_magnitudes(dtype, monkeypatch):
    """The trim sorts |delta| in place, as int32 bits for float32: the same entries as mergekit's
    ``argsort(|delta|, descending=True)[:k]``, bit for bit, on deltas of bfloat16 weights (thousands of equal
    magnitudes at the cut), with the integer keys and without them, and with a NaN (float keys then)."""
    from chatvec_lab.core import transforms

    gen = torch.Generator().manual_seed(7)
    for shape in [(513, 2048), (300_001,), (17,), (3, 1)]:
        a, b = ((torch.randn(shape, generator=gen) * 0.003).to(torch.bfloat16) for _ in range(2))
        delta = (a.float() - b.float()).to(dtype)
        if shape == (300_001,):
            delta[12] = float("nan")
        before = delta.clone()
        for density in (0.5, 0.3, 0.004):
            keep = delta.abs().reshape(-1).argsort(descending=True)[:max(1, int(density * delta.numel()))]
            mask = torch.zeros(delta.numel(), dtype=delta.dtype)
            mask[keep] = 1
            want = delta * mask.view(delta.shape)  # mergekit's magnitude(): a dropped negative entry is -0.0
            got = magnitude(delta, density)
            bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
            assert torch.equal(got.view(bits), want.view(bits)), (shape, density)
            with monkeypatch.context() as m:
                m.setattr(transforms, "_integer_keys_agree", lambda: False)
                assert torch.equal(magnitude(delta, density).view(bits), want.view(bits))
        assert torch.equal(delta.view(bits), before.view(bits))  # the input is untouched


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


# ------------------------------------------------------------------ issue 26: small densities, configs, registry

def test_a_positive_density_keeps_at_least_one_entry_as_mergekit(vectors):
    """A norm vector (192 entries) at density 0.004: int(0.77) = 0 entries, but mergekit keeps max(1, ·) = 1."""
    cv, alt = vectors
    d = cv["model.norm.weight"]
    kept = magnitude(d, 0.004)
    assert int((kept != 0).sum()) == 1 and kept.abs().max() == d.abs().max()
    merged = merge([(cv, 1.0), (alt, 1.0)], method="ties", density=0.004)["model.norm.weight"]
    assert int((merged != 0).sum()) >= 1  # the delta no longer vanishes
    assert torch.equal(magnitude(torch.zeros(0), 0.5), torch.zeros(0))


T = toy.path("base").parent


def _config(method, models, base=True, **extra):
    return {"models": [{"model": str(T / m), "parameters": p} if p else {"model": str(T / m)} for m, p in models],
            "merge_method": method, **({"base_model": str(T / "base")} if base else {}), **extra}


def _weights(folder):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_every_method_is_one_registry_entry_and_runs_on_the_toy(tmp_path):
    from chatvec_lab.core.merge_methods import REGISTRY
    from chatvec_lab.core.model_merge import merge_from_config

    assert set(METHODS) <= set(REGISTRY) and {"task_arithmetic", "slerp", "nuslerp", "model_stock", "della",
                                                "della_linear", "karcher", "multislerp"} <= set(REGISTRY)
    base = _weights(T / "base")
    name = "model.layers.1.mlp.up_proj.weight"
    for method, spec in REGISTRY.items():
        per = {"weight": 0.6} if "weight" in spec.per_source else {}
        n = 1 if spec.max_sources == 1 else 2
        models = [("chat", per), ("chat-alt", per)][:n]
        shared = {"t": 0.3} if "t" in spec.shared else {}
        config = _config(method, models, base=spec.base != "input", parameters=shared, dtype="float32")
        if spec.name == "model_stock":
            config["models"].append({"model": str(T / "cp")})
        out = merge_from_config(config, tmp_path / method)
        merged = _weights(out)
        assert set(merged) == set(base) and merged[name].dtype == torch.float32, method
        assert torch.isfinite(merged[name]).all() and not torch.equal(merged[name], base[name].float()), method


def test_merge_output_is_written_like_apply(tmp_path):
    """Sharded as asked, config and tokenizer beside it, the dtype recorded, refusing to overwrite, loadable."""
    from transformers import AutoModelForCausalLM
    from chatvec_lab.core.model_merge import merge_from_config

    config = _config("ties", [("chat", {"weight": 1.0, "density": 0.5}), ("chat-alt", {"weight": 0.5})],
                     dtype="float32", out_dtype="bfloat16")
    out = merge_from_config(config, tmp_path / "m", max_shard_bytes=1 << 20)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _weights(out).values())
    with pytest.raises(Exception, match="exists"):
        merge_from_config(config, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_gradients_and_filters_resolve_as_mergekit_and_dare_is_seeded(tmp_path):
    from chatvec_lab.core.merge_config import read_config
    from chatvec_lab.core.model_merge import merge_from_config

    config = read_config(_config("task_arithmetic", [
        ("chat", {"weight": [0.0, 1.0]}), ("chat-alt", {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]})]))
    config.num_layers = 4
    assert config.parameters_for("model.layers.0.mlp.up_proj.weight")[1]["weight"] == [0.0, 0.2]
    assert config.parameters_for("model.layers.3.self_attn.q_proj.weight")[1]["weight"] == [1.0, 0.7]
    assert config.parameters_for("model.layers.1.self_attn.q_proj.weight")[1]["weight"][0] == pytest.approx(1 / 3)
    assert config.parameters_for("lm_head.weight")[1]["weight"] == [0.0, 0.7]  # outside the blocks: t = 0
    dare = _config("dare_linear", [("chat", {"weight": 1.0, "density": 0.5}), ("chat-alt", {"weight": 1.0})])
    a, b = merge_from_config(dare, tmp_path / "a", seed=3), merge_from_config(dare, tmp_path / "b", seed=3)
    c = merge_from_config(dare, tmp_path / "c", seed=4)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not torch.equal(wa[NAMES[0]], wc[NAMES[0]])


@pytest.mark.parametrize("config, says", [
    ({"slices": [], "merge_method": "ties"}, "'slices'"),
    ({"models": [{"model": "x"}], "merge_method": "sce"}, "'sce'"),
    ({"models": [{"model": "x"}], "merge_method": "ties", "base_model": "y", "tokenizer_source": "union"}, "union"),
    ({"models": [{"model": "x+lora"}], "merge_method": "linear"}, "LoRA"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "flavour": 2}}], "merge_method": "linear"}, "'flavour'"),
    ({"models": [{"model": "x"}], "merge_method": "ties"}, "base_model"),
    ({"models": [{"model": "x"}], "merge_method": "linear", "chat_template": "chatml"}, "chat_template"),
    ({"models": [{"model": "x"}, {"model": "z"}], "merge_method": "slerp", "base_model": "y"}, "at most 1"),
    ({"models": [{"model": "x"}], "merge_method": "linear", "dtype": "int4"}, "int4"),
])
def test_what_the_lab_lacks_is_named_in_one_line(config, says):
    from chatvec_lab.core.merge_config import read_config

    with pytest.raises(UsageError, match=says) as e:
        read_config(config)
    assert "\n" not in str(e.value)


def test_a_missing_weight_is_named_before_any_tensor_is_written(tmp_path):
    from chatvec_lab.core.model_merge import merge_from_config

    with pytest.raises(UsageError, match="weight"):
        merge_from_config(_config("ties", [("chat", {"density": 0.5})]), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli_merge_with_report(tmp_path, capsys):
    import yaml
    from chatvec_lab.cli import main as cli
    from chatvec_lab.plots import plot_merge_report

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(_config("ties", [("chat", {"weight": 1.0, "density": 0.3}),
                                                    ("chat-alt", {"weight": 1.0, "density": 0.3})], dtype="float32")))
    assert cli(["merge", str(path), "-o", str(tmp_path / "out"), "--report", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "chat-alt:" in printed and "sign conflicts" in printed
    table = pd.read_csv(tmp_path / "out" / "merge_report.csv")
    assert (tmp_path / "out" / "merge_report.png").stat().st_size > 1000
    assert set(table["source"]) == {"chat", "chat-alt"} and len(table) == 2 * (4 + 3)  # 4 blocks, embed/norm/head
    assert table["norm_share"].between(0, 1).all() and (table["resolved"] <= table["conflicts"]).all()
    assert (table["cosine"].abs() > 3 * table["chance"]).all()  # every layer's merge points along both sources
    assert plot_merge_report(table) is not None
    assert cli(["merge", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"slices": [], "merge_method": "ties"}))
    assert cli(["merge", str(path), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'slices'" in err


def test_report_of_a_single_source_task_arithmetic_keeps_it_all(tmp_path):
    from chatvec_lab.analysis.merge_report import MergeReport
    from chatvec_lab.core.model_merge import merge_from_config

    report = MergeReport(["chat"])
    merge_from_config(_config("task_arithmetic", [("chat", {"weight": 1.0})], dtype="float32"), tmp_path / "m",
                      observer=report)
    table = report.table()
    assert list(table["layer"][:4]) == [0, 1, 2, 3]
    assert table["norm_share"].min() > 1 - 1e-9 and table["cosine"].min() > 1 - 1e-9
    assert table["conflicts"].sum() == 0 and set(table["grade"]) == {"aligned"}
