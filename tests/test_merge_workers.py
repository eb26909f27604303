"""Merging tensors on several threads: the same bits as one at a time, in order, within the memory budget,
and an error or a stop leaves no thread running and no output."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_lab import toy
from chatvec_lab.core.threads import check_workers, ordered_results
from chatvec_lab.errors import ChatVecError, UsageError

T = toy.path("base").parent


def _config(method, models, base=T / "base", **extra):
    return {"models": [{"model": str(m), "parameters": p} for m, p in models], "merge_method": method,
            "base_model": str(base), "dtype": "float32", **extra}


def _weights(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(f)
    return out


def _threads():
    return {t.name for t in threading.enumerate() if t.name.startswith("chatvec-merge")}


@pytest.mark.parametrize("method, parameters", [
    ("ties", {"weight": 1.0, "density": 0.3}),
    ("dare_ties", {"weight": 0.7, "density": 0.5}),
    ("della", {"weight": 0.7, "density": 0.5, "epsilon": 0.1}),
    ("breadcrumbs", {"weight": 0.7, "density": 0.8, "gamma": 0.05}),
])
def test_one_worker_and_three_give_the_same_bits(tmp_path, method, parameters):
    from chatvec_lab.core.model_merge import merge_from_config

    config = _config(method, [(T / "chat", parameters), (T / "chat-alt", parameters)])
    one = _weights(merge_from_config(config, tmp_path / "one", workers=1, seed=5))
    three = _weights(merge_from_config(config, tmp_path / "three", workers=3, seed=5))
    assert list(one) == list(three)
    assert all(torch.equal(one[k], three[k]) for k in one)
    assert not _threads()


def test_the_report_sees_every_tensor_in_order_with_workers(tmp_path):
    from chatvec_lab.analysis.merge_report import MergeReport
    from chatvec_lab.core.model_merge import merge_from_config

    config = _config("ties", [(T / "chat", {"weight": 1.0, "density": 0.5}), (T / "chat-alt", {"weight": 0.5})])
    tables = []
    for workers in (1, 2):
        report = MergeReport(["chat", "chat-alt"])
        merge_from_config(config, tmp_path / f"w{workers}", observer=report, workers=workers)
        tables.append(report.table())
    assert tables[0].equals(tables[1])


def test_the_first_bad_tensor_in_order_is_named_and_nothing_is_written(tmp_path):
    """Two inputs hold a NaN: with workers racing, the message still names the earlier tensor of the plan."""
    from chatvec_lab.core.model_merge import merge_from_config

    bad = tmp_path / "bad"
    shutil.copytree(T / "chat", bad)
    weights = _weights(bad)
    by_size = sorted(weights, key=lambda n: -weights[n].numel())  # the merge's order: the largest tensor first
    sizes = sorted({w.numel() for w in weights.values()}, reverse=True)
    # a tensor of the second size and the first of the next smaller one: in flight together, the later one
    # (smaller) done first
    first = next(n for n in by_size if weights[n].numel() == sizes[1])
    later = next(n for n in by_size if weights[n].numel() == sizes[2])
    for name in (first, later):
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = float("nan")
    for f in bad.glob("*.safetensors"):
        f.unlink()
    save_file(weights, bad / "model.safetensors")
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    config = _config("ties", [(bad, {"weight": 1.0, "density": 0.5})])
    for workers in (1, 4):
        with pytest.raises(ChatVecError, match=repr(first)):
            merge_from_config(config, tmp_path / "out", workers=workers)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*tmp*"))
    assert not _threads()


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2", 10**6])
def test_workers_must_be_a_positive_integer(workers, tmp_path):
    from chatvec_lab.core.model_merge import merge_from_config

    with pytest.raises(UsageError, match="workers"):
        check_workers(workers)
    with pytest.raises(UsageError, match="workers"):
        merge_from_config(_config("ties", [(T / "chat", {"weight": 1.0})]), tmp_path / "m", workers=workers)
    assert not (tmp_path / "m").exists()


def test_workers_take_numpy_integers(tmp_path):
    import numpy as np

    assert check_workers(np.int64(3)) == 3 and type(check_workers(np.int64(3))) is int


def test_the_cli_takes_workers(tmp_path, capsys):
    import yaml

    from chatvec_lab.cli import main

    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config("ties", [(T / "chat", {"weight": 1.0, "density": 0.5})])))
    assert main(["merge", str(cfg), "-o", str(tmp_path / "m"), "--workers", "2", "--quiet"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert main(["merge", str(cfg), "-o", str(tmp_path / "n"), "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "workers" in err and "Traceback" not in err and not (tmp_path / "n").exists()


# ---------------------------------------------------------------------------------------- the scheduler itself


class _Meter:
    """Counts the cost of jobs taken (prepared: a merge's tensors read) and not yet handed back, and the jobs running."""

    def __init__(self):
        self.lock, self.held, self.peak, self.running, self.most = threading.Lock(), 0, 0, 0, 0

    def job(self, value, cost, seconds=0.01):
        def prepare():
            with self.lock:
                self.held += cost
                self.peak = max(self.peak, self.held)
            return run

        def run():
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
            return value, cost
        return cost, prepare

    def results(self, jobs, workers, budget):
        for value, cost in ordered_results(jobs, workers, budget):
            with self.lock:
                self.held -= cost
            yield value


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_results_come_in_order_within_the_budget(workers):
    meter = _Meter()
    costs = [10, 1, 1, 1, 10, 2, 2, 2, 2, 10, 1]
    out = list(meter.results((meter.job(i, c, 0.002 * (11 - i)) for i, c in enumerate(costs)), workers, 10))
    assert out == list(range(len(costs)))
    assert meter.peak <= 10 and meter.most <= workers
    if workers > 1:
        assert meter.most > 1  # it did run jobs at once
    assert not _threads()


def test_a_job_larger_than_the_budget_runs_alone():
    meter = _Meter()
    out = list(meter.results((meter.job(i, c) for i, c in enumerate([1, 50, 1, 1])), 4, 10))
    assert out == [0, 1, 2, 3] and meter.peak == 50


def test_a_failing_job_is_raised_at_its_place_and_later_jobs_stop():
    started = []

    def job(i):
        def run():
            started.append(i)
            time.sleep(0.01)
            if i == 3:
                raise ValueError("job 3")
            return i
        return 1, lambda: run

    seen = []
    with pytest.raises(ValueError, match="job 3"):
        for r in ordered_results((job(i) for i in range(100)), 2, 10):
            seen.append(r)
    assert seen == [0, 1, 2] and max(started) < 10 and not _threads()


def test_closing_early_drops_what_did_not_start():
    import contextlib

    created = []

    def jobs():
        for i in range(1000):
            created.append(i)
            yield 1, lambda i=i: lambda: (time.sleep(0.005), i)[1]

    with contextlib.closing(ordered_results(jobs(), 3, 10)) as results:
        for r in results:
            if r == 4:
                break
    assert len(created) < 20 and not _threads()


def test_a_failing_prepare_is_raised_in_its_turn():
    """A later job's read failing (a truncated file) does not hide an earlier job's own error."""
    def slow_error():
        time.sleep(0.2)
        raise ValueError("job 1")

    def broken():
        raise OSError("job 2: truncated file")

    jobs = [(1, lambda: lambda: 0), (1, lambda: slow_error), (1, broken), (1, lambda: lambda: 3)]
    seen = []
    with pytest.raises(ValueError, match="job 1"):
        for r in ordered_results(iter(jobs), 3, 10):
            seen.append(r)
    assert seen == [0] and not _threads()
    with pytest.raises(OSError, match="job 2"):
        list(ordered_results(iter([jobs[0], jobs[2], jobs[3]]), 3, 10))
    assert not _threads()


def test_a_second_interrupt_still_waits_for_the_workers():
    """Two Ctrl-C 150 ms apart while workers run: no worker outlives the call (one left inside torch at exit
    aborted the process: 'terminate called without an active exception')."""
    import os
    import signal

    jobs = [(1, lambda i=i: lambda: (time.sleep(0.6), i)[1]) for i in range(4)]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    timers = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGINT)) for t in (0.1, 0.25)]
    try:
        for t in timers:
            t.start()
        with pytest.raises(KeyboardInterrupt):
            list(ordered_results(iter(jobs), 2, 10))
        assert not _threads()
    finally:
        for t in timers:
            t.join()
        signal.signal(signal.SIGINT, before)
