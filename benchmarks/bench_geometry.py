"""Benchmark the geometry pass: norms + cosines (+ sign agreement) of three saved vectors, streamed.

    python benchmarks/bench_geometry.py --work bench-work

Uses the synthetic checkpoints of bench_apply.py (built if missing), saves three float32 vectors
(chat − base, cp − base, chat − cp), then times ``vector_stats`` on them against the read floor (just
reading the three vectors' files) and reports peak RSS against the vectors' total size.

Each step runs in a fresh process. The ratio the target is about compares the pass itself: the clock runs
around the ``vector_stats`` call and around the read loop. What a process pays once is timed apart: loading
the compiled kernel (numba's first use in a process, ≈ 0.4 s) and, in the whole-process times printed beside
them, Python's start-up and importing torch, pandas and numba (≈ 1.5 s here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import folder_bytes, llama_config, measure, table, write_family  # noqa: E402

VECTORS = {"chat": ("base", "chat"), "lang": ("base", "cp"), "chat-vs-cp": ("cp", "chat")}


def run_floor(work: Path) -> None:
    start = time.perf_counter()
    buf = bytearray(64 * 1024**2)
    total = 0
    for key in VECTORS:
        for f in sorted((work / f"vec-{key}").glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    print(f"read {total} bytes")
    print(f"TIMED {time.perf_counter() - start:.3f}")


def run_warm(work: Path) -> None:
    """Compile the kernel for three vectors once (numba caches it on disk), as a first use would."""
    import torch
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.vector import ChatVector

    tiny = {k: ChatVector.from_tensors({"w": torch.randn(4, 4)}) for k in VECTORS}
    geometry.vector_stats(tiny)


def run_stats(work: Path) -> None:
    import torch
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core import kernels
    from chatvec_lab.core.vector import ChatVector

    vectors = {k: ChatVector.load(work / f"vec-{k}") for k in VECTORS}
    start = time.perf_counter()
    kernels.block_stats([torch.zeros(8) for _ in VECTORS])  # once per process: load the compiled kernel
    print(f"KERNEL_LOAD {time.perf_counter() - start:.3f}")
    start = time.perf_counter()
    stats = geometry.vector_stats(vectors)
    print(f"TIMED {time.perf_counter() - start:.3f}")
    print(geometry.cosine_matrix(stats).round(4).to_string())
    print(geometry.layer_norms(stats).head(3).to_string())


def timed(result: dict, key: str = "TIMED") -> float:
    return float(next(line.split()[1] for line in result["output"].splitlines() if line.startswith(key + " ")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-work")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work).resolve()
    if args.run:
        {"floor": run_floor, "warm": run_warm, "stats": run_stats}[args.run](work)
        return
    paths = write_family(work, llama_config(args.layers))
    from chatvec_lab.core.vector import ChatVector
    for key, (a, b) in VECTORS.items():
        if not (work / f"vec-{key}" / "chatvec.json").is_file():
            ChatVector.from_models(paths[a], paths[b], hash_files=False).save(work / f"vec-{key}",
                                                                              max_shard_bytes=1024**3)
    total = sum(folder_bytes(work / f"vec-{k}") for k in VECTORS)
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)]
    measure(me + ["--run", "floor"])  # warm the page cache
    compile_run = measure(me + ["--run", "warm"])
    floor = measure(me + ["--run", "floor"])
    stats = measure(me + ["--run", "stats"])
    print("\n".join(line for line in stats["output"].splitlines() if not line.startswith(("TIMED ", "KERNEL_LOAD "))))
    rows = [{"step": "read floor (3 vectors)", "timed (s)": f"{timed(floor):.2f}",
             "whole process (s)": f"{floor['wall_s']:.2f}", "peak RSS (MiB)": f"{floor['peak_rss_mib']:.0f}"},
            {"step": "vector_stats: norms + cosines + signs", "timed (s)": f"{timed(stats):.2f}",
             "whole process (s)": f"{stats['wall_s']:.2f}", "peak RSS (MiB)": f"{stats['peak_rss_mib']:.0f}"}]
    print(f"three float32 vectors, {total / 1e9:.2f} GB in all; compiling the kernel (first use on a machine, "
          f"cached on disk after) took a {compile_run['wall_s']:.1f} s process; loading it, once per process, "
          f"{timed(stats, 'KERNEL_LOAD'):.2f} s (not in the pass)")
    print(table(rows, ["step", "timed (s)", "whole process (s)", "peak RSS (MiB)"]))
    print(f"pass / read floor: {timed(stats) / timed(floor):.2f} (target ≤ 1.5); "
          f"whole processes: {stats['wall_s'] / floor['wall_s']:.2f}")
    print(f"peak RSS / vectors' size: {stats['peak_rss_mib'] * 1024**2 / total:.3f} (target < 0.10)")


if __name__ == "__main__":
    main()
