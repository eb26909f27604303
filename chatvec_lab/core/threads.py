"""How many threads torch uses for the lab's own commands, and why one.

Torch's OpenMP threads spin while they wait for each other. On a machine whose cores are busy with other
work that spinning costs more than the second thread gains: beside two CPU-bound processes on 2 cores,
``apply`` of a 2.1 GB model took 19.5–28.9 s (24.7 CPU-s) with torch's two threads and 9.9–10.3 s (7.1 CPU-s)
with one; idle, one thread was as fast (4.9 s against 6.3 s; ``benchmarks/bench_apply.py --contention 2``).
Toy generation behaves the same (``benchmarks/bench_threads.py``). ``OMP_NUM_THREADS``, when set, wins.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def one_torch_thread():
    """Torch on one thread inside the block, and ``OMP_NUM_THREADS=1`` for processes started meanwhile (notebook
    kernels), unless ``OMP_NUM_THREADS`` is set already; both restored afterwards."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():  # set by the user (an empty value counts as unset)
        yield
        return
    threads, before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
        torch.set_num_threads(threads)
