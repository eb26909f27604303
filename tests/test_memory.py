"""The memory estimate (behaviour/memory.py): exact model bytes from headers, the formula against the measured
peaks, and one-line errors."""
import json
import sys
from pathlib import Path

import pytest
import torch

from chatvec_lab import toy
from chatvec_lab.behaviour.memory import BENCH_SHAPES, GB, MEASURED, OVERHEAD, Footprint, memory_check, memory_estimate
from chatvec_lab.errors import ChatVecError

ROOT = Path(__file__).resolve().parents[1]


def _records():
    with open(ROOT / "benchmarks" / "results" / "bench_real.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_model_bytes_from_headers_equal_the_loaded_model():
    from chatvec_lab.behaviour.engines import load_target

    for dtype in ("auto", "float32"):
        model, _ = load_target(toy.path("cp"), device="cpu", dtype=dtype)
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
        row = memory_estimate(toy.path("cp"), dtype=dtype).set_index("job")
        assert row.loc["generate", "model_gb"] * GB == pytest.approx(loaded, rel=0, abs=0.5)


def test_config_alone_gives_the_same_footprint_as_the_checkpoint():
    config = json.loads((toy.path("cp") / "config.json").read_text())
    a, b = Footprint.of(toy.path("cp")), Footprint.of(config)
    assert (a.floating, a.largest, a.stored) == (b.floating, b.largest, b.stored)


def test_measured_figures_are_the_benchmarks_own():
    """MEASURED and OVERHEAD are copied from bench_real's results: a re-run that moves them must move these."""
    runs = {(r["size"], r["label"]): r for r in _records() if r["device"] == "cpu"}
    final, tiny = runs[("0.36b", "after-final")], runs[("tiny", "after")]
    big = runs[("1b", "after")]
    want = {("0.36b", "generate"): final["jobs"]["generate"]["peak_rss"],
            ("0.36b", "live"): final["jobs"]["sweep"]["peak_rss"],
            ("1b", "generate"): big["jobs"]["generate"]["peak_rss"], ("1b", "live"): big["jobs"]["sweep"]["peak_rss"]}
    assert {(m["size"], m["job"]): m["peak_rss"] for m in MEASURED} == want
    assert OVERHEAD == {"generate": tiny["jobs"]["generate"]["peak_rss"], "live": tiny["jobs"]["sweep"]["peak_rss"]}
    for size, record in (("0.36b", final), ("1b", big)):  # the shapes are the benchmark's models, to the byte
        assert Footprint.of(BENCH_SHAPES[size]).model_bytes(torch.bfloat16) == record["jobs"]["load"]["model_bytes"]


def test_the_formula_is_within_ten_percent_of_every_measured_peak():
    check = memory_check()
    assert len(check) == len(MEASURED)
    assert check["ratio"].between(0.9, 1.1).all(), check


def test_gpu_moves_model_and_batch_to_gpu_memory():
    cpu = memory_estimate(toy.path("cp"), device="cpu").set_index("job")
    gpu = memory_estimate(toy.path("cp"), device="cuda").set_index("job")  # an estimate needs no GPU
    assert (cpu["gpu_gb"] == 0).all()
    assert gpu.loc["live", "gpu_gb"] == pytest.approx(cpu.loc["live", "model_gb"] + cpu.loc["live", "batch_gb"])
    assert gpu.loc["live", "ram_gb"] < cpu.loc["live", "ram_gb"]


def test_batch_and_vectors_grow_the_estimate():
    one = memory_estimate(toy.path("cp"), batch_size=1).set_index("job")
    many = memory_estimate(toy.path("cp"), batch_size=32, vectors=3).set_index("job")
    assert many.loc["live", "batch_gb"] == pytest.approx(32 * one.loc["live", "batch_gb"])
    assert many.loc["live", "working_gb"] > one.loc["live", "working_gb"]


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(tokens=-1), dict(vectors=1.5), dict(batch_size=True),
                                    dict(device="tpu"), dict(dtype="int8")])
