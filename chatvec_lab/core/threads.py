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
    if os.environ.get("OMP_NUM_THREADS", "").strip():  # set by the user (an empty value counts as unset)
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with torch_threads(1):
            yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


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
        raise UsageError(f"workers must be an integer from 1 to {MAX_WORKERS} (left out: the cores this process "
                         f"may use), not {workers!r}")
    return int(workers)


def ordered_results(jobs, workers: int, budget: int):
    """Run ``jobs`` on up to ``workers`` threads and yield each one's result in the jobs' order.

    A job is ``(cost, prepare)``: ``prepare()`` runs in the caller's thread when the job is taken (a merge reads its
    tensors there) and returns the function a worker runs. Jobs are taken while the costs of those taken and not
    yet yielded stay within ``budget`` (one is always taken when none is), up to ``4 × workers`` of them, so that a
    worker whose job ended early starts the next one instead of waiting for the job ahead of it. A merge that costs
    each tensor by its elements and budgets the largest tensor's holds no more tensors at once than the largest
    one alone. Torch's kernels release the GIL: independent tensors run on separate cores.

    An exception, raised by a job or by its ``prepare``, is raised where that job's result would have been yielded
    (so the first failing job in order is the one reported, whatever finished first); then, and when the consumer
    stops early (close the generator: ``contextlib.closing``), jobs not started are dropped and running ones are
    waited for, through a second interrupt too (no thread outlives the call). ``workers == 1`` runs each job in the
    caller's thread, as a plain loop."""
    if workers == 1:
        for _, prepare in jobs:
            yield prepare()()
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    pending, running, spent = iter(jobs), deque(), 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chatvec-merge")
    try:
        waiting, exhausted = None, False
        while True:
            while not exhausted and len(running) < 4 * workers:
                if waiting is None:
                    waiting = next(pending, None)
                    if waiting is None:
                        exhausted = True
                        break
                cost, prepare = waiting
                if running and spent + cost > budget:
                    break
                waiting = None
                try:
                    future = pool.submit(prepare())
                except Exception as e:  # raised in its turn, after the jobs ahead of it
                    future, exhausted = Future(), True
                    future.set_exception(e)
                running.append((future, cost))
                spent += cost
            if not running:
                return
            future, cost = running.popleft()
            result = future.result()
            spent -= cost
            yield result
            del result
    finally:
        _shut_down(pool)


def _shut_down(pool) -> None:
    """Drop the jobs not started and wait for the running ones. An interrupt while waiting (a second Ctrl-C) does
    not cut the wait short — a worker left inside torch when the interpreter exits aborts the process — and is
    raised once they are done."""
    pool.shutdown(wait=False, cancel_futures=True)
    late = None
    while True:
        try:
            pool.shutdown(wait=True)
            break
        except KeyboardInterrupt as e:
            late = e
    if late is not None:
        raise late
