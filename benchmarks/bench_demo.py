"""What `chatvec demo` costs a first-time user: wall seconds, CPU seconds of the whole process tree, peak RSS.

    python benchmarks/bench_demo.py                  # the default demo, once
    python benchmarks/bench_demo.py --quick --full --repeat 2
    python benchmarks/bench_demo.py --full --skip-default

Runs ``chatvec demo -o TMP [flags]`` in a subprocess (``OMP_NUM_THREADS=1`` unless set) and measures it from
outside: wall-clock seconds, CPU seconds from ``resource.getrusage(RUSAGE_CHILDREN)`` before and after (the
demo and every process it started and waited for, the notebook kernels included) and the largest resident
set of any of them (``ru_maxrss``). Also notes the load average before the run and the demo's own last line
(its wall and CPU seconds as it reports them). Appends one JSON line per run to
``benchmarks/results/bench_demo.jsonl`` and prints it. Nothing is asserted; the budget for the default run is
200 CPU seconds (issue 22).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_demo.jsonl"
BUDGET_CPU_S = 200


def _chatvec() -> list[str]:
    exe = shutil.which("chatvec")
    return [exe] if exe else [sys.executable, "-m", "chatvec_lab.cli"]


def measure(flags: list[str], keep: Path | None = None) -> dict:
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    out = keep or work / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        proc = subprocess.run([*_chatvec(), "demo", "-o", str(out), "--overwrite", *flags], cwd=work, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [l for l in proc.stdout.splitlines() if " run: " in l and "CPU" in l]
    return {"command": "chatvec demo " + " ".join(flags), "returncode": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "peak_rss_mib": round(after.ru_maxrss / 1024, 0),
            "demo_says": lines[-1] if lines else proc.stderr.strip().splitlines()[-1:],
            "load_before": round(load, 2), "cores": os.cpu_count(), "omp_num_threads": env["OMP_NUM_THREADS"],
            "bilingual_dir": env.get("CHATVEC_TOY_BILINGUAL_DIR", ""), "machine": platform.node(),
            "python": platform.python_version(), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "budget_cpu_s": BUDGET_CPU_S if "--full" not in flags else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also the full demo (--full), after the default")
    p.add_argument("--quick", action="store_true", help="also --quick")
    p.add_argument("--no-notebooks", action="store_true", help="pass --no-notebooks to every run")
    p.add_argument("--skip-default", action="store_true", help="only the sizes asked for (--quick, --full)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each command")
    p.add_argument("--keep", help="keep the last report of each size in this folder (default/, quick/, full/)")
    args = p.parse_args(argv)
    extra = ["--no-notebooks"] if args.no_notebooks else []
    commands = ([] if args.skip_default else [extra]) + ([["--quick", *extra]] if args.quick else []) + ([["--full", *extra]] if args.full else [])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for flags in commands:
        for _ in range(args.repeat):
            size = next((f[2:] for f in flags if f in ("--quick", "--full")), "default")
            keep = Path(args.keep).resolve() / size if args.keep else None
            row = measure(flags, keep)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            with RESULTS.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
