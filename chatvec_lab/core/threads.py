"""How many threads torch uses for the lab's own commands, and why one.

Torch's OpenMP threads spin while they wait for each other. On a machine whose cores are busy with other
work that spinning costs more than the second thread gains: beside two CPU-bound processes on 2 cores,
``apply`` of a 2.1 GB model took 19.5–28.9 s (24.7 CPU-s) with torch's two threads and 9.9–10.3 s (7.1 CPU-s)
with one; idle, one thread was as fast (4.9 s against 6.3 s; ``benchmarks/bench_apply.py --contention 2``).
Toy generation behaves the same (``benchmarks/bench_threads.py``). ``OMP_NUM_THREADS``, when set, wins.

Where the work splits into independent pieces (a merge's tensors), the cores go to the pieces instead:
``ordered_results`` runs jobs on worker threads, each on one torch thread (``torch_threads``), and hands the
results back in order.
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


@contextmanager
def torch_threads(n: int):
    """Torch's threads per operation set to ``n`` inside the block (threads started inside take it too), restored
    afterwards. Tensors merged on several workers each use one: two levels of threads would spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system says; else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_WORKERS = 1024


def check_workers(workers) -> int:
    """``None`` → ``usable_cores()``; else an integer from 1 to ``MAX_WORKERS``."""
    import numbers

    from chatvec_lab.errors import UsageError

    if workers is None:
        return usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers must be an integer from 1 to {MAX_WORKERS} (or None: the usable cores), "
                         f"not {workers!r}")
    return int(workers)


def ordered_results(jobs, workers: int, budget: int):
    """Run ``jobs`` (an iterable of ``(function, cost)``, taken one at a time) on up to ``workers`` threads and
    yield each function's result in the jobs' order.

    The costs in flight (jobs taken and not yet yielded) stay within ``budget`` (a job is always taken when nothing
    else is in flight), so a merge that costs each tensor by its elements and budgets the largest tensor's holds no
    more at once than one tensor at a time would at its peak. Jobs are taken ahead, up to ``4 × workers``, so that
    a worker whose job ended early starts the next one instead of waiting for the job ahead of it to be yielded.
    Torch's kernels release the GIL: independent tensors run on separate cores. A job's
    exception is raised where its result would have been yielded; then, and when the consumer stops early (close
    the generator: ``contextlib.closing``), jobs not started are dropped and running ones finished first (no thread
    outlives the call). ``workers == 1`` runs each job in the caller's thread, as a plain loop."""
    if workers == 1:
        for function, _ in jobs:
            yield function()
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending, running, spent = iter(jobs), deque(), 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chatvec")
    try:
        waiting = None
        while True:
            while len(running) < 4 * workers:
                if waiting is None:
                    waiting = next(pending, None)
                    if waiting is None:
                        break
                function, cost = waiting
                if running and spent + cost > budget:
                    break
                running.append((pool.submit(function), cost))
                spent += cost
                waiting = None
            if not running:
                return
            future, cost = running.popleft()
            result = future.result()
            spent -= cost
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
