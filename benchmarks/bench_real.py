"""Memory and speed of the interactive half (sweep, live model, generation) at a real model's scale.

    python benchmarks/bench_real.py --size tiny                   # a quick check: seconds
    python benchmarks/bench_real.py --size 0.36b                  # the random Qwen2 of ../shared/README.md
    python benchmarks/bench_real.py --size 1b --device cuda       # a TinyLlama-shaped 1.1B on a GPU
    python benchmarks/bench_real.py --size 0.36b --jobs sweep --package-root /tmp/old   # an older tree: before/after

The models are random (their replies are noise), but their shapes, bytes and dtype are a real model's: ``0.36b``
is a Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, tied embeddings) with the toy family's
tokenizer and chat template; ``1b`` a TinyLlama shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate
5632, untied): 0.97B with the toy's 2,048-token vocabulary (TinyLlama's 32,000 rows would make it 1.1B, but a
saved vector refuses embedding rows that belong to no token); ``tiny`` the 0.36b recipe at hidden 64. Each is built once, in bfloat16, into
``--cache`` (default ``benchmarks/.cache/bench_real``, out of git): ``base``; ``chat`` and ``cp`` = base + seeded
noise; ``vector`` = the saved chat vector (chat − base, float32, as ``chatvec extract`` writes it).

Each job runs in a child process whose peak RSS (the kernel's high-water mark, and the summed RSS of its process
tree, polled) is read; on CUDA also ``torch.cuda.max_memory_allocated``. Figures are multiples of the model's
bytes in memory (its parameters in the dtype it runs in):

- ``load``: the target loaded alone (``load_target``);
- ``sweep``: ``sweep(cp, vector, α ∈ {0, 1}, prompts, max_new_tokens)``, the default scorers, as ``chatvec
  sweep`` runs it; the CPU target is peak RSS ≤ 2.2 × model bytes + 600 MB (issue 25);
- ``alpha``: seconds per α change of a ``LiveModel`` (and per ``reset``);
- ``generate``: replies per second, all prompts in one batch against one prompt at a time;
- ``eval``: ``evaluate_harness`` on the shipped German/English task (``--eval-items`` items) at α ∈ {0, 1}, as
  ``chatvec eval`` runs it (lm-eval installed; not in the default ``--jobs``).

Results are printed and appended to ``benchmarks/results/bench_real.jsonl`` with the machine they ran on.
Timings are this machine's; no test asserts them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "bench_real.jsonl"
TOY_CP = ROOT / "data" / "toy" / "cp"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MB = 1e6

SIZES = {
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=None),
    "0.36b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=None),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=None),
}
PROMPTS = ["Erzähl mir etwas über die Liebe.", "Was weißt du über Geld?", "Sag etwas über Katzen.",
           "Wie wird das Wetter morgen?", "Erkläre mir bitte die Zeit.", "Was denkst du über Bücher?",
           "Gib mir einen Rat für die Arbeit.", "Was ist das Glück?", "Tell me something about money.",
           "What do you know about dogs?", "Erzähl mir einen Witz.", "Was bedeutet Freundschaft?",
           "Wie lerne ich am besten?", "Was ist wichtig im Leben?", "Beschreibe einen Sonntag.",
           "Warum ist der Himmel blau?"]
NOISE = {"chat": (1, 0.002), "cp": (2, 0.004)}  # member: (seed, standard deviation of the added noise)


# ---------------------------------------------------------------- building the family

def build(size: str, cache: Path, log=print) -> dict[str, Path]:
    """``{"base", "chat", "cp", "vector"}`` folders of the size's random family, built once into ``cache``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    root = Path(cache) / size
    paths = {k: root / k for k in ("base", "chat", "cp", "vector")}
    if all((p / ("chatvec.json" if k == "vector" else "config.json")).is_file() for k, p in paths.items()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TOY_CP))
    shape = dict(SIZES[size])
    model_type = shape.pop("model_type")
    shape["vocab_size"] = shape["vocab_size"] or len(tok)
    end, pad = tok.convert_tokens_to_ids("<|end|>"), tok.pad_token_id
    cfg = AutoConfig.for_model(model_type, **shape, max_position_embeddings=2048, bos_token_id=0,
                               eos_token_id=end, pad_token_id=pad)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=pad, do_sample=True,
                                               temperature=0.7, top_k=40)
    for member in ("base", "chat", "cp"):
        with torch.no_grad():
            if member != "base":
                seed, sigma = NOISE[member]
                g = torch.Generator().manual_seed(seed)
                for p in model.parameters():  # base + noise (each member from the base: the noise is undone below)
                    p.add_((torch.randn(p.shape, generator=g) * sigma).to(p.dtype))
            tmp = root / f".{member}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            for name in TOKENIZER_FILES:
                shutil.copy(TOY_CP / name, tmp / name)
            shutil.rmtree(paths[member], ignore_errors=True)
            tmp.rename(paths[member])
            if member != "base":  # back to the base exactly: reload it rather than subtract in bfloat16
                model = AutoModelForCausalLM.from_pretrained(str(paths["base"]), dtype=torch.bfloat16).eval()
        log(f"built {member} ({time.perf_counter() - start:.0f} s)")
    del model
    from chatvec_lab.core.vector import ChatVector

    tmp = root / ".vector.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ChatVector.from_models(paths["base"], paths["chat"], hash_files=False).save(tmp)
    shutil.rmtree(paths["vector"], ignore_errors=True)
    tmp.rename(paths["vector"])
    log(f"built vector ({time.perf_counter() - start:.0f} s)")
    return paths


