"""Every merge method against mergekit 0.1.5's float32 output on the toy family (issue 26).

Where the arithmetic is the same, the outputs are equal to the bit: linear, task_arithmetic, ties (with
rescale, gradients, filters and a density whose share of a norm vector is below one entry), breadcrumbs,
breadcrumbs_ties, slerp, nuslerp (with and without a base, row-wise), multislerp, karcher, model_stock
(whole and filter-wise), and dare_* / della* at density 1. Where it cannot be — DARE's and DELLA's random
masks, deterministic in both but drawn from different generators (one per source and tensor here, torch's
global one in mergekit) — two tests: (1) the kernels are equal to the bit when given the same masks (the same
global generator state), and (2) the whole merge agrees within stated tolerances: per tensor of ≥ 10,000
entries, the merged delta's L1 norm within 3%, its share of non-zero entries within 0.03 and its cosine with
mergekit's above 0.4 (two independent draws of a 50% mask agree on about half of the delta's energy).

Both run torch on one thread: the lab's merges always do (``merge_from_config``; so its output does not depend on
the machine's cores or ``--workers``), while mergekit's output, for the methods that sum a whole tensor (rescale,
slerp, nuslerp, karcher, model_stock), changes in the last bits with its thread count (a sum split across threads
is added in another order): ``test_mergekit_depends_on_its_threads_the_lab_does_not``.

Skipped where mergekit is not installed (``pip install mergekit==0.1.5``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatvec_lab import toy

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

T = toy.path("base").parent
B, C, A, P = (str(T / m) for m in ("base", "chat", "chat-alt", "cp"))


def m(path, **p):
    return {"model": path, **({"parameters": p} if p else {})}


EXACT = {
    "linear": {"models": [m(C, weight=1.0), m(A, weight=0.5), m(P, weight=0.25)], "merge_method": "linear"},
    "task_arithmetic": {"models": [m(C, weight=1.0), m(A, weight=[0.2, 0.9]), m(P, weight=0.3)], "base_model": B,
                        "merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}},
    "ties": {"models": [m(C, weight=1.0, density=0.3), m(A, weight=0.5, density=0.004),
                        m(P, weight=0.3, density=[0.1, 0.7])], "base_model": B, "merge_method": "ties"},
    "ties_rescale_filter": {"models": [m(C, weight=1.0, density=0.3),
                                       m(A, weight=[{"filter": "mlp", "value": 0.2}, {"value": 0.7}], density=0.5)],
                            "base_model": B, "merge_method": "ties", "parameters": {"rescale": True, "normalize": False}},
    "breadcrumbs": {"models": [m(C, weight=1.0, density=0.5, gamma=0.02), m(A, weight=0.5, density=0.4)],
                    "base_model": B, "merge_method": "breadcrumbs"},
    "breadcrumbs_ties": {"models": [m(C, weight=1.0, density=0.5, gamma=0.02), m(A, weight=0.5, density=0.4)],
                         "base_model": B, "merge_method": "breadcrumbs_ties"},
    "dare_ties_density_1": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "base_model": B, "merge_method": "dare_ties"},
    "dare_linear_density_1": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "base_model": B,
                              "merge_method": "dare_linear"},
    "della_density_1": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "base_model": B, "merge_method": "della"},
    "della_linear_density_1": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "base_model": B,
                               "merge_method": "della_linear"},
    "slerp": {"models": [m(B), m(C)], "base_model": B, "merge_method": "slerp",
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.6}]}},
    "nuslerp": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "base_model": B, "merge_method": "nuslerp"},
    "nuslerp_no_base_row_wise": {"models": [m(C, weight=1.0), m(A, weight=0.5)], "merge_method": "nuslerp",
                                 "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": {"models": [m(C, weight=1.0), m(A, weight=0.5), m(P, weight=0.3)], "base_model": B,
                   "merge_method": "multislerp"},
    "karcher": {"models": [m(C), m(A), m(P)], "merge_method": "karcher"},
    "model_stock": {"models": [m(C), m(A), m(P)], "base_model": B, "merge_method": "model_stock"},
    "model_stock_filter_wise": {"models": [m(C), m(A), m(P)], "base_model": B, "merge_method": "model_stock",
                                "parameters": {"filter_wise": True}},
}
RANDOM = {
    "dare_ties": {"models": [m(C, weight=1.0, density=0.5), m(A, weight=0.5, density=0.5)], "base_model": B,
                  "merge_method": "dare_ties"},
    "dare_linear": {"models": [m(C, weight=1.0, density=0.5), m(A, weight=0.5, density=0.5)], "base_model": B,
                    "merge_method": "dare_linear"},
    "della": {"models": [m(C, weight=1.0, density=0.5), m(A, weight=0.5, density=0.5, epsilon=0.1)], "base_model": B,
              "merge_method": "della"},
    "della_linear": {"models": [m(C, weight=1.0, density=0.5), m(A, weight=0.5, density=0.5)], "base_model": B,
                     "merge_method": "della_linear"},
}


def _weights(folder):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out


def _mergekit(config: dict, out: Path, threads: int = 1) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from chatvec_lab.core.threads import torch_threads

    with torch_threads(threads):
        run_merge(MergeConfiguration.model_validate(config), str(out),
                  MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return _weights(out)


def _both(config: dict, tmp_path: Path):
    """(ours, mergekit's) tensors for one float32 config, each run in-process, mergekit on one torch thread."""
    from chatvec_lab.core.model_merge import merge_from_config

    config = {**config, "dtype": "float32"}
    theirs = _mergekit(config, tmp_path / "mergekit")
    merge_from_config(config, tmp_path / "ours")
    return _weights(tmp_path / "ours"), theirs


def test_mergekit_depends_on_its_threads_the_lab_does_not(tmp_path):
    from chatvec_lab.core.model_merge import merge_from_config
    from chatvec_lab.core.threads import torch_threads

    config = {**EXACT["model_stock"], "dtype": "float32"}
    one, two = _mergekit(config, tmp_path / "mk1", 1), _mergekit(config, tmp_path / "mk2", 2)
    assert any(not torch.equal(one[k], two[k]) for k in one)  # why the comparisons above fix its threads
    ours = []
    for threads, workers in ((1, 1), (2, 1), (2, 2)):
        with torch_threads(threads):
            ours.append(_weights(merge_from_config(config, tmp_path / f"ours{threads}{workers}", workers=workers)))
    assert all(torch.equal(ours[0][k], o[k]) and torch.equal(ours[0][k], one[k]) for o in ours[1:] for k in one)


@pytest.mark.parametrize("case", list(EXACT))
def test_equal_to_mergekit_bit_for_bit(tmp_path, case):
    ours, theirs = _both(EXACT[case], tmp_path)
    assert set(ours) == set(theirs)
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{case}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("case", list(RANDOM))
def test_random_masks_agree_within_tolerance(tmp_path, case):
    ours, theirs = _both(RANDOM[case], tmp_path)
    base = {k: v.float() for k, v in _weights(B).items()}
    for name in ours:
        if ours[name].numel() < 10_000:
            continue
        a, b = (ours[name] - base[name]).flatten(), (theirs[name] - base[name]).flatten()
        assert abs(float(a.abs().sum() / b.abs().sum()) - 1) < 0.03, name
        assert abs(float((a != 0).float().mean() - (b != 0).float().mean())) < 0.03, name
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.4, name


@pytest.mark.parametrize("method", list(RANDOM))
def test_random_kernels_are_bitwise_equal_given_the_same_masks(monkeypatch, method):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from chatvec_lab.core import merge_methods

    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 64, generator=g)
    a, b = base + 0.1 * torch.randn(96, 64, generator=g), base + 0.1 * torch.randn(96, 64, generator=g)
    params = {"density": [0.5, 0.4], "weight": [1.0, 0.5], "rescale": True, "normalize": method == "della",
              "lambda": 1.0, "int8_mask": False, **({"epsilon": [0.15, 0.1]} if "della" in method else {})}
    theirs_params = {k: ({1: v[0], 2: v[1]} if isinstance(v, list) else v) for k, v in params.items()}
    torch.manual_seed(7)
    theirs = registry.get(method).merge_group(TensorGroup.from_tensors([base, a, b], base_index=0), **theirs_params)
    monkeypatch.setattr(merge_methods, "_generator", lambda seed, name, i: torch.default_generator)
    torch.manual_seed(7)
    ours = merge_methods.REGISTRY[method].kernel(base, [a, b], params, "w", 0)
    assert torch.equal(ours, theirs)


def test_the_lab_registry_covers_mergekits_methods_it_claims():
    from mergekit.merge_methods.registry import registered_methods
    from chatvec_lab.core.merge_methods import REGISTRY

    theirs = {m.spec.name for m in registered_methods()}
    assert set(REGISTRY) <= theirs
    for name, method in REGISTRY.items():  # the same parameters, with the same defaults
        spec = next(m.spec for m in registered_methods() if m.spec.name == name)
        for p in spec.parameters:
            ours = {**method.per_source, **method.shared}
            assert p.name in ours, (name, p.name)
            if not p.required:
                assert ours[p.name] == p.default, (name, p.name)
