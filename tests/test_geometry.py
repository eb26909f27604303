"""Vector geometry against constructed vectors with known answers; naming on real architectures; plots."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

from chatvec_lab import ChatVector, plots

from chatvec_lab.analysis import geometry
from chatvec_lab.io.naming import parse
from conftest import new_model


def _vecs(seed=0):
    g = torch.Generator().manual_seed(seed)
    names = {f"model.layers.{i}.self_attn.q_proj.weight": (8, 8) for i in range(3)}
    names |= {f"model.layers.{i}.mlp.up_proj.weight": (16, 8) for i in range(3)}
    names["model.embed_tokens.weight"] = (20, 8)
    return {n: torch.randn(s, generator=g) for n, s in names.items()}


def test_cosine_of_scaled_and_orthogonal_vectors():
    v = _vecs()
    a = ChatVector.from_tensors(v)
    stats = geometry.vector_stats({"v": a, "2v": 2 * a, "-v": -a})
    cos = geometry.cosine_matrix(stats)
    assert cos.loc["v", "2v"] == pytest.approx(1.0, abs=1e-6)
    assert cos.loc["v", "-v"] == pytest.approx(-1.0, abs=1e-6)
    assert list(cos.index) == list(cos.columns) == ["v", "2v", "-v"]
    # orthogonal: disjoint supports
    x = {n: torch.zeros_like(t) for n, t in v.items()}
    y = {n: torch.zeros_like(t) for n, t in v.items()}
    for n, t in v.items():
        if "q_proj" in n:
            x[n] = t
        else:
            y[n] = t
    s2 = geometry.vector_stats({"x": ChatVector.from_tensors(x), "y": ChatVector.from_tensors(y)})
    assert geometry.cosine_matrix(s2).loc["x", "y"] == pytest.approx(0.0, abs=1e-9)
    assert "orthogonal" in geometry.aligned(s2, "x", "y")["verdict"]
    assert "aligned" in geometry.aligned(stats, "v", "2v")["verdict"]


def test_norms_match_numpy_and_relative_norms():
    v = _vecs()
    base = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(7)) for n, t in v.items()}
    stats = geometry.vector_stats({"v": ChatVector.from_tensors(v)}, base=base)
    for _, row in stats.tensors.iterrows():
        arr = v[row["name"]].numpy().astype(np.float64)
        assert row["norm"] == pytest.approx(np.linalg.norm(arr), rel=1e-6)
        assert row["rel_norm"] == pytest.approx(np.linalg.norm(arr) / np.linalg.norm(base[row["name"]].numpy()), rel=1e-6)
        assert row["kurtosis"] == pytest.approx(((arr - arr.mean()) ** 4).mean() / arr.var() ** 2 - 3, rel=1e-5)
    per_layer = geometry.layer_norms(stats)
    expected0 = math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in v.items() if ".layers.0." in n))
    assert per_layer.loc[0, "v"] == pytest.approx(expected0, rel=1e-6)
    assert "-" in per_layer.index  # embeddings sit outside the layers
    top = geometry.top_layers(stats, "v", n=2)
    assert len(top) == 2 and top["norm"].is_monotonic_decreasing
    by_module = geometry.norms_by(stats, "module")
    assert set(by_module["module"]) == {"attn_q", "mlp_up", "embed"}


def test_sign_agreement_known_values():
    v = _vecs()
    a = ChatVector.from_tensors(v)
    flipped = {n: t.clone() for n, t in v.items()}
    for n in flipped:
        flat = flipped[n].view(-1)
        flat[: flat.numel() // 4] *= -1  # a quarter of the signs flipped
    stats = geometry.vector_stats({"a": a, "same": 3 * a, "neg": -a, "q": ChatVector.from_tensors(flipped)})
    sa = geometry.sign_agreement(stats, by=None).set_index("pair")["sign_agreement"]
    assert sa["a · same"] == pytest.approx(1.0)
    assert sa["a · neg"] == pytest.approx(0.0)
    total = sum(t.numel() for t in v.values())
    flipped_count = sum(t.numel() // 4 for t in v.values())
    assert sa["a · q"] == pytest.approx(1 - flipped_count / total)
    by_layer = geometry.sign_agreement(stats, "layer")
    assert set(by_layer["layer"].dropna()) == {0, 1, 2}


def test_spectrum_of_planted_rank_two():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 2, generator=g))
    w, _ = torch.linalg.qr(torch.randn(200, 2, generator=g))
    low = u @ torch.diag(torch.tensor([5.0, 4.0])) @ w.T
    s = geometry.singular_values(low, k=10)
    assert s[0] == pytest.approx(5.0, rel=1e-4) and s[1] == pytest.approx(4.0, rel=1e-4)
    assert geometry.effective_rank(s) == pytest.approx(2.0, abs=0.05)
    big = torch.nn.functional.pad(low, (0, 600, 0, 500))  # 800 × 800: randomized path
    s_big = geometry.singular_values(big, k=8, method="auto")
    assert s_big[0] == pytest.approx(5.0, rel=1e-3) and s_big[2] < 1e-3
    vec = ChatVector.from_tensors({"model.layers.0.mlp.up_proj.weight": low, "model.norm.weight": torch.ones(4)})
    df = geometry.spectra(vec, k=8)
    assert len(df) == 1 and df["effective_rank"].iloc[0] == pytest.approx(2.0, abs=0.05)
    assert df["energy_top8"].iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_distribution_summary():
    stats = geometry.vector_stats({"v": ChatVector.from_tensors(_vecs())})
    dist = geometry.distribution(stats)
    assert set(dist["module"]) == {"attn_q", "mlp_up", "embed"}
    assert {"q0.01", "q0.5", "q0.99", "kurtosis", "std"} <= set(dist.columns)
    assert (dist["q0.01"] < dist["q0.5"]).all() and (dist["q0.5"] < dist["q0.99"]).all()


EXPECTED_MODULES = {
    "llama": {"model.layers.1.self_attn.q_proj.weight": (1, "attn_q"), "model.layers.0.mlp.gate_proj.weight": (0, "mlp_gate"),
              "model.layers.1.mlp.down_proj.weight": (1, "mlp_down"), "model.embed_tokens.weight": (None, "embed"),
              "lm_head.weight": (None, "lm_head"), "model.norm.weight": (None, "final_norm"),
              "model.layers.0.input_layernorm.weight": (0, "norm")},
    "mistral": {"model.layers.0.self_attn.k_proj.weight": (0, "attn_k"), "model.layers.1.self_attn.o_proj.weight": (1, "attn_o")},
    "qwen2": {"model.layers.0.self_attn.q_proj.bias": (0, "attn_q"), "model.layers.1.mlp.up_proj.weight": (1, "mlp_up")},
    "gemma": {"model.layers.1.self_attn.v_proj.weight": (1, "attn_v"), "model.layers.0.post_attention_layernorm.weight": (0, "norm")},
    "gpt2": {"transformer.h.1.attn.c_attn.weight": (1, "attn_qkv"), "transformer.h.0.attn.c_proj.weight": (0, "attn_o"),
             "transformer.h.0.mlp.c_fc.weight": (0, "mlp_up"), "transformer.h.1.mlp.c_proj.bias": (1, "mlp_down"),
             "transformer.wte.weight": (None, "embed"), "transformer.wpe.weight": (None, "pos_embed"),
             "transformer.ln_f.weight": (None, "final_norm"), "transformer.h.0.ln_1.weight": (0, "norm")},
    "gpt_neox": {"gpt_neox.layers.0.attention.query_key_value.weight": (0, "attn_qkv"),
                 "gpt_neox.layers.1.attention.dense.weight": (1, "attn_o"),
                 "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (0, "mlp_up"),
                 "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (0, "mlp_down"),
                 "gpt_neox.embed_in.weight": (None, "embed"), "lm_head.weight": (None, "lm_head"),
                 "gpt_neox.final_layer_norm.weight": (None, "final_norm")},
    "phi3": {"model.layers.0.self_attn.qkv_proj.weight": (0, "attn_qkv"), "model.layers.1.mlp.gate_up_proj.weight": (1, "mlp_gate_up")},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_MODULES))
def test_naming_on_real_tensor_names(arch):
    names = set(new_model(arch).state_dict())
    for name, (layer, module) in EXPECTED_MODULES[arch].items():
        assert name in names, f"{arch} has no {name}"
        info = parse(name)
        assert (info.layer, info.module) == (layer, module), name
    # every per-layer tensor gets its layer, and nothing is left unlabelled
    for name in names:
        info = parse(name)
        if ".layers." in name or ".h." in name:
            assert info.layer is not None, name
        assert info.module != "other", name


def test_naming_fallback_for_unknown_models():
    info = parse("encoder.blocks.7.weird_thing.weight")
    assert info.layer == 7 and info.module == "other"
    assert parse("foo.12.bar").layer == 12
    # names as older checkpoints on the hub spell them (Pythia's embed_out, GPT-2 without a prefix)
    assert parse("embed_out.weight").module == "lm_head"
    assert (parse("h.3.attn.c_attn.weight").layer, parse("h.3.attn.c_attn.weight").module) == (3, "attn_qkv")


def test_plots_have_titles_and_labels(tmp_path):
    import matplotlib.pyplot as plt

    v = _vecs()
    base = {n: torch.randn(t.shape) for n, t in v.items()}
    a = ChatVector.from_tensors(v)
    b = ChatVector.from_tensors({n: t + torch.randn(t.shape) for n, t in v.items()})
    stats = geometry.vector_stats({"a": a, "b": b}, base=base)
    figs = {
        "norms": plots.plot_layer_norms(stats, "a"),
        "heat": plots.plot_relative_norms_heatmap(stats, "a"),
        "cos": plots.plot_cosine_matrix(geometry.cosine_matrix(stats)),
        "layercos": plots.plot_layer_cosine(stats),
        "spectra": plots.plot_spectra(geometry.spectra(a)),
        "signs": plots.plot_sign_agreement(stats),
    }
    for key, fig in figs.items():
        ax = fig.axes[0]
        assert ax.get_title(), key
        assert ax.get_xlabel() and ax.get_ylabel(), key
        fig.savefig(tmp_path / f"{key}.png")
    assert [t.get_text() for t in figs["cos"].axes[0].get_xticklabels()] == ["a", "b"]
    assert len(figs["norms"].axes[0].get_lines()) == 2  # attn_q and mlp_up
    assert {t.get_text() for t in figs["heat"].axes[0].get_xticklabels()} == {"attn_q", "mlp_up"}
    _, ax = plt.subplots()
    assert plots.plot_layer_norms(stats, "b", ax=ax) is ax.figure  # draws into a given axes
    plt.close("all")


_MEMORY_SCRIPT = """
import resource, sys, torch
from chatvec_lab import ChatVector