# ---------------------------------------------------------------- measured children

def run_child(job: str, spec: dict, package_root: Path | None) -> dict:
    """Run ``job`` in a child process; its JSON result plus ``peak_rss`` (bytes: the larger of its own high-water
    mark and the summed RSS of its process tree, polled every 20 ms: ``common.watch_peak``) and ``wall_s``."""
    sys.path.insert(0, str(HERE))
    from common import watch_peak  # here, not at the top: common imports the lab, and --package-root picks which

    env = dict(os.environ)
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as out:
        result_file = out.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--spec", json.dumps(spec),
           "--result", result_file]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak = watch_peak(proc)
    reader.join()
    wall = time.perf_counter() - start
    try:
        result = json.loads(Path(result_file).read_text() or "{}")
    finally:
        os.unlink(result_file)
    if proc.returncode != 0:
        raise RuntimeError(f"child {job} failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    own = result.pop("ru_maxrss", 0)
    return {**result, "peak_rss": max(peak, own), "wall_s": round(wall, 2)}


def _supported(fn, **kwargs) -> dict:
    """The keywords ``fn`` takes (an older tree has no device / dtype / batch_size)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _cuda_stats(device: str) -> dict:
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    return {"cuda_max_allocated": torch.cuda.max_memory_allocated(), "gpu": torch.cuda.get_device_name()}


def _load(spec: dict):
    from chatvec_lab.behaviour.engines import load_target

    kwargs = _supported(load_target, device=spec["device"], dtype=spec["dtype"])
    return load_target(spec["cp"], **(kwargs if "device" in kwargs else {}))  # an older tree: its own default


def child(job: str, spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out: dict = {}
    prompts = (PROMPTS * 4)[:spec["prompts"]]
    if job == "load":
        model, _ = _load(spec)
        out["model_bytes"] = _model_bytes(model)
        out["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        out["device"] = str(next(model.parameters()).device)
    elif job == "sweep":
        from chatvec_lab.behaviour.sweep import sweep

        start = time.perf_counter()
        df = sweep(spec["cp"], {"chat": spec["vector"]}, [0.0, 1.0], prompts, max_new_tokens=spec["max_new_tokens"],
                   progress=False, **_supported(sweep, device=spec["device"], dtype=spec["dtype"],
                                                batch_size=spec.get("batch_size")))
        out["sweep_s"] = time.perf_counter() - start
        out["replies"] = len(df)
    elif job == "alpha":
        from chatvec_lab.core.live import LiveModel
        from chatvec_lab.core.vector import ChatVector

        model, _ = _load(spec)
        out["model_bytes"] = _model_bytes(model)
        start = time.perf_counter()
        live = LiveModel(model, {"chat": ChatVector.load(spec["vector"])},
                         **_supported(LiveModel, checkpoint=spec["cp"]))
        out["open_s"] = time.perf_counter() - start
        times = []
        for alpha in [0.5, 1.0, 0.25, 1.5][:max(2, spec.get("changes", 4))]:
            start = time.perf_counter()
            live.set(chat=alpha)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        live.reset()
        out["reset_s"] = time.perf_counter() - start
        out["alpha_change_s"] = sorted(times)[len(times) // 2]
    elif job == "generate":
        from chatvec_lab.behaviour.generation import generate

        model, tok = _load(spec)
        out["model_bytes"] = _model_bytes(model)
        kw = dict(max_new_tokens=spec["max_new_tokens"], seed=0)
        generate(model, tok, prompts[:2], **{**kw, "max_new_tokens": 2})  # warm up
        for label, size in (("batched", len(prompts)), ("unbatched", 1)):
            start = time.perf_counter()
            df = generate(model, tok, prompts, **kw, **_supported(generate, batch_size=size))
            seconds = time.perf_counter() - start
            out[f"replies_per_s_{label}"] = len(df) / seconds
            out[f"tokens_per_s_{label}"] = float(df["reply_tokens"].sum()) / seconds
    elif job == "eval":
        from chatvec_lab.behaviour.harness import evaluate_harness
        from chatvec_lab.io.resources import harness_task_dir

        start = time.perf_counter()
        df = evaluate_harness(spec["cp"], spec["vector"], [0.0, 1.0], ["chatvec_toy_de_en"],
                              include_path=harness_task_dir(), limit=spec.get("eval_items", 20), device=spec["device"],
                              dtype=spec["dtype"], bootstrap_iters=0, progress=False)
        out["eval_s"] = time.perf_counter() - start
        out["eval_items"] = spec.get("eval_items", 20)
        out["eval_rows"] = len(df)
    else:
        raise SystemExit(f"unknown job {job}")
    out.update(_cuda_stats(spec["device"]))
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---------------------------------------------------------------- the report

def machine() -> dict:
    import psutil
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "ram_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, float16")
    p.add_argument("--jobs", default="load,sweep,alpha,generate")
    p.add_argument("--prompts", type=int, default=2, help="prompts of the sweep (the issue's measurement: 2)")
    p.add_argument("--gen-prompts", type=int, default=8, help="prompts of the batched/unbatched generation")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-items", type=int, default=20, help="items of the shipped harness task per α (eval job)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    p.add_argument("--cache", type=Path, default=HERE / ".cache" / "bench_real")
    p.add_argument("--package-root", type=Path, default=None,
                   help="a folder holding another chatvec_lab to measure (before/after)")
    p.add_argument("--label", default=None, help="a label for the results line (e.g. 'before')")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the results file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        Path(args.result).write_text(json.dumps(child(args.child, json.loads(args.spec))))
        return 0

    sys.path.insert(0, str(args.package_root or ROOT))
    paths = build(args.size, args.cache)
    spec = {"cp": str(paths["cp"]), "vector": str(paths["vector"]), "device": args.device, "dtype": args.dtype,
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "eval_items": args.eval_items}
    checkpoint_bytes = sum(f.stat().st_size for f in paths["cp"].glob("*.safetensors"))
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "size": args.size, "device": args.device,
              "dtype": args.dtype, "label": args.label, "package": str(args.package_root or ROOT),
              "commit": commit(ROOT), "checkpoint_bytes": checkpoint_bytes, "prompts": args.prompts,
              "max_new_tokens": args.max_new_tokens, "machine": machine(), "jobs": {}}
    model_bytes = None
    for job in [j.strip() for j in args.jobs.split(",") if j.strip()]:
        job_spec = {**spec, "prompts": args.gen_prompts} if job == "generate" else spec
        res = run_child(job, job_spec, args.package_root)
        model_bytes = res.get("model_bytes", model_bytes)
        record["jobs"][job] = res
        print(f"{job}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in res.items()), flush=True)
    model_bytes = model_bytes or checkpoint_bytes
    record["model_bytes"] = model_bytes
    print(f"\n{args.size} on {args.device} ({args.dtype}), model {model_bytes / MB:.0f} MB in memory "
          f"(checkpoint {checkpoint_bytes / MB:.0f} MB)")
    for job, res in record["jobs"].items():
        ratio = res["peak_rss"] / model_bytes
        res["checkpoint_ratio"] = res["peak_rss"] / checkpoint_bytes
        line = (f"  {job:9s} peak RSS {res['peak_rss'] / MB:8.0f} MB = {ratio:5.2f} × model "
                f"({res['checkpoint_ratio']:.2f} × checkpoint)")
        if "cuda_max_allocated" in res:
            res["cuda_ratio"] = res["cuda_max_allocated"] / model_bytes
            line += f"; device memory {res['cuda_max_allocated'] / MB:.0f} MB = {res['cuda_ratio']:.2f} × model"
        if job == "sweep":
            limit = 2.2 * model_bytes + 600 * MB
            res["target_bytes"], res["meets_target"] = limit, res["peak_rss"] <= limit
            verdict = "met" if res["meets_target"] else "MISSED"
            line += f"; target 2.2 × model + 600 MB = {limit / MB:.0f} MB: {verdict}"
            if model_bytes < 100 * MB:
                line += " (at this size the fixed cost of Python, torch and the scorers, ~0.6 GB, is all there is)"
            line += f"; {res['sweep_s']:.1f} s for {res['replies']} replies"
        if job == "alpha":
            line += (f"; {res['alpha_change_s']:.3f} s per α change, reset {res['reset_s']:.3f} s, "
                     f"opening {res['open_s']:.2f} s")
        if job == "generate":
            b, u = res["replies_per_s_batched"], res.get("replies_per_s_unbatched")
            line += f"; replies/s batched {b:.2f}, unbatched {u:.2f} (× {b / u:.1f})" if u else f"; {b:.2f} replies/s"
        if job == "eval":
            line += f"; {res['eval_s']:.1f} s for {res['eval_items']} items at 2 α values"
        res["ratio"] = ratio
        print(line)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and v > 10**6:
        return f"{v / MB:.0f}MB"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
