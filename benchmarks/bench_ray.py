"""The toy sweep, local vs Ray: wall time, replies per second, and Ray's fixed overhead.

    python benchmarks/bench_ray.py [--prompts 32] [--seeds 2] [--alphas 0,0.5,1,1.5] [--max-new-tokens 64]

Grid: α × seeds cells over the German chat prompts, one cell = one α and one seed over all prompts. Runs, each
on a fresh grid (no cache): local with 1 and with 2 torch threads; Ray (``ray.init(num_cpus=2)`` on this
machine) with 1 actor and with 2 actors of one thread each. Ray's fixed overhead is measured apart: starting
Ray, and starting the actors (each loads CP and the vector itself) until the first cell can run. Every run's
table is compared with the local one-thread table (the same replies: same kernels, same batches).
Prints one line per run and the ratios; nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatvec_lab import ChatVector, toy  # noqa: E402
from chatvec_lab.behaviour.grid import RayExecutor  # noqa: E402
from chatvec_lab.behaviour.sweep import sweep  # noqa: E402
from chatvec_lab.toy.evaluate import prompt_sets  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--alphas", default="0,0.5,1,1.5")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    prompts = prompt_sets()["chat"][: args.prompts]
    vectors = {"chat": ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)}
    grid = dict(alphas=alphas, prompts=prompts, seeds=args.seeds, max_new_tokens=args.max_new_tokens,
                scorers=["ended_turn", "language"], progress=False)
    cells = len(alphas) * args.seeds
    rows = []

    def timed(label: str, threads: int, executor=None):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        df = sweep(toy.path("cp"), vectors, executor=executor, **grid)
        wall = time.perf_counter() - t0
        rows.append((label, wall, len(df)))
        print(f"{label:<34} {wall:7.1f} s  {len(df) / wall:6.2f} replies/s  ({cells} cells, {len(df)} replies)",
              flush=True)
        return df

    reference = timed("local, 1 torch thread", 1)
    timed("local, 2 torch threads", 2)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"{'ray.init(num_cpus=2)':<34} {time.perf_counter() - t0:7.1f} s", flush=True)
    startup = {}
    for actors in (1, 2):
        first = []
        started = time.perf_counter()
        executor = RayExecutor(actors=actors, threads_per_actor=1,
                               on_result=lambda *_: first.append(time.perf_counter()) if not first else None)
        df = timed(f"ray, {actors} actor{'s' if actors > 1 else ''} × 1 thread", 1, executor)
        startup[actors] = first[0] - started if first else float("nan")
        same = df.equals(reference)
        per_cell = rows[0][1] / cells
        print(f"{'':<34} first cell back after {startup[actors]:.1f} s (a local cell takes {per_cell:.1f} s: actor "
              f"start-up ≈ {startup[actors] - per_cell:.1f} s); table equal to local: {same}", flush=True)
    ray.shutdown()
    local1 = rows[0][1]
    print("\nratios (wall time vs local, 1 thread):")
    for label, wall, _ in rows:
        print(f"  {label:<34} {wall / local1:5.2f}×")


if __name__ == "__main__":
    main()
