"""Why the demo runs torch on one thread: generation on the toy, idle and beside two CPU-bound processes.

    python benchmarks/bench_threads.py

CP generates 128 new tokens for 32 German prompts in a fresh process, three ways: torch's default (two
threads here), two threads with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning while
they wait), and ``OMP_NUM_THREADS=1``; first on an idle machine, then beside two busy-looping processes.
Prints wall and CPU seconds of the generation call; nothing is asserted.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
ROOT = str(Path(__file__).resolve().parents[1])
CHILD = r'''
import time, resource, sys, torch
from chatvec_lab import toy, apply_to_model, ChatVector
from chatvec_lab.behaviour.generation import generate
from chatvec_lab.toy.evaluate import prompt_sets
from transformers import AutoTokenizer
cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
m = apply_to_model(toy.path("cp"), [(cv, 0.0)])[0]  # CP itself
t = AutoTokenizer.from_pretrained(toy.path("cp"))
p = prompt_sets()["chat"][:32]
generate(m, t, p[:2], seed=0, max_new_tokens=4)
r0 = resource.getrusage(resource.RUSAGE_SELF); w = time.perf_counter()
out = generate(m, t, p, seed=0, max_new_tokens=128)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(f"threads={torch.get_num_threads()} wall={time.perf_counter()-w:5.1f}s cpu={(r1.ru_utime-r0.ru_utime)+(r1.ru_stime-r0.ru_stime):5.1f}s tokens={int(out.reply_tokens.sum())}", flush=True)
'''

def main() -> None:
    for load in (0, 2):
        hogs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(load)]
        time.sleep(1)
        for label, env in [("default", {}), ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
                           ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"})]:
            out = subprocess.run([PY, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
            print(f"load={load} {label:<26}", out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:], flush=True)
        for h in hogs:
            h.kill()


if __name__ == "__main__":
    main()
