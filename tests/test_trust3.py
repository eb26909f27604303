"""Trust, round 3 (issue 23): the newer surfaces keep the promises — one line and exit 2 for bad input, nothing
lost or silently wrong, inputs never written, nothing hangs.

Every test here failed on the code before the issue's fixes (see the issue's list)."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.cli import main
from chatvec_lab.errors import ChatVecError
from conftest import checksums

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Erzähl mir etwas über die Liebe.", "Tell me something about money."]


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.err


def _one_line_refusal(rc, err, *words):
    """Exit 2 and one line (besides transformers' own progress bar while a model loads)."""
    assert rc == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def _within(seconds: float, fn, fifos=()):
    """``fn()`` in a thread; a test failure (not a hung run) if it takes longer than ``seconds``. A thread blocked
    opening one of ``fifos`` is released by opening it for writing, so nothing is left waiting."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"still running after {seconds} s: a read that blocks for ever")
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ------------------------------------------------------------------ 1. the sweep cache reads regular files only

@pytest.fixture(scope="module")
def toy_vector(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vec") / "vec"
    ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).save(folder)
    return folder


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory, toy_vector):
    """A sweep's cache (two coefficients, one seed, two prompts, 3 new tokens) and the sweep's table."""
    from chatvec_lab.behaviour.sweep import sweep

    cache = tmp_path_factory.mktemp("cache") / "c"
    df = sweep(toy.path("cp"), ChatVector.load(toy_vector), [0.0, 1.0], PROMPTS, max_new_tokens=3, cache_dir=cache,
               scorers=["ended_turn"], progress=False)
    return cache, df


def _sweep_again(cache, toy_vector):
    from chatvec_lab.behaviour.sweep import sweep

    return sweep(toy.path("cp"), ChatVector.load(toy_vector), [0.0, 1.0], PROMPTS, max_new_tokens=3,
                 cache_dir=cache, scorers=["ended_turn"], progress=False)


@pytest.mark.parametrize("where", ["table", "cell"])
def test_a_fifo_in_the_sweep_cache_is_refused_at_once_not_waited_on(filled_cache, toy_vector, tmp_path, where):
    cache = tmp_path / "c"
    shutil.copytree(filled_cache[0], cache)
    tables = sorted(cache.glob("sweep-*.json"))
    cells = sorted((cache / "cells").glob("cell-*.json"))
    assert len(tables) == 1 and len(cells) == 2
    fifo = tables[0] if where == "table" else cells[1]
    if where == "cell":
        tables[0].unlink()  # so the cells are read
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(ChatVecError, match=f"{fifo.name} is a FIFO, not a regular file"):
        _within(20, lambda: _sweep_again(cache, toy_vector), [fifo])


def test_read_table_never_blocks_and_reads_only_regular_files(tmp_path):
    from chatvec_lab.behaviour.cache import read_table, write_table

    df = pd.DataFrame({"prompt": ["a", "b"], "reply": ["x", "y"], "seed": [0, 0]})
    write_table(tmp_path / "ok.json", df)
    pd.testing.assert_frame_equal(read_table(tmp_path / "ok.json"), df)
    assert read_table(tmp_path / "missing.json") is None
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ChatVecError, match="FIFO"):
        _within(5, lambda: read_table(tmp_path / "fifo.json"), [tmp_path / "fifo.json"])
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ChatVecError, match="folder.json is a folder"):
        read_table(tmp_path / "folder.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # endless: never read
    with pytest.raises(ChatVecError, match="symbolic link"):
        _within(5, lambda: read_table(tmp_path / "zero.json"))


def test_a_cache_entry_larger_than_the_bound_is_a_miss_not_read(tmp_path, monkeypatch):
    from chatvec_lab.behaviour import cache

    df = pd.DataFrame({"prompt": ["a"], "reply": ["x" * 1000], "seed": [0]})
    cache.write_table(tmp_path / "t.json", df)
    monkeypatch.setattr(cache, "CACHE_MAX_BYTES", 100)
    assert cache.read_table(tmp_path / "t.json") is None
    cache.write_table(tmp_path / "big.json", df)  # too large to be read back: not written
    assert not (tmp_path / "big.json").exists()


def test_cells_folder_that_is_a_fifo_is_refused_before_any_work(tmp_path):
    from chatvec_lab.behaviour.cache import check_cache_dir

    (tmp_path / "c").mkdir()
    os.mkfifo(tmp_path / "c" / "cells")
    with pytest.raises(ChatVecError, match="cells exists and is not a folder"):
        check_cache_dir(tmp_path / "c", [])


# ------------------------------------------------------------------ 3. a cached cell is its own, and never an input

def test_a_cell_copied_over_another_is_a_miss(tmp_path):
    from chatvec_lab.behaviour.grid import CellCache, make_cells

    cache = CellCache(tmp_path, {"target": "t", "vectors": {}}, prompts=["p"])
    low, high = make_cells([{"chat": 0.0}, {"chat": 1.0}], [0])
    rows = pd.DataFrame({"alpha": [0.0], "prompt": ["p"], "reply": ["the α = 0 reply"], "seed": [0]})
    cache.put(low, rows)
    assert cache.get(low) is not None and cache.get(high) is None
    shutil.copyfile(cache.path(low), cache.path(high))  # same prompts, same seed: it looked like the α = 1 cell
    assert cache.get(high) is None
    other_run = CellCache(tmp_path / "other", {"target": "another model", "vectors": {}}, prompts=["p"])
    other_run.folder.mkdir(parents=True)
    shutil.copyfile(cache.path(low), other_run.path(low))
    assert other_run.get(low) is None


def test_a_sweep_table_copied_to_another_name_is_a_miss(tmp_path):
    from chatvec_lab.behaviour.cache import read_table, write_table

    write_table(tmp_path / "sweep-aaaa.json", pd.DataFrame({"alpha": [0.0], "reply": ["r"]}))
    shutil.copyfile(tmp_path / "sweep-aaaa.json", tmp_path / "sweep-bbbb.json")
    assert read_table(tmp_path / "sweep-aaaa.json") is not None and read_table(tmp_path / "sweep-bbbb.json") is None


def test_a_copied_cell_in_a_real_sweep_is_generated_again(filled_cache, toy_vector, tmp_path, monkeypatch):
    import chatvec_lab.behaviour.engines as engines

    cache = tmp_path / "c"
    shutil.copytree(filled_cache[0], cache)
    next(cache.glob("sweep-*.json")).unlink()
    first, second = sorted((cache / "cells").glob("cell-*.json"))
    shutil.copyfile(first, second)
    calls = []
    real = engines.generate
    monkeypatch.setattr(engines, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _within(60, lambda: _sweep_again(cache, toy_vector))
    assert len(calls) == 1  # the copied cell only
    pd.testing.assert_frame_equal(again, filled_cache[1], check_dtype=False)


def test_files_key_sees_a_file_replaced_with_its_mtime_restored(tmp_path):
    from chatvec_lab.behaviour.cache import files_key

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 100)
    before = files_key([tmp_path])
    st = f.stat()
    replacement = tmp_path / "new"
    replacement.write_bytes(b"b" * 100)
    os.replace(replacement, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files_key([tmp_path]) != before


def test_a_cells_link_into_an_input_is_refused(toy_vector, tmp_path, capsys):
    vec = tmp_path / "vec"
    shutil.copytree(toy_vector, vec)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cells").symlink_to(vec)
    before = checksums(vec)
    rc, err = _cli(["sweep", "--target", toy.path("cp"), "--vector", vec, "--alphas", "0", "--prompts",
                    tmp_path / "p.txt", "--max-new-tokens", "2", "--csv", tmp_path / "s.csv", "--cache-dir",
                    tmp_path / "c", "-q"], capsys)
    _one_line_refusal(rc, err, "input")
    assert checksums(vec) == before and sorted(p.name for p in vec.iterdir()) == sorted(
        p.name for p in toy_vector.iterdir())


# ------------------------------------------------------------------ 2. a vector's metadata is read strictly

def _with_metadata(src: Path, dest: Path, change) -> Path:
    shutil.copytree(src, dest)
    meta = json.loads((dest / "chatvec.json").read_text())
    change(meta)
    (dest / "chatvec.json").write_text(json.dumps(meta))
    return dest


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


METADATA_CASES = {
    "chat_rows negative": ("chat_rows", _set("chat_rows", [-1])),
    "chat_rows past the rows": ("chat_rows", _set("chat_rows", [2048])),
    "chat_rows repeated": ("chat_rows", _set("chat_rows", [5, 5])),
    "chat_rows not a list": ("chat_rows", _set("chat_rows", "5")),
    "chat_rows booleans": ("chat_rows", _set("chat_rows", [True])),
    "chat_rows floats": ("chat_rows", _set("chat_rows", [1.5])),
    "chat_rows without a vocabulary": ("chat_rows", lambda m: (m.pop("vocabulary"), m.update(chat_rows=[3]))),
    "vocabulary shorter than the rows": ("vocabulary", lambda m: m.update(vocabulary=m["vocabulary"][:10])),
    "vocabulary not a list": ("vocabulary", _set("vocabulary", "abc")),
    "vocabulary of numbers": ("vocabulary", lambda m: m.update(vocabulary=list(range(2048)))),
    "special_tokens": ("special_tokens", _set("special_tokens", [1])),
    "base not an object": ("base", _set("base", "/some/where")),
    "base path a number": ("base.path", lambda m: m["base"].update(path=5)),
    "base sha256": ("base.sha256", lambda m: m["base"].update(sha256={"model.safetensors": "xyz"})),
    "combination_of": ("combination_of", _set("combination_of", ["x"])),
    "nested base": ("combination_of[0].base", _set("combination_of", [{"base": 3}])),
    "signs": ("signs", _set("signs", ["+"])),
    "scaled_by NaN": ("scaled_by", _set("scaled_by", float("nan"))),
    "tensors": ("tensors", _set("tensors", -1)),
    "format": ("format", _set("format", "chatvec/2")),
    "dtype": ("dtype", _set("dtype", "float16")),
    "shards outside": ("shards", _set("shards", ["../model.safetensors"])),
    "shards missing": ("shards", _set("shards", ["vector-00001-of-00002.safetensors"])),
    "misspelt key": ("chat_row", lambda m: m.update(chat_row=m.pop("chat_rows", []))),
    "selected": ("selected", _set("selected", "embed")),
}


@pytest.mark.parametrize("case", METADATA_CASES, ids=list(METADATA_CASES))
def test_every_metadata_field_is_checked_on_load(toy_vector, tmp_path, case):
    from chatvec_lab.errors import SourceError

    field, change = METADATA_CASES[case]
    vec = _with_metadata(toy_vector, tmp_path / "vec", change)
    with pytest.raises(SourceError, match=re.escape(f"'{field}'")):
        ChatVector.load(vec)


def test_a_stray_weights_file_beside_a_vector_is_refused(toy_vector, tmp_path):
    from chatvec_lab.errors import SourceError

    vec = tmp_path / "vec"
    shutil.copytree(toy_vector, vec)
    from safetensors.torch import save_file
    save_file({"model.layers.0.extra.weight": torch.ones(4)}, vec / "extra.safetensors")
    with pytest.raises(SourceError, match="'shards' does not list extra.safetensors"):
        ChatVector.load(vec)


@pytest.mark.parametrize("case", ["chat_rows negative", "vocabulary shorter than the rows"])
@pytest.mark.parametrize("embeddings", ["error", "shared", "tokens"])
def test_apply_refuses_untrustworthy_metadata_in_one_line_and_writes_nothing(toy_vector, tmp_path, capsys, case,
                                                                              embeddings):
    field, change = METADATA_CASES[case]
    vec = _with_metadata(toy_vector, tmp_path / "vec", change)
    before = checksums(vec, toy.path("cp"))
    rc, err = _cli(["apply", "--target", toy.path("cp"), "--vector", vec, "-o", tmp_path / "out", "-q",
                    "--no-lineage-check", "--embeddings", embeddings], capsys)
    _one_line_refusal(rc, err, f"'{field}'", "chatvec.json")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["vec"]
    assert checksums(vec, toy.path("cp")) == before


def test_metadata_the_lab_writes_is_read_back(toy_vector, tmp_path):
    vec = ChatVector.load(toy_vector)
    assert vec.vocabulary is not None and len(vec.vocabulary) == 2048
    (0.5 * vec).select(exclude="embed").save(tmp_path / "half")
    ChatVector.load(tmp_path / "half")
    (vec + vec).save(tmp_path / "sum", max_shard_bytes=3_000_000)  # several shards
    assert len(json.loads((tmp_path / "sum" / "chatvec.json").read_text())["shards"]) > 1
    ChatVector.load(tmp_path / "sum")


# ------------------------------------------------------------------ 4. one line instead of a traceback

@pytest.fixture()
def cp_copy(tmp_path):
    folder = tmp_path / "cp"
    shutil.copytree(toy.path("cp"), folder)
    return folder


@pytest.mark.parametrize("tokenizer", [{"version": "1.0", "model": {"type": "BPE", "vocab": 5}},
                                       {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": 5}},
                                       {"model": []}], ids=["no added_tokens", "vocab a number", "model a list"])
def test_a_tokenizer_of_the_wrong_schema_is_one_line(toy_vector, cp_copy, tmp_path, capsys, tokenizer):
    (cp_copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    rc, err = _cli(["apply", "--target", cp_copy, "--vector", toy_vector, "-o", tmp_path / "out", "-q",
                    "--no-lineage-check"], capsys)
    _one_line_refusal(rc, err, "cannot load the tokenizer in", str(cp_copy))
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_is_not_jinja_is_refused_before_anything_is_written(toy_vector, cp_copy, tmp_path,
                                                                                 capsys):
    (cp_copy / "chat_template.jinja").write_text("{% if %}")
    rc, err = _cli(["apply", "--target", toy.path("cp"), "--vector", toy_vector, "-o", tmp_path / "out", "-q",
                    "--no-lineage-check", "--chat-template-from", cp_copy], capsys)
    _one_line_refusal(rc, err, "not valid Jinja", str(cp_copy))
    assert not (tmp_path / "out").exists()
    (tmp_path / "p.txt").write_text("Hallo\n")
    rc, err = _cli(["sweep", "--target", cp_copy, "--vector", toy_vector, "--prompts", tmp_path / "p.txt", "--csv",
                    tmp_path / "s.csv", "--max-new-tokens", "2", "--scorers", "ended_turn", "-q"], capsys)
    _one_line_refusal(rc, err, "not valid Jinja")
    assert not (tmp_path / "s.csv").exists()


def test_a_template_that_fails_on_a_conversation_is_one_line():
    from chatvec_lab.errors import UsageError
    from chatvec_lab.behaviour.generation import render

    model, tok = toy.load("cp")
    with pytest.raises(UsageError, match="fails on this conversation"):
        render(tok, [{"role": "user", "content": "hi"}], chat_template="{{ raise_exception('no users here') }}")


@pytest.mark.parametrize("alpha", ["1e30", "1e6"])
def test_a_huge_coefficient_on_the_live_model_is_refused_not_sampled(toy_vector, tmp_path, capsys, alpha):
    (tmp_path / "p.txt").write_text("Hallo\n")
    rc, err = _cli(["sweep", "--target", toy.path("cp"), "--vector", toy_vector, "--alphas", alpha, "--prompts",
                    tmp_path / "p.txt", "--csv", tmp_path / "s.csv", "--max-new-tokens", "3", "--scorers",
                    "ended_turn", "-q"], capsys)
    _one_line_refusal(rc, err, "overflows", f"vec={float(alpha)}")
    assert not (tmp_path / "s.csv").exists()


def test_live_weights_that_overflow_their_dtype_are_refused_and_restored(toy_vector):
    from chatvec_lab.errors import NonFiniteError
    from chatvec_lab.core.live import LiveModel

    model, _ = toy.load("cp", dtype=torch.float16)
    live = LiveModel(model, {"vec": ChatVector.load(toy_vector)})
    live.set(vec=0.5)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="overflow to Inf/NaN in float16"):
        live.set(vec=1e9)
    assert live.alphas == {"vec": 0.5}
    assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("seeds", ["0", "-1", "100000000000000000000"])
def test_seed_counts_out_of_range_are_one_line(toy_vector, tmp_path, capsys, seeds):
    (tmp_path / "p.txt").write_text("Hallo\n")
    for command in (["sweep", "--csv", tmp_path / "s.csv"], ["atlas", "-o", tmp_path / "atlas"]):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in [*command, "--target", toy.path("cp"), "--vector", toy_vector, "--prompts",
                                   tmp_path / "p.txt", f"--seeds={seeds}", "-q"]])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--seeds" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("seeds", [0, -1, 10**20, [], [-1], [2**63], [1, 1], [0.5], "3", [True]])
def test_seeds_are_checked_before_any_work(toy_vector, seeds):
    from chatvec_lab.errors import UsageError
    from chatvec_lab.behaviour.sweep import sweep

    with pytest.raises(UsageError, match="seed"):
        sweep(toy.path("cp"), ChatVector.load(toy_vector), [0.0], ["Hallo"], seeds=seeds, progress=False)


def test_any_seed_below_2_to_the_63_generates():
    from chatvec_lab.behaviour.generation import generate

    model, tok = toy.load("cp")
    for seed in (0, 2**40, 2**63 - 1):
        df = generate(model, tok, ["Hallo"], max_new_tokens=2, seed=seed)
        assert df["seed"].tolist() == [seed]


def test_ranks_out_of_range_are_one_line(toy_vector, tmp_path, capsys):
    from chatvec_lab.errors import UsageError
    from chatvec_lab.core.lora import export_peft

    vec = ChatVector.load(toy_vector)
    for rank in (10**23, 2**31, -1, 1.5, True):
        with pytest.raises(UsageError, match="rank"):
            vec.low_rank(rank)
    with pytest.raises(UsageError, match="far larger than any matrix"):
        export_peft(vec.select(exclude="norm"), tmp_path / "adapter", rank=10**23)
    assert vec.low_rank(1000) is not None  # above every matrix's rank: the vector itself (test_ablations)
    for command in (["extract", "--base", toy.path("base"), "--chat", toy.path("chat"), "-o", tmp_path / "r"],
                    ["extract", "--base", toy.path("base"), "--chat", toy.path("chat"), "-o", tmp_path / "r",
                     "--format", "peft", "--target", toy.path("cp")]):
        for rank in ("99999999999999999999999", "0", "-3"):
            with pytest.raises(SystemExit) as exit_:
                main([str(a) for a in [*command, f"--rank={rank}", "-q"]])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and "rank" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "p.txt").write_text("Hallo\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in ["atlas", "--target", toy.path("cp"), "--vector", toy_vector, "--prompts",
                               tmp_path / "p.txt", "-o", tmp_path / "atlas", "--ranks", "1,99999999999999999999999",
                               "--skip-map", "-q"]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "far larger than any matrix" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["prompts", "config.json", "generation_config.json", "tokenizer_config.json",
                                   "chatvec.json"])
def test_deeply_nested_json_is_one_line(toy_vector, cp_copy, tmp_path, capsys, where):
    vec, prompts = toy_vector, tmp_path / "p.txt"
    prompts.write_text("Hallo\n")
    if where == "prompts":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": ' + DEEP + "}\n")
    elif where == "chatvec.json":
        vec = tmp_path / "vec"
        shutil.copytree(toy_vector, vec)
        (vec / "chatvec.json").write_text(DEEP)
    else:
        (cp_copy / where).write_text(DEEP)
    rc, err = _cli(["sweep", "--target", cp_copy, "--vector", vec, "--prompts", prompts, "--csv", tmp_path / "s.csv",
                    "--max-new-tokens", "2", "--scorers", "ended_turn", "-q"], capsys)
    _one_line_refusal(rc, err)
    if where != "prompts":
        rc, err = _cli(["apply", "--target", cp_copy, "--vector", vec, "-o", tmp_path / "out", "-q",
                        "--no-lineage-check", "--chat-template-from", cp_copy], capsys)
        _one_line_refusal(rc, err)
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e-12", "x"])
def test_max_shard_gb_must_be_a_finite_positive_size(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--base", str(toy.path("base")), "--chat", str(toy.path("chat")), "-o",
              str(tmp_path / "v"), "-q", f"--max-shard-gb={value}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--max-shard-gb" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------ 5. info reads headers and streams

def test_info_streams_a_large_tensor(tmp_path):
    """A 200 MB float32 tensor (a sparse file: zeros, then 3.0 as its last value): its norm in well under its
    size of extra memory (the whole tensor mapped, then converted to float64, took three times its size)."""
    n = 50_000_000
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * n - 4)
        f.seek(0, 2)
        f.write(torch.tensor([3.0]).numpy().tobytes())
    small = tmp_path / "small.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.ones(4, 4)}, small)
    script = textwrap.dedent(f"""
        import resource
        from chatvec_lab.analysis.info import describe
        describe({str(small)!r})  # imports and first use, so the baseline includes them
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        meta, table = describe({str(path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(table["norm"].iloc[0], (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    norm, grew_mib = out.stdout.split()
    assert float(norm) == 3.0
    assert int(grew_mib) < 80, f"info grew by {grew_mib} MiB on a 191 MiB tensor"


# ------------------------------------------------------------------ 6. notebooks never into the package

def test_notebooks_are_never_copied_into_the_package_or_its_data(tmp_path, monkeypatch, capsys):
    from chatvec_lab.io import resources

    package, data = tmp_path / "pkg", tmp_path / "data"
    for folder in (package / "sub", data / "toy", data / "prompts"):
        folder.mkdir(parents=True)
    (package / "sub" / "module.py").write_text("x = 1\n")
    real_notebooks = resources.notebook_dir()
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)  # stand-ins: a regression writes here, not there
    monkeypatch.setattr(resources, "notebook_dir", lambda: real_notebooks)
    monkeypatch.setattr(resources, "data_dir", lambda: data)
    (tmp_path / "link").symlink_to(package / "sub")
    for dest in (package, package / "sub", package / "new", data / "toy", data / "prompts" / "nb", tmp_path / "link"):
        rc, err = _cli(["notebooks", dest, "--overwrite"], capsys)
        _one_line_refusal(rc, err, "chatvec_lab")
    assert sorted(p.name for p in package.rglob("*")) == ["module.py", "sub"]
    assert sorted(p.name for p in data.rglob("*")) == ["prompts", "toy"]
    rc, err = _cli(["notebooks", tmp_path / "mine"], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------ 7. a size mismatch says what to do

def test_a_vocabulary_size_mismatch_names_the_embeddings_choices(toy_vector, tmp_path, capsys):
    rc, err = _cli(["apply", "--target", toy.path("cp-xvocab"), "--vector", toy_vector, "-o", tmp_path / "out",
                    "-q", "--no-lineage-check"], capsys)
    _one_line_refusal(rc, err, "vocabulary sizes differ", "--embeddings tokens|union|skip|shared")
    from chatvec_lab.cli import build_parser
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["apply"]._actions
                   if "--embeddings" in a.option_strings)
    assert all(c in err for c in choices if c != "error")


# ------------------------------------------------------------------ 8. every file handle closed

def test_merge_and_apply_leave_no_file_open(toy_vector, tmp_path, monkeypatch):
    from chatvec_lab import apply_vectors
    from chatvec_lab.core.merge import merge

    leaked = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: leaked.append(u.exc_value))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("error", ResourceWarning)
        a = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
        b = ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False)
        merge([(a, 1.0), (b, 1.0)], method="ties", density=0.5).save(tmp_path / "merged")
        del a, b
        gc.collect()
        apply_vectors(toy.path("cp"), [(ChatVector.load(tmp_path / "merged"), 1.0)], out=tmp_path / "out",
                      check_lineage=False)
        gc.collect()
    resource_warnings = [w for w in seen if issubclass(w.category, ResourceWarning)]
    assert not leaked and not resource_warnings, (leaked, [str(w.message) for w in resource_warnings])


def test_apply_refuses_to_truncate_an_integer_target_tensor(tmp_path):
    """Review round 3 (D1): a float delta added to an int8 target tensor was truncated, reported as added."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from chatvec_lab import ChatVector, apply_vectors, toy
    from chatvec_lab.errors import MismatchError
    target = tmp_path / "int8-target"
    shutil.copytree(toy.path("cp"), target)
    shard = next(p for p in target.iterdir() if p.suffix == ".safetensors")
    state = load_file(shard)
    name = next(n for n in state if "mlp.up_proj" in n)
    state[name] = (state[name].float() * 100).to(torch.int8)
    save_file(state, shard, metadata={"format": "pt"})
    before = shard.read_bytes()
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    with pytest.raises(MismatchError, match=f"{name}.*int8"):
        apply_vectors(target, [(cv, 1.0)], out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and shard.read_bytes() == before
    assert os.listdir(tmp_path) == ["int8-target"]


def test_errors_never_send_a_user_to_a_flag_the_command_lacks():
    """Review round 3 (L4): info/sweep/atlas told users to pass --allow-pickle / --embeddings, which they lack."""
    from chatvec_lab.cli import build_parser, flags_of_this_command
    parser = build_parser()
    for command in ("info", "sweep", "atlas"):
        line = flags_of_this_command("pass allow_pickle=True (--allow-pickle); or [--embeddings tokens]", parser, command)
        assert f"chatvec {command} has no --allow-pickle" in line and "chatvec apply" in line
    assert flags_of_this_command("x (--allow-pickle)", parser, "apply") == "x (--allow-pickle)"


@pytest.mark.parametrize("content", ["[1, 2]", "3", "{not json"])
def test_a_generation_config_that_is_not_an_object_is_one_line(tmp_path, content, capsys):
    """Review round 3 (D12): generation_config.json holding a JSON list gave a traceback and exit 1."""
    import shutil

    from chatvec_lab import toy
    from chatvec_lab.cli import main
    target = tmp_path / "cp"
    shutil.copytree(toy.path("cp"), target)
    (target / "generation_config.json").write_text(content)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hallo\n")
    cv = tmp_path / "cv"
    assert main(["extract", "--base", str(toy.path("base")), "--chat", str(toy.path("chat")), "-o", str(cv), "-q"]) == 0
    code = main(["sweep", "--target", str(target), "--vector", str(cv), "--alphas", "0", "--prompts", str(prompts),
                 "--max-new-tokens", "2", "--csv", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "generation_config.json" in err and "Traceback" not in err


def test_info_max_rows_must_be_positive(capsys):
    """Review round 3 (D18): `info --max-rows -1` printed half its output, then a pandas message."""
    from chatvec_lab import toy
    from chatvec_lab.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["info", str(toy.path("cp")), "--max-rows", "-1"])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and "--max-rows" in captured.err and captured.out == ""
