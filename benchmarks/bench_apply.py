"""Benchmark ``apply`` (CP + α·(chat − base)) on synthetic Llama-shaped checkpoints of ≥ 2 GB each.

    python benchmarks/bench_apply.py --work bench-work            # 18 layers: 2.1 GB per model (bf16)
    python benchmarks/bench_apply.py --work bench-work --mergekit /path/to/mergekit-yaml

Compares, in one run and on the same files (page cache warm for all):
  chatvec   apply_vectors(cp, ChatVector.from_models(base, chat)), streamed tensor by tensor;
  chatvec-plain  the same with the paging trick off (plain preads instead of private maps + madvise):
            what the trick is worth, measured;
  naive     the paper's scripts' way: the three models loaded whole with transformers, added, saved;
  mergekit  task_arithmetic, base = base, models cp (1.0) and chat (α), normalize: false;
  floor     the I/O floor: read the three inputs and write one output of the same size;
  extract   not an apply: ChatVector.from_models(base, chat).save(…), the float32 vector folder (twice the
            size of a bf16 model), streamed block by block; its peak RSS should not exceed chatvec apply's.
Each runs in its own process; peak RSS is that process's maximum resident set.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import folder_bytes, llama_config, measure, table, write_family  # noqa: E402


def run_floor(work: Path) -> None:
    total = 0
    for key in ("base", "chat", "cp"):
        for f in sorted((work / key).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(64 * 1024**2)
                while n := fh.readinto(buf):
                    total += n
    out = work / "floor-out.bin"
    size = folder_bytes(work / "cp")
    chunk = bytes(64 * 1024**2)
    with open(out, "wb") as fh:
        left = size
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    out.unlink()
    print(f"read {total} bytes, wrote {size}")


def run_chatvec(work: Path, alpha: float, plain_reads: bool = False) -> None:
    from chatvec_lab import ChatVector, apply_vectors

    if plain_reads:  # the paging trick off: every tensor read with one pread into its own buffer
        from chatvec_lab.io.sources import SafetensorsSource
        SafetensorsSource.MAP_AT_LEAST = 1 << 62

    vec = ChatVector.from_models(work / "base", work / "chat", hash_files=False)
    out = work / ("out-chatvec-plain" if plain_reads else "out-chatvec")
    report = apply_vectors(work / "cp", [(vec, alpha)], out, max_shard_bytes=500 * 1024**2)
    print(report.summary())


def run_extract(work: Path) -> None:
    from chatvec_lab import ChatVector

    vec = ChatVector.from_models(work / "base", work / "chat", hash_files=False)
    vec.save(work / "out-extract", max_shard_bytes=500 * 1024**2)
    print(f"extracted {len(vec)} tensors, {vec.parameters:,} parameters (float32)")


def run_naive(work: Path, alpha: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    models = {k: AutoModelForCausalLM.from_pretrained(str(work / k), dtype=torch.bfloat16) for k in ("base", "chat", "cp")}
    base, chat, cp = (dict(models[k].named_parameters()) for k in ("base", "chat", "cp"))
    with torch.no_grad():
        for name, p in cp.items():
            p.copy_(p.float() + alpha * (chat[name].float() - base[name].float()))
    models["cp"].save_pretrained(str(work / "out-naive"), max_shard_size="500MB")


def mergekit_config(work: Path, alpha: float) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {work / 'base'}\nmodels:\n"
            f"  - model: {work / 'cp'}\n    parameters:\n      weight: 1.0\n"
            f"  - model: {work / 'chat'}\n    parameters:\n      weight: {alpha}\n"
            "parameters:\n  normalize: false\ndtype: bfloat16\n")


def steadiness(args, work: Path) -> None:
    """apply beside N busy processes (a shared machine), alternating chatvec and mergekit runs."""
    import statistics
    import subprocess

    if not (work / "cp").is_dir():
        write_family(work, llama_config(args.layers))
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--alpha", str(args.alpha)]
    measure(me + ["--run", "floor"])  # page cache warm
    plan = {"chatvec": me + ["--run", "chatvec"], "chatvec-plain": me + ["--run", "chatvec-plain"]}
    if args.mergekit:
        cfg = work / "mergekit.yml"
        cfg.write_text(mergekit_config(work, args.alpha))
        plan["mergekit"] = [args.mergekit, str(cfg), str(work / "out-mergekit"), "--quiet"]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contention)]
    runs = {name: [] for name in plan}
    try:
        for i in range(args.repeats):
            for name, cmd in plan.items():
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                r = measure(cmd)
                shutil.rmtree(out, ignore_errors=True)
                runs[name].append(r)
                print(f"run {i + 1} {name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s", flush=True)
    finally:
        for proc in busy:
            proc.kill()
    rows = []
    for name, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        rows.append({"method": name, "runs": len(rs), "median wall (s)": f"{statistics.median(walls):.1f}",
                     "min (s)": f"{min(walls):.1f}", "max (s)": f"{max(walls):.1f}",
                     "max ÷ min": f"{max(walls) / min(walls):.2f}",
                     "median CPU-s": f"{statistics.median(r['cpu_s'] for r in rs):.1f}"})
    print(f"\napply beside {args.contention} CPU-bound processes, {args.repeats} runs each (alternating):")
    print(table(rows, ["method", "runs", "median wall (s)", "min (s)", "max (s)", "max ÷ min", "median CPU-s"]))
    if "mergekit" in runs:
        med = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
        print(f"median chatvec / mergekit: {med['chatvec'] / med['mergekit']:.2f} (target ≤ 1.0)")
    walls = [r["wall_s"] for r in runs["chatvec"]]
    print(f"chatvec max / min: {max(walls) / min(walls):.2f} (target ≤ 1.5)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-work")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml")
    p.add_argument("--skip", default="", help="comma-separated methods to skip")
    p.add_argument("--contention", type=int, default=0, metavar="N",
                   help="steadiness mode: run chatvec and mergekit --repeats times each beside N CPU-bound processes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work).resolve()
    if args.run:
        {"floor": lambda: run_floor(work), "chatvec": lambda: run_chatvec(work, args.alpha),
         "chatvec-plain": lambda: run_chatvec(work, args.alpha, plain_reads=True),
         "extract": lambda: run_extract(work), "naive": lambda: run_naive(work, args.alpha)}[args.run]()
        return
    if args.contention:
        steadiness(args, work)
        return

    t0 = time.perf_counter()
    write_family(work, llama_config(args.layers))
    size = folder_bytes(work / "cp")
    print(f"synthetic checkpoints: 3 × {size / 1e9:.2f} GB in {work} ({time.perf_counter() - t0:.0f} s to build)")
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--alpha", str(args.alpha)]
    measure(me + ["--run", "floor"])  # warm the page cache for everyone
    skip = set(args.skip.split(","))
    results = {}
    plan = [("floor", me + ["--run", "floor"]), ("chatvec", me + ["--run", "chatvec"]),
            ("chatvec-plain", me + ["--run", "chatvec-plain"]),
            ("extract", me + ["--run", "extract"]), ("naive", me + ["--run", "naive"])]
    if args.mergekit and "mergekit" not in skip:
        cfg = work / "mergekit.yml"
        cfg.write_text(mergekit_config(work, args.alpha))
        plan.append(("mergekit", [args.mergekit, str(cfg), str(work / "out-mergekit"), "--quiet"]))
    elif "mergekit" not in skip:
        print("mergekit not found: pip install mergekit (or pass --mergekit PATH) to include it")
    for name, cmd in plan:
        if name in skip:
            continue
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
        results[name] = measure(cmd)
        out = work / f"out-{name}"
        if out.exists():
            results[name]["output_gb"] = round(folder_bytes(out) / 1e9, 2)
            shutil.rmtree(out)
        print(f"{name}: {results[name]['wall_s']:.1f} s, peak RSS {results[name]['peak_rss_mib']:.0f} MiB", flush=True)

    cv = results["chatvec"]
    rows = []
    for name, r in results.items():
        label = "extract (fp32 vector, not an apply)" if name == "extract" else name
        rows.append({"method": label, "wall (s)": f"{r['wall_s']:.1f}", "peak RSS (MiB)": f"{r['peak_rss_mib']:.0f}",
                     "output (GB)": f"{r['output_gb']:.2f}" if "output_gb" in r else "",
                     "wall ÷ chatvec": f"{r['wall_s'] / cv['wall_s']:.2f}",
                     "RSS ÷ chatvec": f"{r['peak_rss_mib'] / cv['peak_rss_mib']:.2f}"})
    print()
    print(f"apply, 3 inputs × {size / 1e9:.2f} GB bf16 ({args.layers} layers, hidden 2048), α = {args.alpha}; "
          "extract: chat − base of 2 of them")
    print(table(rows, ["method", "wall (s)", "peak RSS (MiB)", "output (GB)", "wall ÷ chatvec", "RSS ÷ chatvec"]))
    print()
    if "extract" in results:
        print(f"peak RSS extract / chatvec apply: {results['extract']['peak_rss_mib'] / cv['peak_rss_mib']:.2f} "
              "(target ≤ 1.0)")
    if "naive" in results:
        print(f"peak RSS chatvec / naive: {cv['peak_rss_mib'] / results['naive']['peak_rss_mib']:.3f} (target ≤ 0.25)")
    if "mergekit" in results:
        print(f"wall chatvec / mergekit: {cv['wall_s'] / results['mergekit']['wall_s']:.2f} (target ≤ 1.0)")
    if "floor" in results:
        print(f"wall chatvec / I/O floor: {cv['wall_s'] / results['floor']['wall_s']:.2f} (target ≤ 1.5)")
    (work / "results-apply.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
