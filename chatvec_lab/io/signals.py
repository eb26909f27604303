"""Signals while an output is written: SIGINT, SIGTERM and SIGHUP become :class:`Interrupted` (a
KeyboardInterrupt), so a temporary folder is cleaned up and nothing half-written is published; inside
:func:`signals_held` they wait until the block is done. A signal is also remembered, so one whose exception Python
swallowed (raised inside a finaliser or a weakref callback) still stops the run at the next safe point
(:func:`check_interrupted`) and is reported by the command line. A second signal while the first is stopping the
run is only noted: the cleanup finishes (it waits for work in flight, a few seconds at most)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output was being written (the folder was cleaned up)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, so the temporary folder is cleaned
    up (inside :func:`signals_held` they wait). Handlers set by the application, and signals it ignores (a run
    under ``nohup`` ignores SIGHUP), are left alone. A signal is also remembered (:func:`received_signal`): one
    whose exception Python swallowed (raised inside a finaliser, say) still stops the output from being
    published."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _HELD["scopes"]:  # a new run: what interrupted an earlier one (in a notebook, say) is forgotten
        _HELD["received"] = None
    _HELD["scopes"] += 1
    saved = {}
    for name, default in (("SIGINT", signal.default_int_handler), ("SIGTERM", signal.SIG_DFL),
                          ("SIGHUP", signal.SIG_DFL)):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == default:
            saved[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        _HELD["scopes"] -= 1
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# Python runs signal handlers in the main thread only: flags are enough
_HELD = {"depth": 0, "pending": None, "received": None, "scopes": 0}


def _raise_interrupted(signum, frame):
    if _HELD["received"]:  # a second signal: the first is stopping the run already, and raising again would cut
        return             # its cleanup short (a merge's worker threads left running abort the process at exit)
    _HELD["received"] = signum
    if _HELD["depth"]:
        _HELD["pending"] = _HELD["pending"] or signum
        return
    raise Interrupted(signum)


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM/SIGHUP this process received while an output was open, even if its exception was
    lost; None if none."""
    return _HELD["received"]


def check_interrupted() -> None:
    """A safe point: raise :class:`Interrupted` if a signal arrived whose exception did not get through."""
    if _HELD["received"] and _HELD["scopes"] and not _HELD["depth"]:
        raise Interrupted(_HELD["received"])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within the block a signal that would interrupt waits; it interrupts once the block is done."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
    if not _HELD["depth"] and _HELD["pending"]:
        signum, _HELD["pending"] = _HELD["pending"], None
        raise Interrupted(signum)