from chatvec_lab.analysis import geometry
n_tensors, shape = int(sys.argv[1]), (1024, 1024)

class Lazy:  # a term that makes each tensor on demand, like a file-backed vector
    description = "generated"
    def raw(self, name):
        return torch.full(shape, float(int(name.split(".")[2]) + 1))
    @staticmethod
    def block(raw, index):
        return raw[index].clone()

def vectors(n):
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": shape for i in range(n)}
    return {"a": ChatVector([(1.0, Lazy())], shapes, {}), "b": ChatVector([(2.0, Lazy())], shapes, {})}

geometry.vector_stats(vectors(2), sample=64)  # imports, kernel load, first buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
stats = geometry.vector_stats(vectors(n_tensors), sample=64)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert abs(geometry.cosine_matrix(stats).loc["a", "b"] - 1.0) < 1e-9
print(after - before)
"""


def test_streaming_memory_is_bounded():
    """Two 160 MiB vectors are measured while the process's peak RSS grows by a small fraction of that.

    Measured in a fresh process (RSS sees torch's buffers, which tracemalloc does not); keeping every
    block, or one vector's tensors, would grow it by at least 160 MiB."""
    import subprocess
    import sys

    n_tensors = 40
    total = 2 * n_tensors * 1024 * 1024 * 4
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n_tensors)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    assert growth < total / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB measuring {total / 2**20:.0f} MiB of vectors"


