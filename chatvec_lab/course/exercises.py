"""Exercises for the notebooks: check your answer, ask for a hint; a solution only when you ask for one.

    from chatvec_lab.course import exercises as ex
    ex.show("turn_end_half")                           # the exercise, in words
    ex.check("turn_end_half", answer, cp=CP, ...)      # ✓, or ✗ with a hint (never the answer)
    ex.hint("turn_end_half")                           # every hint
    ex.solution("turn_end_half")                       # prints one solution (code), only when called
    ex.progress()                                      # what you have checked in this session
    ex.table()                                         # every exercise, by notebook

An answer of ``None`` or ``...`` (or a dict, list or tuple holding one) is "not answered yet": the check
says so and raises nothing, so a notebook with blank exercises still runs top to bottom.

Every check computes the true answer itself, from the models it is given (the toy family by default) and
with the settings the exercise names, so it stays right when the toy family is retrained or a notebook points
at real models; its ✓ message is written from the numbers it measured, never from numbers fixed in advance.
Measured rates are accepted within half a reply (a rounded number passes; one reply off does not), and a rate
over n replies must be a whole number of them over n (to 2 decimals): a rate read off a table measured on
other replies fails. Exercises whose answer a table in the notebook already shows ask for a choice of the
learner's own (a seed, the prompts, an α), passed to the check, which measures with that choice, so a number
copied from above fails. Other numbers are accepted within a tolerance set per exercise (a float32 computation
passes). Hints say where to look and what to compare, never the answer or the code that computes it. The
solutions are kept in ``chatvec_lab/course/_solutions.py``, away from the checks.

This module is what a notebook calls. The exercises themselves are in one module per notebook
(``ex01_quickstart`` … ``ex06_ablations`` for session one, ``ex07_arithmetic`` for session two); what an
exercise is and how its check judges an answer, in ``checking``; what the checks measure with (the toy family,
prompts, held-out text), in ``measuring``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from chatvec_lab.course import (ex01_quickstart, ex02_anatomy, ex03_sources, ex04_sweep, ex05_safety,
                                ex06_ablations, ex07_arithmetic)
from chatvec_lab.course.checking import Exercise, Wrong
from chatvec_lab.course.measuring import toy_path

__all__ = ["check", "show", "hint", "solution", "progress", "table", "names", "EXERCISES", "Result"]

# context keys that name a toy member: when not given, the member's folder (as toy.path() finds it)
_MODEL_KEYS = {"base": "base", "chat": "chat", "chat_alt": "chat-alt", "cp": "cp"}


# every exercise, in notebook order: name → Exercise
_NOTEBOOKS = (ex01_quickstart, ex02_anatomy, ex03_sources, ex04_sweep, ex05_safety, ex06_ablations,
              ex07_arithmetic)  # session one: 01-06; session two: 07
EXERCISES: dict[str, Exercise] = {ex.name: ex for notebook in _NOTEBOOKS for ex in notebook.EXERCISES}


# ---------------------------------------------------------------------------------------------- results


class Result:
    """What ``check`` found: ``ok`` is True (right), False (wrong) or None (not answered yet). Truthy only when
    right. Its message is printed by ``check``; in a notebook the object itself displays nothing more."""

    def __init__(self, name: str, ok: bool | None, message: str, answer: Any = None, context: dict | None = None):
        self.name, self.ok, self.message, self.answer = name, ok, message, answer
        self.context = dict(context or {})  # what the check was given besides the answer (models, seed, ...)

    def __bool__(self) -> bool:
        return self.ok is True

    def __repr__(self) -> str:
        return f"Result({self.name!r}, ok={self.ok})"

    def _ipython_display_(self) -> None:  # already printed by check()
        pass


class _Code(str):
    """Solution code: a str that a notebook does not display a second time."""

    def _ipython_display_(self) -> None:
        pass


_RESULTS: dict[str, Result] = {}
_TRUTHS: dict[tuple, Any] = {}


def names() -> list[str]:
    """Every exercise's name, in notebook order."""
    return list(EXERCISES)


