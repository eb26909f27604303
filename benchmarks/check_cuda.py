"""The prepared GPU run (issue 25): the CUDA paths checked against the CPU, then a 1B-class model timed on the GPU.

    python benchmarks/check_cuda.py                          # on a GPU machine: ≈ 5-8 minutes
    python benchmarks/check_cuda.py --device cpu --size tiny --no-save   # the same script on a CPU: a dry run

1. **Toy sweep, CPU against ``--device``**: ``sweep`` of the toy CP + chat vector at α ∈ {0, 1}, greedy, float32,
   on 16 German prompts, once on the CPU and once on the device. Greedy replies can part where two logits are
   within float rounding of each other, so the check is on what the lab reports: the per-α turn-ending and German
   share differ by at most ``--tolerance`` (and the share of identical replies is printed).
2. **Toy atlas, CPU against ``--device``**: the atlas of four rows (layer 3, embeddings, lm_head, norms) at α = 1,
   greedy, float32; each (cell, design) row's turn-ending rate within ``--tolerance``.
3. **A 1B-class model on the device**: ``bench_real.py --size SIZE --device DEVICE`` with the jobs load, sweep,
   alpha, generate and eval (peak RSS and device memory as multiples of the model's bytes).

Prints one line per check and ``CHECK PASSED`` / ``CHECK FAILED``; appends a JSON line to
``benchmarks/results/check_cuda.jsonl`` with the machine. Exit 1 if a comparison fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "check_cuda.jsonl"
ATLAS_ROWS = ("layer 3", "embeddings", "lm_head", "norms")


def _settings(device: str) -> dict:
    return dict(device=device, dtype="float32", max_new_tokens=32, do_sample=False, progress=False)


def toy_sweep(device: str, prompts) -> "pd.DataFrame":
    from chatvec_lab import ChatVector, toy
    from chatvec_lab.behaviour.sweep import sweep

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    return sweep(toy.path("cp"), {"chat": cv}, [0.0, 1.0], prompts, **_settings(device))


def toy_atlas(device: str, prompts) -> "pd.DataFrame":
    from chatvec_lab import ChatVector, toy
    from chatvec_lab.behaviour.atlas import atlas, cells_of

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    cells = [c for c in cells_of(cv) if c.row in ATLAS_ROWS]
    return atlas(toy.path("cp"), cv, prompts, alphas=[1.0], cells=cells, **_settings(device))


def compare(cpu, dev, keys, metrics, tolerance: float) -> dict:
    a = cpu.groupby(keys)[metrics].mean()
    b = dev.groupby(keys)[metrics].mean()
    gap = float((a - b).abs().max().max())
    same = float((cpu["reply"].values == dev["reply"].values).mean()) if "reply" in cpu and len(cpu) == len(dev) \
        else float("nan")
    return {"rows": len(cpu), "max_gap": gap, "identical_replies": same, "passed": gap <= tolerance}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="1b", help="bench_real's model for step 3 (tiny, 0.36b, 1b)")
    p.add_argument("--tolerance", type=float, default=0.15, help="largest allowed gap in a rate (0-1)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--skip-bench", action="store_true", help="steps 1-2 only")
    p.add_argument("--no-save", action="store_true", help="print only (a dry run): append nothing to the results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(min(8, torch.get_num_threads()))
    from chatvec_lab.course.measuring import chat_prompts
    from chatvec_lab.io.devices import resolve_device

    device = str(resolve_device(args.device))  # a device this machine lacks: one line, before any work
    prompts = chat_prompts(args.prompts)
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device,
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "checks": {}}
    ok = True
    for name, run, keys, metrics in (
            ("toy sweep", toy_sweep, ["alpha"], ["ended_turn", "share_de"]),
            ("toy atlas", toy_atlas, ["cell", "design"], ["ended_turn"])):
        start = time.perf_counter()
        cpu = run("cpu", prompts)
        mid = time.perf_counter()
        dev = run(device, prompts)
        result = compare(cpu, dev, keys, metrics, args.tolerance)
        result.update(cpu_s=round(mid - start, 2), device_s=round(time.perf_counter() - mid, 2))
        record["checks"][name] = result
        ok &= result["passed"]
        print(f"{name}: {result['rows']} rows; largest gap in {', '.join(metrics)} {result['max_gap']:.3f} "
              f"(tolerance {args.tolerance}); identical replies {result['identical_replies']:.2f}; "
              f"CPU {result['cpu_s']} s, {device} {result['device_s']} s: {'ok' if result['passed'] else 'FAILED'}",
              flush=True)
    if not args.skip_bench:
        cmd = [sys.executable, str(HERE / "bench_real.py"), "--size", args.size, "--device", device,
               "--jobs", "load,sweep,alpha,generate,eval", "--label", "check_cuda", *(["--no-save"] if args.no_save else [])]
        print("$", " ".join(cmd), flush=True)
        record["bench_real_rc"] = subprocess.call(cmd)
        ok &= record["bench_real_rc"] == 0
    record["passed"] = ok
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    print("CHECK PASSED" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
