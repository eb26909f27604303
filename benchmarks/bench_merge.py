"""Benchmark ``chatvec merge`` against mergekit's ``mergekit-yaml`` on one config: wall, peak RSS, agreement.

    python benchmarks/bench_merge.py --size small                         # seconds (tests/test_merge_cli.py runs it)
    python benchmarks/bench_merge.py --size full --models /work/s3/benchmodels    # four 2.5 GB models, minutes
    python benchmarks/bench_merge.py --size full --method task_arithmetic --models /work/s3/benchmodels

The models are synthetic Llama-shaped checkpoints built tensor by tensor with the helpers of ``common.py``
(``llama_config``, ``llama_tensors``; never a whole model in memory), in bfloat16 safetensors shards of 500 MB:
``base`` and three fine-tunes ``a``, ``b``, ``c`` = base + seeded noise (σ 0.002, 0.003, 0.004). ``full`` is 22
layers, hidden 2048, intermediate 5632, a 32,000-token vocabulary: 1.26 B parameters, 2.52 GB per model;
``small`` the same recipe at hidden 256 and 2 layers. They are built once into ``--models`` (keep it outside the
repository for ``full``: 10 GB) and reused.

One config, the same file for both tools: three sources and a base (``ties``: weights 1, 0.5, 0.3, densities
0.5, 0.5, 0.3; ``task_arithmetic``: the same weights), ``dtype: float32`` (both compute in float32: the lab
always does, mergekit does what ``dtype`` says) and ``out_dtype: bfloat16``. Each tool runs in its own process
(``chatvec merge CFG -o OUT --quiet --workers N``; ``mergekit-yaml CFG OUT --quiet -j N`` with its other CPU
options at their defaults: no lazy unpickle, no async write), both with ``OMP_NUM_THREADS=N``, N the cores each
may use (``--cores``, default all this process may): mergekit spends them on torch's threads within each
operation, chatvec on merging N tensors at once. The page cache is warm for both (one read of every input first).
Peak RSS is the larger of the process's high-water mark (``VmHWM``, which counts the mapped file pages it touched)
and its process tree's summed RSS (``common.watch_peak``; both tools run as one process); CPU seconds cover the
tree (``RUSAGE_CHILDREN``). Then the
two outputs are compared tensor by tensor: max |chatvec − mergekit| and the share of elements exactly equal.

The goal (issue 26): chatvec's wall ≤ 0.5 × mergekit's and its peak RSS ≤ mergekit's. Results are printed and
appended to ``benchmarks/results/bench_merge.jsonl`` with the machine and its load average before and after each
run (a shared machine stretches wall times; CPU seconds are printed too). No test asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import folder_bytes, llama_config, llama_tensors, measure, table  # noqa: E402

RESULTS = HERE / "results" / "bench_merge.jsonl"
SIZES = {"small": dict(layers=2, hidden=256, intermediate=704, vocab=2048),
         "full": dict(layers=22, hidden=2048, intermediate=5632, vocab=32000)}
MEMBERS = {"base": None, "a": (1, 0.002), "b": (2, 0.003), "c": (3, 0.004)}  # member: (seed, σ of its noise)
SOURCES = {"a": (1.0, 0.5), "b": (0.5, 0.5), "c": (0.3, 0.3)}  # source: (weight, density)
GOAL_WALL, GOAL_RSS = 0.5, 1.0


def build(size: str, models: Path, log=print) -> dict[str, Path]:
    """The four members of ``size``, built once into ``models/size`` (tensor by tensor) and reused."""
    import torch

    from chatvec_lab.io.shards import ShardedSafetensorsWriter

    root = Path(models) / size
    paths = {m: root / m for m in MEMBERS}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    s = SIZES[size]
    cfg = llama_config(s["layers"], s["hidden"], s["intermediate"], s["vocab"])
    names = llama_tensors(cfg)
    plan = [(n, shape, torch.bfloat16) for n, shape in names]
    start = time.perf_counter()
    tmp = {m: root / f".{m}.partial" for m in MEMBERS}
    writers = {}
    for m, folder in tmp.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        writers[m] = ShardedSafetensorsWriter(folder, plan, max_shard_bytes=500 * 1024**2)
    gens = {m: torch.Generator().manual_seed(spec[0] if spec else 0) for m, spec in MEMBERS.items()}
    for name, shape in names:
        base = torch.randn(shape, generator=gens["base"]) * 0.02 if len(shape) > 1 else torch.ones(shape)
        for m, spec in MEMBERS.items():
            value = base if spec is None else base + torch.randn(shape, generator=gens[m]) * spec[1]
            writers[m].write(name, value.to(torch.bfloat16))
    for m, folder in tmp.items():
        writers[m].close()
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.rmtree(paths[m], ignore_errors=True)
        folder.rename(paths[m])
    log(f"built {len(MEMBERS)} models of {size} in {root} ({time.perf_counter() - start:.0f} s)")
    return paths


def config_text(paths: dict[str, Path], method: str) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for m, (weight, density) in SOURCES.items():
        lines += [f"  - model: {paths[m]}", "    parameters:", f"      weight: {weight}"]
        if method == "ties":
            lines.append(f"      density: {density}")
    return "\n".join(lines + ["dtype: float32", "out_dtype: bfloat16", ""])


def warm(paths: dict[str, Path]) -> None:
    buf = bytearray(64 * 1024**2)
    for folder in paths.values():
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def agreement(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: the largest |ours − theirs| (float32) and the share of elements exactly equal."""
    import torch

    from chatvec_lab.io.sources import open_weights

    a, b = open_weights(ours), open_weights(theirs)
    try:
        names = list(a.keys())
        if set(names) != set(b.keys()):
            return {"same_names": False, "only_chatvec": sorted(set(names) - set(b.keys()))[:5],
                    "only_mergekit": sorted(set(b.keys()) - set(names))[:5]}
        worst, equal, total, dtypes = 0.0, 0, 0, set()
        for n in names:
            x, y = a[n], b[n]
            dtypes.add((str(x.dtype), str(y.dtype)))
            if tuple(x.shape) != tuple(y.shape):
                return {"same_names": True, "same_shapes": False, "tensor": n}
            worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
            equal += int((x == y).sum())
            total += x.numel()
        return {"same_names": True, "same_shapes": True, "tensors": len(names), "elements": total,
                "max_abs_diff": worst, "equal_fraction": equal / total,
                "dtypes": sorted({f"{p}/{q}" for p, q in dtypes})}
    finally:
        a.close()
        b.close()


def tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def main(argv=None) -> int:
    from bench_real import commit, machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--method", choices=["ties", "task_arithmetic"], default="ties")
    p.add_argument("--models", type=Path, default=HERE / ".cache" / "bench_merge",
                   help="where the synthetic models are built once (full: 10 GB; keep it outside the repository)")
    p.add_argument("--work", type=Path, default=None, help="where the two outputs go (default: a folder in --models)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating")
    p.add_argument("--cores", type=int, default=None,
                   help="cores each tool may use (default: all this process may): OMP_NUM_THREADS for both, "
                        "chatvec's --workers, mergekit's -j (its torch threads)")
    p.add_argument("--mergekit", default=tool("mergekit-yaml"), help="path of mergekit-yaml")
    p.add_argument("--label", default=None)
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the results file")
    p.add_argument("--json", type=Path, default=None, help="also write the record to this file")
    args = p.parse_args(argv)
    if not args.mergekit:
        raise SystemExit("mergekit-yaml not found: pip install mergekit==0.1.5 (or pass --mergekit PATH)")
    paths = build(args.size, args.models)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.work or args.models))
    cfg = work / "merge.yml"
    cfg.write_text(config_text(paths, args.method))
    chatvec = tool("chatvec")
    chatvec = [chatvec] if chatvec else [sys.executable, "-m", "chatvec_lab.cli"]
    from chatvec_lab.core.threads import usable_cores

    cores = args.cores or usable_cores()
    plan = {"chatvec": lambda out: chatvec + ["merge", str(cfg), "-o", str(out), "--quiet", "--workers", str(cores)],
            "mergekit": lambda out: [args.mergekit, str(cfg), str(out), "--quiet", "-j", str(cores)]}
    env = {"OMP_NUM_THREADS": str(cores)}
    model_bytes = folder_bytes(paths["base"])
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "size": args.size, "method": args.method,
              "label": args.label, "cores": cores, "commit": commit(ROOT), "model_bytes": model_bytes, "inputs": len(MEMBERS),
              "config": cfg.read_text(), "machine": machine(), "runs": {k: [] for k in plan}}
    try:
        warm(paths)
        for i in range(args.repeats):
            for name, command in plan.items():
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                load_before = os.getloadavg()
                r = measure(command(out), env=env)
                r.pop("output")
                r["load_before"], r["load_after"] = [round(x, 2) for x in load_before], [
                    round(x, 2) for x in os.getloadavg()]
                r["output_bytes"] = folder_bytes(out)
                record["runs"][name].append(r)
                print(f"run {i + 1} {name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB (load {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f})",
                      flush=True)
        record["agreement"] = agreement(work / "out-chatvec", work / "out-mergekit")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in record["runs"].items()}
    wall = best["chatvec"]["wall_s"] / best["mergekit"]["wall_s"]
    rss = max(r["peak_rss_mib"] for r in record["runs"]["chatvec"]) / max(
        r["peak_rss_mib"] for r in record["runs"]["mergekit"])
    record |= {"wall_ratio": wall, "rss_ratio": rss, "meets_wall_goal": wall <= GOAL_WALL,
               "meets_rss_goal": rss <= GOAL_RSS}
    rows = [{"tool": k, "runs": len(v), "best wall (s)": f"{best[k]['wall_s']:.1f}",
             "CPU (s)": f"{best[k]['cpu_s']:.1f}",
             "peak RSS (MiB)": f"{max(r['peak_rss_mib'] for r in v):.0f}"} for k, v in record["runs"].items()]
    print(f"\n{args.method}, 3 sources + base, {len(MEMBERS)} × {model_bytes / 1e9:.2f} GB bfloat16 "
          f"({args.size}), dtype float32, out_dtype bfloat16, {cores} core(s) each")
    print(table(rows, ["tool", "runs", "best wall (s)", "CPU (s)", "peak RSS (MiB)"]))
    print(f"wall chatvec / mergekit: {wall:.2f} (goal ≤ {GOAL_WALL}: {'met' if wall <= GOAL_WALL else 'MISSED'}); "
          f"peak RSS chatvec / mergekit: {rss:.2f} (goal ≤ {GOAL_RSS}: {'met' if rss <= GOAL_RSS else 'MISSED'})")
    ag = record["agreement"]
    if ag.get("same_shapes"):
        print(f"agreement: max |chatvec − mergekit| = {ag['max_abs_diff']:.3g}, "
              f"{ag['equal_fraction']:.6f} of {ag['elements']:,} elements exactly equal ({ag['tensors']} tensors)")
    else:
        print(f"agreement: the outputs differ in names or shapes: {ag}")
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
