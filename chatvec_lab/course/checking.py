"""What an exercise is, and what its check uses to judge an answer without giving the answer away.

An :class:`Exercise` is a question with the settings its check takes (``params``), a ``truth`` that measures the
right answer from those settings, and a ``judge`` that compares the learner's answer with it: on success it
returns a remark written from the numbers it measured; otherwise it raises :class:`Wrong`, whose message is a hint.
The readers below turn an answer into a number, a rate or a tensor, or raise :class:`Wrong` saying what is off.

Measured rates are accepted within half a reply (``rate_ok``), and a rate over n replies must be a whole number of
them over n, to 2 decimals (``on_grid``): a rate read off a table measured on other replies fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class Wrong(Exception):
    """The answer is wrong; the message is a hint that does not give the answer away."""


@dataclass
class Exercise:
    name: str
    notebook: str  # the notebook's file stem, e.g. "01_quickstart"
    title: str  # one line
    question: str  # the statement, markdown
    params: dict  # the context the check takes, with defaults (None: the toy member)
    truth: Callable[..., Any]  # context → the true answer
    judge: Callable[[Any, Any, dict], str]  # (answer, truth, context) → remark on success; raises Wrong
    hints: tuple[str, ...] = field(default_factory=tuple)
    # context → None, or raises Wrong (before anything is measured): the learner's own choices, e.g. a seed
    validate: Callable[[dict], None] | None = None


# ---------------------------------------------------------------------------------------------- reading an answer


def as_number(x, what: str = "the answer") -> float:
    """``x`` as a finite float (a one-element tensor too); ``what`` names it in the hint."""
    if isinstance(x, bool) or isinstance(x, str):
        raise Wrong(f"{what} should be a number, not {x!r}.")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise Wrong(f"{what} should be one number, not a tensor of shape {tuple(x.shape)}: use float(...).")
        x = x.item()
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise Wrong(f"{what} should be a number, not a {type(x).__name__}.") from None
    if not math.isfinite(v):
        raise Wrong(f"{what} is {v}: a division by zero, or an empty selection?")
    return v


def as_rate(x, what: str = "the answer") -> float:
    """``x`` as a number between 0 and 1."""
    v = as_number(x, what)
    if not 0 <= v <= 1:
        raise Wrong(f"{what} is {v:g}, but a rate is a share of replies, between 0 and 1 (a count divided by "
                    "the number of replies).")
    return v


def as_tensor(x) -> torch.Tensor:
    """``x`` as a tensor (a NumPy array too)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover
        pass
    raise Wrong(f"the answer should be a tensor (torch.Tensor), not a {type(x).__name__}.")


def close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    """``a`` is ``b`` within a relative tolerance ``rel`` (or an absolute one, ``abs_``, where larger)."""
    return abs(a - b) <= max(rel * abs(b), abs_)


def rate_ok(answer: float, truth: float, n: int) -> bool:
    """A rate over ``n`` replies is right within half a reply: a rounded rate passes, one reply off does not."""
    return abs(answer - truth) <= 0.5 / n + 1e-9


def on_grid(answer: float, n: int, what: str, replies: str) -> None:
    """A rate over ``n`` replies is k/n: accept it to 2 decimals, refuse anything else (a rate measured on other
    replies, e.g. read off a table above, or one rounded to a single decimal)."""
    k = round(answer * n)
    if abs(answer - k / n) > 0.005 + 1e-9:
        steps = ", ".join(f"{j / n:.3g}" for j in range(min(n, 3) + 1))
        raise Wrong(f"{what} is {answer:g}, which is no share of {replies}: a rate over {n} replies is a whole "
                    f"number of them divided by {n} ({steps}, …), given to 2 decimals or more. Was it measured "
                    "on other replies (a table above), or rounded to one decimal?")


def rate_miss(answer: float, truth: float, n: int, settings: str) -> str:
    """The hint for a wrong rate: about one reply away, or not what these ``settings`` measure."""
    if abs(answer - truth) <= 1.5 / n + 1e-9:
        return (f"Close: about one reply away from what the check measures over {n} replies. Use exactly these "
                f"settings: {settings}.")
    return f"Not what the check measures over {n} replies with {settings}."


# ---------------------------------------------------------------------------------------------- the learner's choices


def seed_of_your_own(ctx) -> None:
    """An exercise's ``validate``: the check was given a sampling seed of the learner's own (``seed=SEED``)."""
    seed = ctx.get("seed")
    if seed is None or seed is Ellipsis:
        raise Wrong("choose a sampling seed of your own (SEED = any whole number) and pass it to the check: "
                    "seed=SEED.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise Wrong(f"the seed should be a whole number ≥ 0, not {seed!r}.")