def test_compare_cli(tmp_path, family_factory, capsys):
    from chatvec_lab.cli import main

    fam = family_factory("llama")
    ChatVector.from_models(fam["base"], fam["chat"]).save(tmp_path / "chat")
    ChatVector.from_models(fam["base"], fam["cp"]).save(tmp_path / "cp")
    rc = main(["compare", str(tmp_path / "chat"), str(tmp_path / "cp"), "--csv-matrix", str(tmp_path / "cos.csv"),
               "--plots", str(tmp_path / "plots"), "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "norm of each vector by layer" in out
    import pandas as pd
    cos = pd.read_csv(tmp_path / "cos.csv", index_col=0)
    assert list(cos.index) == list(cos.columns) == ["chat", "cp"]
    assert cos.loc["chat", "chat"] == pytest.approx(1.0)
    assert (tmp_path / "plots" / "cosine_matrix.png").is_file()


def _exact_sum(terms: np.ndarray) -> tuple[float, float]:
    """The exactly rounded sum of float64 terms, and the bound on any summation order's error:
    (n − 1)·2⁻⁵³·Σ|terms| (each float32 value, square and product is exact in float64)."""
    terms = terms.astype(np.float64)
    return math.fsum(terms), max(terms.size - 1, 1) * 2.0 ** -53 * float(np.abs(terms).sum())


def _assert_sum(got: float, terms: np.ndarray, what: str) -> None:
    exact, bound = _exact_sum(terms)
    assert abs(got - exact) <= bound, f"{what}: {got!r} vs exact {exact!r}, error {abs(got - exact):.3g} > bound {bound:.3g}"


def _kernel_inputs(count: int, sub_block: int, conditioning: str) -> list[np.ndarray]:
    g = np.random.default_rng(count)
    n = 3 * sub_block + 17  # several sub-blocks and a ragged end
    arrays = [g.standard_normal(n).astype(np.float32) * np.float32(10.0 ** -k) for k in range(count)]
    for k, a in enumerate(arrays):
        a[k::5] = 0.0
        a[k + 1::7] = -0.0  # a negative zero is no sign
    if conditioning == "ill":  # Σ|x| thousands of times |Σx|: halves that nearly cancel, as in the failure
        for a in arrays:
            half = n // 2
            a[half:2 * half] = -a[:half] * np.float32(1 + 1e-6)
    return arrays


@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("use_numba", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_block_kernel_matches_numpy(monkeypatch, use_numba, count, conditioning):
    """Sums within the rounding bound of any summation order (so on any CPU); extremes and counts exact."""
    from chatvec_lab.core import kernels

    monkeypatch.setattr(kernels, "USE_NUMBA", use_numba)
    arrays = _kernel_inputs(count, kernels._SUB_BLOCK, conditioning)
    per_vector, per_pair = kernels.block_stats([torch.from_numpy(a) for a in arrays])
    x = [a.astype(np.float64) for a in arrays]
    for k, v in enumerate(x):
        _assert_sum(per_vector[k, 0], v, f"Σx of vector {k}")
        _assert_sum(per_vector[k, 1], v * v, f"Σx² of vector {k}")
        assert per_vector[k, 2] == np.abs(v).max()  # the largest |x| is exact
    for p, (i, j) in enumerate(itertools.combinations(range(count), 2)):
        a, b = arrays[i], arrays[j]
        _assert_sum(per_pair[p, 0], x[i] * x[j], f"dot of {i}, {j}")
        assert per_pair[p, 1] == int(((a > 0) & (b > 0) | (a < 0) & (b < 0)).sum())  # sign counts are exact
        assert per_pair[p, 2] == int(((a != 0) & (b != 0)).sum())
    if conditioning == "ill":
        assert np.abs(x[0]).sum() > 1000 * abs(x[0].sum())  # the case really is ill-conditioned
    arrays[0][5] = np.nan
    arrays[-1][9] = -np.inf
    per_vector, _ = kernels.block_stats([torch.from_numpy(a) for a in arrays])
    assert per_vector[0, 2] == per_vector[-1, 2] == math.inf  # non-finite values are reported
    with pytest.raises(ValueError, match="differ in length"):
        kernels.block_stats([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(TypeError, match="float32"):
        kernels.block_stats([torch.zeros(3, dtype=torch.float64)])


def test_the_error_bound_catches_a_lost_value():
    """The tolerance above is tight enough to see one value left out of a sum."""
    arrays = _kernel_inputs(1, 8192, "ill")
    v = arrays[0].astype(np.float64)
    exact, bound = _exact_sum(v)
    smallest_nonzero = np.abs(v[v != 0]).min()
    assert bound < smallest_nonzero / 10


def _cpu_targets() -> list[str]:
    """numba CPU names this machine can run: generic always, wider SIMD where the CPU has it."""
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    targets = ["generic"]
    if {"avx2", "fma", "bmi2"} <= flags:
        targets.append("haswell")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        targets.append("skylake-avx512")
    return targets


@pytest.mark.slow
@pytest.mark.parametrize("target", ["generic", "haswell", "skylake-avx512"])
def test_block_kernel_on_other_simd_widths(target):
    """The numba kernel compiled for another SIMD width sums in another order: the same bounds hold."""
    import subprocess
    import sys
    from pathlib import Path

    if target not in _cpu_targets():
        pytest.skip(f"this CPU cannot run numba's {target!r} target")
    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"} | {"NUMBA_CPU_NAME": target}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_geometry.py"),
                           "-k", "test_block_kernel_matches_numpy and numba"], env=env, cwd=here.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "8 passed" in done.stdout, done.stdout[-2000:]  # 4 vector counts × 2 conditionings


@pytest.mark.parametrize("use_numba", [True, False], ids=["numba", "torch"])
def test_stats_of_saved_vectors_equal_in_memory_ones(tmp_path, monkeypatch, use_numba):
    """Saved float32 vectors are read block by block (ahead, across tensors); the numbers don't change."""
    from chatvec_lab.core import kernels
    from chatvec_lab.errors import NonFiniteError

    monkeypatch.setattr(kernels, "USE_NUMBA", use_numba)
    monkeypatch.setattr(geometry, "STATS_CHUNK", 40)  # many blocks per tensor
    v = _vecs()
    w = {n: t * 0.5 + torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) for n, t in v.items()}
    ChatVector.from_tensors(v).save(tmp_path / "v")
    ChatVector.from_tensors(w).save(tmp_path / "w")
    saved = geometry.vector_stats({"v": ChatVector.load(tmp_path / "v"), "w": ChatVector.load(tmp_path / "w")})
    memory = geometry.vector_stats({"v": ChatVector.from_tensors(v), "w": ChatVector.from_tensors(w)})
    cols = ["norm", "mean", "std", "max_abs"]
    np.testing.assert_allclose(saved.tensors[cols].to_numpy(), memory.tensors[cols].to_numpy(), rtol=1e-6)
    assert saved.pairs[["sign_agree", "sign_total"]].equals(memory.pairs[["sign_agree", "sign_total"]])
    np.testing.assert_allclose(saved.pairs["dot"], memory.pairs["dot"], rtol=1e-6)
    for name, t in v.items():  # against a direct computation, tensor by tensor
        row = saved.pairs.set_index("name").loc[name]
        assert row["dot"] == pytest.approx(float((t.double() * w[name].double()).sum()), rel=1e-6)
        assert row["sign_agree"] == int((torch.sign(t) == torch.sign(w[name])).sum())
    np.testing.assert_array_equal(saved.samples["v"]["attn_q"], memory.samples["v"]["attn_q"])
    bad = dict(v)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="layers.1.mlp.up_proj"):
        geometry.vector_stats({"v": ChatVector.from_tensors(v), "bad": ChatVector.from_tensors(bad)})


def _tidy_case():
    """Three small vectors (one a scaled copy, one with zeros) and a base, as plain tensors."""
    g = torch.Generator().manual_seed(11)
    shapes = {"model.embed_tokens.weight": (12, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.1.mlp.down_proj.weight": (4, 6), "model.norm.weight": (4,)}
    a = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    b = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    b["model.layers.0.self_attn.q_proj.weight"][:2] = 0.0  # zeros: no sign, fewer coordinates compared
    c = {n: -2.5 * t for n, t in a.items()}
    base = {n: torch.randn(s, generator=g) + 1 for n, s in shapes.items()}
    return {"a": a, "b": b, "c": c}, base


def _check_tidy(df, tensors, base=None):
    """Every number of the tidy table against a direct torch computation, tensor by tensor."""
    import pandas as pd

    names = list(next(iter(tensors.values())))
    vec_rows = df[df["kind"] == "vector"]
    pair_rows = df[df["kind"] == "pair"]
    assert len(vec_rows) == len(names) * len(tensors)
    assert len(pair_rows) == len(names) * math.comb(len(tensors), 2)
    assert list(dict.fromkeys(df["tensor"])) == names  # in the tensors' order
    for _, row in vec_rows.iterrows():
        t = tensors[row["vector"]][row["tensor"]].double()
        assert row["norm"] == pytest.approx(float(t.norm()), rel=1e-9)
        assert row["mean"] == pytest.approx(float(t.mean()), rel=1e-6, abs=1e-12)
        assert row["max_abs"] == pytest.approx(float(t.abs().max()), rel=1e-7)
        assert row["numel"] == t.numel()
        info = parse(row["tensor"])
        assert (row["module"], None if pd.isna(row["layer"]) else int(row["layer"])) == (info.module, info.layer)
        if base is not None:
            # ‖θ_base‖ is summed in float32 blocks (kernels.squared_norm): float32's precision
            assert row["rel_norm"] == pytest.approx(float(t.norm() / base[row["tensor"]].double().norm()), rel=1e-6)
    for _, row in pair_rows.iterrows():
        x = tensors[row["vector_a"]][row["tensor"]].double()
        y = tensors[row["vector_b"]][row["tensor"]].double()
        cos = float(torch.nn.functional.cosine_similarity(x.reshape(1, -1), y.reshape(1, -1), eps=0.0))
        assert row["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-12)
        both = (x != 0) & (y != 0)
        assert row["sign_agreement"] == pytest.approx(float((torch.sign(x) == torch.sign(y))[both].double().mean()))
        assert row["pair"] == f"{row['vector_a']} · {row['vector_b']}"
        assert pd.isna(row["vector"]) and pd.isna(row["norm"])


def test_tidy_table_matches_torch():
    tensors, base = _tidy_case()
    vecs = {k: ChatVector.from_tensors(v) for k, v in tensors.items()}
    df = geometry.tidy_table(geometry.vector_stats(vecs, base=base))
    _check_tidy(df, tensors, base)
    assert list(df.columns) == ["kind", "tensor", "layer", "module", "group", "numel", "vector", "norm", "rel_norm",
                                "mean", "std", "max_abs", "vector_a", "vector_b", "pair", "cosine",
                                "sign_agreement"]
    q = df[(df["kind"] == "pair") & (df["tensor"] == "model.layers.0.self_attn.q_proj.weight")].set_index("pair")
    assert q.loc["a · c", "cosine"] == pytest.approx(-1.0) and q.loc["a · c", "sign_agreement"] == 0.0
    # per-tensor rows add up to the global numbers
    pairs = df[df["kind"] == "pair"]
    norms2 = df[df["kind"] == "vector"].groupby("vector")["norm"].apply(lambda s: (s**2).sum())
    dot_ab = sum(float((tensors["a"][n].double() * tensors["b"][n].double()).sum()) for n in tensors["a"])
    assert geometry.cosine_matrix(geometry.vector_stats(vecs)).loc["a", "b"] == \
        pytest.approx(dot_ab / math.sqrt(norms2["a"] * norms2["b"]), rel=1e-9)
    assert set(pairs["vector_a"] + pairs["vector_b"]) == {"ab", "ac", "bc"}
    # one vector, no base: no pair rows, no rel_norm column; the layer column keeps integers
    single = geometry.tidy_table(geometry.vector_stats({"a": vecs["a"]}))
    assert set(single["kind"]) == {"vector"} and "rel_norm" not in single.columns
    assert str(single["layer"].dtype) == "Int64"


def test_compare_cli_tidy_csv_and_matrix(tmp_path, capsys):
    """``--csv``: the tidy table, its numbers equal to torch's; ``--csv-matrix``: ``geometry.cosine_matrix``;
    both refuse to clobber, and two outputs may not share a path."""
    import pandas as pd

    from chatvec_lab.cli import main

    tensors, _ = _tidy_case()
    for k, v in tensors.items():
        ChatVector.from_tensors(v).save(tmp_path / k)
    folders = [str(tmp_path / k) for k in tensors]
    tidy, matrix = tmp_path / "tidy.csv", tmp_path / "matrix.csv"
    assert main(["compare", *folders, "--csv", str(tidy), "--csv-matrix", str(matrix), "-q"]) == 0
    df = pd.read_csv(tidy, dtype={"layer": "Int64"})
    _check_tidy(df, tensors)
    expected = geometry.cosine_matrix(geometry.vector_stats({k: ChatVector.load(f) for k, f in zip(tensors, folders)}))
    got = pd.read_csv(matrix, index_col=0)
    assert list(got.index) == list(got.columns) == list(tensors)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-12, atol=1e-15)
    capsys.readouterr()

    before = {p: p.read_bytes() for p in (tidy, matrix)}
    for flag, path in (("--csv", tidy), ("--csv-matrix", matrix)):  # no clobber without --overwrite
        assert main(["compare", *folders, flag, str(path), "-q"]) == 2
        assert "already exists" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tidy, matrix)} == before
    assert main(["compare", *folders, "--csv", str(tmp_path / "x.csv"), "--csv-matrix", str(tmp_path / "x.csv"),
                 "-q"]) == 2
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    assert main(["compare", *folders, "--csv-matrix", str(tmp_path / "a" / "m.csv"), "-q"]) == 2  # inside an input
    assert main(["compare", *folders, "--csv", str(tidy), "--csv-matrix", str(matrix), "--overwrite", "-q"]) == 0
    assert pd.read_csv(matrix, index_col=0).equals(got)


def test_spectra_and_aligned_keep_their_callers_working():
    """demo.py and plot_spectra read the spectra table; notebooks and scripts read aligned()'s old keys."""
    import matplotlib.pyplot as plt

    v = _vecs()
    a = ChatVector.from_tensors(v)
    spec = geometry.spectra(a, k=4)
    assert {"name", "layer", "module", "shape", "singular_values", "effective_rank", "stable_rank", "energy_top1",
            "energy_top8"} <= set(spec.columns)
    assert (spec["singular_values"].map(len) == 4).all() and (spec["method"] == "exact").all()
    assert (spec["effective_rank"] > 4).any()  # over the full spectrum, no longer capped at k
    fig = plots.plot_spectra(spec.sort_values("stable_rank").head(8))
    assert fig.axes[0].get_title()
    plt.close(fig)
    stats = geometry.vector_stats({"a": a, "b": 2 * a})
    res = geometry.aligned(stats, "a", "b")
    assert res["cosine"] == pytest.approx(1.0) and res["sign_agreement"] == pytest.approx(1.0)
    assert res["verdict"].startswith("aligned: global cosine 1.00") and res["driver"] == "blocks"