def test_bad_settings_are_one_line(kwargs):
    with pytest.raises(ChatVecError) as e:
        memory_estimate(toy.path("cp"), **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("target", ["/no/such/model", 3, {"hidden_size": 8}, {"model_type": "no-such-arch"}])
def test_bad_targets_are_one_line(target):
    with pytest.raises(ChatVecError) as e:
        memory_estimate(target)
    assert "\n" not in str(e.value)


def test_headers_only_no_weights_read(tmp_path, monkeypatch):
    """The estimate of a folder reads headers: it never materialises a tensor."""
    import chatvec_lab.io.sources as sources

    def refuse(*a, **k):
        raise AssertionError("a tensor was read")

    for cls in vars(sources).values():
        if isinstance(cls, type) and issubclass(cls, sources.WeightSource):
            monkeypatch.setattr(cls, "get", refuse, raising=False)
    memory_estimate(toy.path("cp"))


def test_the_merge_row_is_the_line_through_bench_merge_peaks():
    """MERGE_MEASURED is copied from bench_merge's results (the larger peak of the labelled runs) and the merge
    row passes through both points for bfloat16 inputs; a float32 checkpoint needs more (its copies are wider)."""
    import math

    from chatvec_lab.behaviour import memory

    with open(ROOT / "benchmarks" / "results" / "bench_merge.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_merge import SIZES

    for m in memory.MERGE_MEASURED:
        record = next(r for r in reversed(records) if r["size"] == m["size"] and r["method"] == "ties"
                      and r["label"] == memory.MERGE_LABEL)
        assert m["peak_rss"] == round(max(run["peak_rss_mib"] for run in record["runs"]["chatvec"]) * 2**20)
        assert m["largest"] == SIZES[m["size"]]["vocab"] * SIZES[m["size"]]["hidden"]
        assert math.isclose(memory.merge_estimate(m["largest"], torch.bfloat16), m["peak_rss"], rel_tol=1e-9)
    big = memory.MERGE_MEASURED[0]["largest"]
    assert memory.merge_estimate(big, torch.float32) > memory.merge_estimate(big, torch.bfloat16)
    row, footprint = memory_estimate(toy.path("cp")).set_index("job").loc["merge"], Footprint.of(toy.path("cp"))
    assert row["ram_gb"] * GB == pytest.approx(memory.merge_estimate(footprint.largest, footprint.stored), rel=1e-9)


def test_info_memory_prints_each_job(capsys):
    from chatvec_lab.cli import main

    assert main(["info", str(toy.path("cp")), "--memory", "--batch-size", "4", "--tokens", "128"]) == 0
    out = capsys.readouterr().out
    want = memory_estimate(toy.path("cp"), batch_size=4, tokens=128, device="auto").set_index("job")
    for job in ("generate", "live", "streaming", "merge"):
        line = next(l for l in out.splitlines() if l.split() and l.split()[0] == job)
        assert f"{want.loc[job, 'ram_gb']:.3f}" in line
    assert main(["info", str(toy.path("cp")), "--memory", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chatvec info: error: device 'tpu'" in err


def test_hostile_configs_and_vectors_are_one_line(tmp_path):
    """Review round 4 (D, G, M): a 400-digit hidden_size or --tokens 10**200 was an OverflowError traceback; a
    saved vector folder got a model's estimate from default shapes; a missing config.json was silent."""
    import shutil

    from chatvec_lab import ChatVector

    huge = tmp_path / "huge"
    shutil.copytree(toy.path("cp"), huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "hidden_size": int("9" * 400)}))
    vec = tmp_path / "cv"
    ChatVector.from_models(toy.path("base"), toy.path("chat")).save(vec)
    for target, kwargs, says in ((huge, {}, "past any machine"), (toy.path("cp"), {"tokens": 10**200}, "past any"),
                                 (vec, {}, "saved chat vector")):
        with pytest.raises(ChatVecError, match=says) as e:
            memory_estimate(target, **kwargs)
        assert "\n" not in str(e.value)
    bare = tmp_path / "bare"
    shutil.copytree(toy.path("cp"), bare)
    (bare / "config.json").unlink()
    assert memory_estimate(bare)["basis"].str.contains("no config.json").iloc[0]