def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def _context(ex: Exercise, given: dict) -> dict:
    unknown = sorted(set(given) - set(ex.params))
    if unknown:
        raise TypeError(f"exercise {ex.name!r} takes {', '.join(ex.params)}; not {', '.join(unknown)}")
    ctx = {**ex.params, **given}
    for key, member in _MODEL_KEYS.items():
        if key in ctx and ctx[key] is None:
            ctx[key] = toy_path(member)
    return ctx


def _unanswered(answer) -> bool:
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, dict):
        return not answer or any(_unanswered(v) for v in answer.values())
    if isinstance(answer, (list, tuple)):
        return not answer or any(_unanswered(v) for v in answer)
    return False


def _stamp(value) -> str:
    """A context value as a cache key; a model folder with its weights' sizes and times, so a retrained model
    is measured again."""
    if isinstance(value, (str, Path)) and Path(value).is_dir():
        files = sorted(Path(value).glob("*.safetensors"))
        return repr((str(value), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]))
    return repr(value)


def _truth(ex: Exercise, ctx: dict):
    key = (ex.name, tuple(sorted((k, _stamp(v)) for k, v in ctx.items())))
    if key not in _TRUTHS:
        _TRUTHS[key] = ex.truth(**ctx)
    return _TRUTHS[key]


def check(name: str, answer, **context) -> Result:
    """Check ``answer`` to exercise ``name``; prints ✓, ✗ with a hint, or "not answered yet".

    ``context``: the models and settings the exercise works on (``base=``, ``chat=``, ``cp=``, … and e.g.
    ``tensor=``); left out, the toy family and the exercise's own settings. Returns a :class:`Result`."""
    ex = _get(name)
    ctx = _context(ex, context)
    if _unanswered(answer):
        result = Result(name, None, f"… {name}: not answered yet. Replace the `...` with your answer and run the "
                                    f"cell again (the exercise: ex.show({name!r})).", answer, context)
    else:
        try:
            if ex.validate is not None:
                ex.validate(ctx)
            truth = _truth(ex, ctx)
            remark = ex.judge(answer, truth, ctx)
        except Wrong as wrong:
            result = Result(name, False, f"✗ {name}: not yet. {wrong}\n  More help: ex.hint({name!r}); "
                                         f"one solution: ex.solution({name!r}).", answer, context)
        else:
            result = Result(name, True, f"✓ {name}: right." + (f" {remark}" if remark else ""), answer, context)
    _RESULTS[name] = result
    print(result.message)
    return result


def show(name: str) -> None:
    """Print the exercise: its notebook, question and the settings its check uses."""
    ex = _get(name)
    settings = ", ".join(f"{k}={v!r}" if v is not None else f"{k}=(your choice, passed to the check)"
                         for k, v in ex.params.items() if k not in _MODEL_KEYS)
    print(f"{ex.name} (notebook {ex.notebook}): {ex.title}\n\n{ex.question}\n\ncheck settings: {settings}")


def hint(name: str) -> None:
    """Print every hint of an exercise (none of them gives the answer)."""
    ex = _get(name)
    for i, text in enumerate(ex.hints, 1):
        print(f"hint {i}: {text}")


def solution(name: str) -> str:
    """Print one solution to exercise ``name`` (the exercise cell, filled in) and return its code."""
    from chatvec_lab.course._solutions import SOLUTIONS

    _get(name)
    code = _Code(SOLUTIONS[name])
    print(f"# one solution to {name}: run it in place of the exercise cell\n{code}")
    return code


def progress() -> None:
    """Print every exercise with what ``check`` said about it in this session (✓, ✗, … or · not checked)."""
    marks = {True: "✓", False: "✗", None: "…"}
    for ex in EXERCISES.values():
        r = _RESULTS.get(ex.name)
        print(f"{marks[r.ok] if r else '·'} {ex.notebook}  {ex.name}: {ex.title}")


def table():
    """Every exercise as a DataFrame: notebook, name, title."""
    import pandas as pd

    return pd.DataFrame([{"notebook": e.notebook, "exercise": e.name, "what it asks": e.title}
                         for e in EXERCISES.values()])
