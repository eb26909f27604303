"""Benchmark the geometry pass: norms + cosines (+ sign agreement) of three saved vectors, streamed.

    python benchmarks/bench_geometry.py --work bench-work

Uses the synthetic checkpoints of bench_apply.py (built if missing), saves three float32 vectors
(chat − base, cp − base, chat − cp), then times ``vector_stats`` on them against the read floor (just
reading the three vectors' files) and reports peak RSS against the vectors' total size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import folder_bytes, llama_config, measure, table, write_family  # noqa: E402

VECTORS = {"chat": ("base", "chat"), "lang": ("base", "cp"), "chat-vs-cp": ("cp", "chat")}


def run_floor(work: Path) -> None:
    buf = bytearray(64 * 1024**2)
    total = 0
    for key in VECTORS:
        for f in sorted((work / f"vec-{key}").glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    print(f"read {total} bytes")


def run_stats(work: Path) -> None:
    from chatvec_lab import geometry
    from chatvec_lab.vector import ChatVector

    stats = geometry.vector_stats({k: ChatVector.load(work / f"vec-{k}") for k in VECTORS})
    print(geometry.cosine_matrix(stats).round(4).to_string())
    print(geometry.layer_norms(stats).head(3).to_string())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-work")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work).resolve()
    if args.run:
        {"floor": run_floor, "stats": run_stats}[args.run](work)
        return
    paths = write_family(work, llama_config(args.layers))
    from chatvec_lab.vector import ChatVector
    for key, (a, b) in VECTORS.items():
        if not (work / f"vec-{key}" / "chatvec.json").is_file():
            ChatVector.from_models(paths[a], paths[b], hash_files=False).save(work / f"vec-{key}",
                                                                              max_shard_bytes=1024**3)
    total = sum(folder_bytes(work / f"vec-{k}") for k in VECTORS)
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)]
    measure(me + ["--run", "floor"])  # warm the page cache
    floor = measure(me + ["--run", "floor"])
    stats = measure(me + ["--run", "stats"])
    print(stats["output"])
    rows = [{"step": "read floor (3 vectors)", "wall (s)": f"{floor['wall_s']:.1f}",
             "peak RSS (MiB)": f"{floor['peak_rss_mib']:.0f}"},
            {"step": "vector_stats: norms + cosines + signs", "wall (s)": f"{stats['wall_s']:.1f}",
             "peak RSS (MiB)": f"{stats['peak_rss_mib']:.0f}"}]
    print(f"three float32 vectors, {total / 1e9:.2f} GB in all")
    print(table(rows, ["step", "wall (s)", "peak RSS (MiB)"]))
    print(f"wall / read floor: {stats['wall_s'] / floor['wall_s']:.2f} (target ≤ 1.5)")
    print(f"peak RSS / vectors' size: {stats['peak_rss_mib'] * 1024**2 / total:.3f} (target < 0.10)")


if __name__ == "__main__":
    main()
