"""Real models' half of the lab: device and dtype, a live model that costs one model, batched generation.

At toy scale: the live model at α equals ``apply_vectors`` at α bit for bit (float32 and bfloat16), resets bit
for bit and holds no copy of the target when the checkpoint can give the values back; batched greedy replies are
those of one prompt at a time; sampled replies depend on their prompt and seed only. The slow test repeats the
exactness at 0.36B (the random Qwen2 of ``benchmarks/bench_real.py``). No timing is asserted here.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from chatvec_lab import ChatVector, apply_vectors, toy
from chatvec_lab.behaviour.engines import load_target
from chatvec_lab.behaviour.generation import default_batch_size, generate, row_bytes
from chatvec_lab.core.live import LiveModel
from chatvec_lab.errors import UsageError
from chatvec_lab.io.devices import checkpoint_dtype, resolve_device, resolve_dtype
from chatvec_lab.io.sources import module_state, open_weights

PROMPTS = ["Erzähl mir etwas über die Liebe.", "Du bist ein Idiot.", "Tell me something about money.",
           "Was weißt du über Geld und über das Glück in der großen weiten Welt?"]
BITS = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(BITS[t.element_size()])


def assert_same_bits(model, weights) -> None:
    """Every tensor of ``weights`` (a folder or a state) equals the model's, bit for bit, in the model's dtype."""
    source = open_weights(weights)
    state = module_state(model)
    for name in source.keys():
        got, want = state[name], source.get(name)
        assert got.dtype == want.dtype, name
        assert torch.equal(bits(got), bits(want)), f"{name} differs"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """The chat vector saved (memory-mapped shards) and chat-alt − base read lazily from the two models."""
    folder = tmp_path_factory.mktemp("vec") / "cv"
    ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).save(folder)
    return ChatVector.load(folder), ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False)


# ---------------------------------------------------------------- device and dtype

def test_devices_resolve_with_hf_conventions():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("gpu", "cuda:x", "", 3):
        with pytest.raises(UsageError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UsageError, match="no CUDA device") as e:
                resolve_device(name)
            assert "\n" not in str(e.value)
    else:
        with pytest.raises(UsageError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_dtypes_resolve_to_the_checkpoints_own(tmp_path):
    assert resolve_dtype("auto", toy.path("cp")) == torch.bfloat16  # the toy family is stored in bfloat16
    assert resolve_dtype("float32", toy.path("cp")) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.float32) == torch.float32
    assert resolve_dtype("auto") == torch.float32  # nothing to tell it by
    for bad in ("int8", "float64", "fast"):
        with pytest.raises(UsageError, match="not one of auto"):
            resolve_dtype(bad)
    # no dtype in config.json: the safetensors headers tell
    folder = tmp_path / "cp"
    shutil.copytree(toy.path("cp"), folder)
    text = (folder / "config.json").read_text().replace('"dtype": "bfloat16",', "")
    (folder / "config.json").write_text(text)
    assert "dtype" not in text and checkpoint_dtype(folder) == torch.bfloat16
    model, _ = toy.load("cp")
    assert checkpoint_dtype(model) == torch.float32


def test_load_target_runs_where_and_how_asked():
    model, _ = load_target(toy.path("cp"))
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    model, _ = load_target(toy.path("cp"), device="cpu", dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            load_target(toy.path("cp"), device="cuda")


def test_a_sweep_on_a_missing_gpu_is_refused_before_any_work(vectors):
    from chatvec_lab.behaviour.sweep import sweep

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no CUDA device"):
        sweep(toy.path("cp"), {"chat": vectors[0]}, [0.0], PROMPTS[:1], device="cuda", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["sweep", "atlas", "demo"])
def test_the_cli_refuses_a_missing_gpu_in_one_line(vectors, tmp_path, capsys, command):
    from chatvec_lab.cli import main

    folder = tmp_path / "cv"
    vectors[0].save(folder)
    (tmp_path / "p.txt").write_text("Hallo\n")
    common = ["--target", str(toy.path("cp")), "--vector", str(folder), "--prompts", str(tmp_path / "p.txt")]
    args = {"sweep": ["sweep", *common, "--csv", str(tmp_path / "s.csv")],
            "atlas": ["atlas", *common, "-o", str(tmp_path / "atlas")],
            "demo": ["demo", "-o", str(tmp_path / "report"), "--no-notebooks"]}[command]
    assert main([*args, "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "no CUDA device" in err and "Traceback" not in err, err
    assert not any((tmp_path / n).exists() for n in ("s.csv", "atlas", "report"))
    assert main([*args, "--dtype", "int8", "-q"]) == 2
    assert "dtype 'int8' is not one of" in capsys.readouterr().err


# ---------------------------------------------------------------- the live model

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_live_model_equals_apply_vectors_bit_for_bit(vectors, tmp_path, dtype):
    cv, alt = vectors
    model, _ = load_target(toy.path("cp"), dtype=dtype)
    before = {k: v.clone() for k, v in module_state(model).items()}
    live = LiveModel(model, {"chat": cv, "alt": alt})
    assert live.kept_bytes == 0 and live.original == {}  # the checkpoint gives every value back: no copy held
    target = toy.path("cp")
    if dtype == "float32":  # apply writes the target's dtype: a float32 copy of CP (its values exactly)
        target = tmp_path / "cp32"
        model.save_pretrained(target)
    for point, pairs in [({"chat": 0.7}, [(cv, 0.7)]),
                         ({"chat": 1.3, "alt": {"self_attn": -0.4, "mlp": 0.9}},
                          [(cv, 1.3), (alt, {"self_attn": -0.4, "mlp": 0.9})])]:
        live.set({"alt": 0.0, **point})
        out = tmp_path / f"out-{len(pairs)}"
        apply_vectors(target, pairs, out, check_lineage=False)
        assert_same_bits(model, out)
    live.reset()
    assert all(torch.equal(bits(t), bits(before[k])) for k, t in module_state(model).items())
    if dtype == "bfloat16":
        assert_same_bits(model, toy.path("cp"))


def test_live_model_keeps_only_what_the_checkpoint_cannot_give_back(vectors):
    cv, _ = vectors
    model, _ = toy.load("cp")
    name = "model.layers.1.mlp.down_proj.weight"
    param = module_state(model)[name]
    with torch.no_grad():
        param.add_(0.5)  # changed after loading: the checkpoint no longer holds the target's values
    changed = param.detach().clone()
    live = LiveModel(model, {"chat": cv})
    assert list(live.original) == [name] and live.kept_bytes == param.numel() * 4
    live.set(chat=1.0)
    live.reset()
    assert torch.equal(param.detach(), changed)  # back to the target as given, not to the file
    copies = LiveModel(model, {"chat": cv}, checkpoint=False)  # no checkpoint: a copy of what the vector touches
    assert copies.kept_bytes == sum(t.numel() * t.element_size() for t in copies.params.values())


# ---------------------------------------------------------------- batched generation

@pytest.mark.parametrize("member,dtype", [("cp", torch.float32), ("chat", torch.bfloat16)])
def test_batched_greedy_replies_are_those_of_one_prompt_at_a_time(member, dtype):
    model, tok = toy.load(member, dtype=dtype)
    batched = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=24)
    single = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=24, batch_size=1)
    assert batched["reply"].tolist() == single["reply"].tolist()
    assert batched["ended_turn"].tolist() == single["ended_turn"].tolist()
    assert batched["reply_tokens"].tolist() == single["reply_tokens"].tolist()
    assert len(set(batched["prompt_tokens"])) > 1  # the rows were padded


def test_sampled_replies_depend_on_prompt_and_seed_only():
    model, tok = toy.load("cp")
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=5, max_new_tokens=16)
    assert torch.equal(torch.get_rng_state(), state)  # per-row generators: the global RNG is left alone
    b = generate(model, tok, PROMPTS, seed=5, max_new_tokens=16, batch_size=1)
    c = generate(model, tok, PROMPTS[::-1] + ["Sag etwas über Katzen."], seed=5, max_new_tokens=16, batch_size=2)
    assert a["reply"].tolist() == b["reply"].tolist() == c["reply"].tolist()[3::-1]
    d = generate(model, tok, PROMPTS, seed=6, max_new_tokens=16)
    assert a["reply"].tolist() != d["reply"].tolist()
    repeats = generate(model, tok, [PROMPTS[0]] * 3, seed=5, max_new_tokens=16)
    assert repeats["reply"].iloc[0] == a["reply"].iloc[0] and repeats["reply"].nunique() > 1  # repeats differ


def test_the_default_batch_holds_every_prompt_within_a_cap():
    model, tok = toy.load("cp")
    assert default_batch_size(model, 12, 200) == 12
    assert default_batch_size(model, 10_000, 200) <= 64
    assert row_bytes(model, 200) > row_bytes(model, 100) > 0
    with pytest.raises(UsageError, match="batch_size"):
        generate(model, tok, PROMPTS, batch_size=0)


def test_a_sweep_does_not_depend_on_its_batch_size(vectors, tmp_path):
    from chatvec_lab.behaviour.sweep import sweep

    cv, _ = vectors
    kw = dict(scorers=("ended_turn",), max_new_tokens=8, progress=False, seeds=2)
    # in float32 (in bfloat16 a batch's shapes can change a rounding, and so now and then a sampled token)
    one = sweep(toy.path("cp"), {"chat": cv}, [0.0, 1.0], PROMPTS, batch_size=1, dtype="float32", **kw)
    all_ = sweep(toy.path("cp"), {"chat": cv}, [0.0, 1.0], PROMPTS, dtype="float32", **kw)
    assert one["reply"].tolist() == all_["reply"].tolist()
    # a cache keeps results per dtype: float32 replies are not served for a bfloat16 sweep
    f32 = sweep(toy.path("cp"), {"chat": cv}, [1.0], PROMPTS[:2], dtype="float32", cache_dir=tmp_path, **kw)
    bf16 = sweep(toy.path("cp"), {"chat": cv}, [1.0], PROMPTS[:2], cache_dir=tmp_path, **kw)
    assert len(list((tmp_path / "cells").iterdir())) == 4 and len(f32) == len(bf16) == 4


# ---------------------------------------------------------------- at a real model's scale

def _bench_real():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real.py"
    spec = importlib.util.spec_from_file_location("bench_real", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_live_model_at_036b_equals_apply_and_resets_bit_for_bit(tmp_path_factory):
    """The random 0.36B Qwen2 in bfloat16 (about a minute to build, 3 GB of disk; ``CHATVEC_BENCH_CACHE`` reuses
    a built one): live at α equals ``apply_vectors`` at α, and reset gives the checkpoint back, bit for bit."""
    cache = os.environ.get("CHATVEC_BENCH_CACHE") or tmp_path_factory.mktemp("bench")
    paths = _bench_real().build("0.36b", Path(cache), log=lambda *_: None)
    model, _ = load_target(paths["cp"])
    assert next(model.parameters()).dtype == torch.bfloat16
    live = LiveModel(model, {"chat": ChatVector.load(paths["vector"])})
    assert live.kept_bytes == 0
    live.set(chat=0.7)
    out = tmp_path_factory.mktemp("applied") / "out"
    apply_vectors(paths["cp"], [(paths["vector"], 0.7)], out, check_lineage=False)
    assert_same_bits(model, out)
    shutil.rmtree(out)
    live.reset()
    assert_same_bits(model, paths["cp"])
