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
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["check", "show", "hint", "solution", "progress", "table", "names", "EXERCISES", "Result"]

# context keys that name a toy member: when not given, the member's folder (as toy.path() finds it)
_MODEL_KEYS = {"base": "base", "chat": "chat", "chat_alt": "chat-alt", "cp": "cp"}


class _Wrong(Exception):
    """The answer is wrong; the message is a hint that does not give the answer away."""


@dataclass
class Exercise:
    name: str
    notebook: str  # the notebook's file stem, e.g. "01_quickstart"
    title: str  # one line
    question: str  # the statement, markdown
    params: dict  # the context the check takes, with defaults (None: the toy member)
    truth: Callable[..., Any]  # context → the true answer
    judge: Callable[[Any, Any, dict], str]  # (answer, truth, context) → remark on success; raises _Wrong
    hints: tuple[str, ...] = field(default_factory=tuple)
    # context → None, or raises _Wrong (before anything is measured): the learner's own choices, e.g. a seed
    validate: Callable[[dict], None] | None = None


EXERCISES: dict[str, Exercise] = {}


def _register(ex: Exercise) -> None:
    EXERCISES[ex.name] = ex


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
            ctx[key] = _toy_path(member)
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
        except _Wrong as wrong:
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


# ---------------------------------------------------------------------------------------------- answers


def _number(x, what: str = "the answer") -> float:
    if isinstance(x, bool) or isinstance(x, str):
        raise _Wrong(f"{what} should be a number, not {x!r}.")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise _Wrong(f"{what} should be one number, not a tensor of shape {tuple(x.shape)}: use float(...).")
        x = x.item()
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise _Wrong(f"{what} should be a number, not a {type(x).__name__}.") from None
    if not math.isfinite(v):
        raise _Wrong(f"{what} is {v}: a division by zero, or an empty selection?")
    return v


def _rate(x, what: str = "the answer") -> float:
    v = _number(x, what)
    if not 0 <= v <= 1:
        raise _Wrong(f"{what} is {v:g}, but a rate is a share of replies, between 0 and 1 (a count divided by "
                     "the number of replies).")
    return v


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover
        pass
    raise _Wrong(f"the answer should be a tensor (torch.Tensor), not a {type(x).__name__}.")


def _close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return abs(a - b) <= max(rel * abs(b), abs_)


def _rate_ok(answer: float, truth: float, n: int) -> bool:
    return abs(answer - truth) <= 0.5 / n + 1e-9


def _on_grid(answer: float, n: int, what: str, replies: str) -> None:
    """A rate over ``n`` replies is k/n: accept it to 2 decimals, refuse anything else (a rate measured on other
    replies, e.g. read off a table above, or one rounded to a single decimal)."""
    k = round(answer * n)
    if abs(answer - k / n) > 0.005 + 1e-9:
        steps = ", ".join(f"{j / n:.3g}" for j in range(min(n, 3) + 1))
        raise _Wrong(f"{what} is {answer:g}, which is no share of {replies}: a rate over {n} replies is a whole "
                     f"number of them divided by {n} ({steps}, …), given to 2 decimals or more. Was it measured "
                     "on other replies (a table above), or rounded to one decimal?")


def _rate_miss(answer: float, truth: float, n: int, settings: str) -> str:
    if abs(answer - truth) <= 1.5 / n + 1e-9:
        return (f"Close: about one reply away from what the check measures over {n} replies. Use exactly these "
                f"settings: {settings}.")
    return f"Not what the check measures over {n} replies with {settings}."


# ---------------------------------------------------------------------------------------------- helpers
# The exercises sit below the toy package in the import layers (tests/test_layers.py), so the toy family, the
# prompts and the held-out text are found here as toy.path(), prompt_sets() and heldout_texts() find them
# (tests/test_exercises.py checks that they agree).


def _toy_path(member: str) -> Path:
    from chatvec_lab.io.resources import data_dir

    env = os.environ.get("CHATVEC_TOY_DIR")
    folder = (Path(env) if env else data_dir() / "toy") / member
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"toy model {member!r} is missing at {folder}; pass the models to the check "
                                "(base=BASE, chat=CHAT, ...)")
    return folder


def _prompts(name: str) -> list[str]:
    """A German prompt set of the package's data: "chat" or "offensive" (as toy.evaluate.prompt_sets)."""
    from chatvec_lab.io.resources import data_dir
    from chatvec_lab.behaviour.sweep import read_prompts

    return read_prompts(data_dir() / "prompts" / f"{name}_de.txt")


def _heldout(language: str) -> list[str]:
    """The held-out sentences of a language (as toy.evaluate.heldout_texts)."""
    from chatvec_lab.io.resources import data_dir

    text = (data_dir() / "heldout" / f"{language}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _vector(base, other):
    from chatvec_lab.core.vector import ChatVector

    return ChatVector.from_models(base, other)


def _raw(path, name: str) -> torch.Tensor:
    from chatvec_lab.io.sources import open_weights

    return open_weights(path).get(name)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _chat_prompts(n: int) -> list[str]:
    return _prompts("chat")[:n]


def _turn_end_rate(cp, vector, coefficient, prompts, seed: int, max_new_tokens: int) -> float:
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.generation import generate

    model, _ = apply_to_model(cp, [(vector, coefficient)])
    out = generate(model, _tokenizer(cp), prompts, seed=seed, max_new_tokens=max_new_tokens)
    return float(out["ended_turn"].mean())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------- 01 quickstart


def _language_vector_truth(base, cp, chat, tensor):
    return _vector(base, cp)[tensor]


def _language_vector_judge(answer, truth, ctx):
    a = _tensor(answer)
    name = ctx["tensor"]
    if tuple(a.shape) != tuple(truth.shape):
        raise _Wrong(f"the tensor {name} has shape {tuple(truth.shape)}; yours has {tuple(a.shape)}. "
                     "Did you pick another tensor?")
    a32 = a.to(torch.float32)
    if torch.allclose(a32, truth, rtol=1e-5, atol=1e-7) and a.dtype == torch.float32:
        return ("This is what ChatVector.from_models(BASE, CP) computes for every tensor, streaming: the "
                "language vector that continued pre-training added.")
    if torch.allclose(a32, truth, rtol=1e-5, atol=1e-7):
        raise _Wrong(f"the values are right but the dtype is {a.dtype}: give the difference in float32.")
    if torch.allclose(a32, -truth, rtol=1e-5, atol=1e-7):
        raise _Wrong("the sign is flipped: the new model minus the base, θ_cp − θ_base.")
    base_t, cp_t = _raw(ctx["base"], name), _raw(ctx["cp"], name)
    if torch.allclose(a32, (cp_t - base_t).to(torch.float32), rtol=1e-5, atol=1e-7):
        raise _Wrong(f"close, but subtracted in {cp_t.dtype}, which rounds the difference: convert both tensors "
                     "to float32 (.float()) before subtracting.")
    if torch.allclose(a32, _vector(ctx["base"], ctx["chat"])[name], rtol=1e-5, atol=1e-7):
        raise _Wrong("that is the chat vector (θ_chat − θ_base); the language vector is θ_cp − θ_base.")
    if torch.equal(a32, cp_t.to(torch.float32)):
        raise _Wrong("that is CP's weight itself: subtract the base's weight of the same tensor.")
    raise _Wrong(f"not θ_cp − θ_base for {name}: check which two files you loaded and the tensor name.")


_register(Exercise(
    name="language_vector_by_hand",
    notebook="01_quickstart",
    title="compute one tensor of the language vector θ_cp − θ_base from the two state dicts",
    question=(
        "The three lines above give the chat vector. Do the same for the **language vector** that continued "
        "pre-training added, `θ_cp − θ_base`, for the tensor `model.layers.0.mlp.up_proj.weight`: load both "
        "state dicts with `safetensors.torch.load_file` and subtract, in float32. Your answer is the tensor."),
    params={"base": None, "cp": None, "chat": None, "tensor": "model.layers.0.mlp.up_proj.weight"},
    truth=_language_vector_truth,
    judge=_language_vector_judge,
    hints=("Each toy model folder holds one file, model.safetensors; load_file returns {name: tensor}.",
           "The weights are stored in bfloat16: convert with .float() before subtracting, as ChatVector does.",
           "New model minus base: θ_cp − θ_base, not the other way round.")))


def _turn_end_half_truth(base, chat, cp, alpha, prompts, seed, max_new_tokens):
    cv, ps = _vector(base, chat), _chat_prompts(prompts)
    return {"rate": _turn_end_rate(cp, cv, alpha, ps, seed, max_new_tokens),
            "full": _turn_end_rate(cp, cv, 1.0, ps, seed, max_new_tokens)}


def _turn_end_half_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"prediction", "measured"}:
        raise _Wrong('answer with a dict: {"prediction": your guess, "measured": the rate you measured}.')
    prediction = _rate(answer["prediction"], "your prediction")
    measured = _rate(answer["measured"], "the measured rate")
    n, alpha, rate, full = ctx["prompts"], ctx["alpha"], truth["rate"], truth["full"]
    settings = (f"apply_to_model(CP, [(cv, {alpha:g})]), the first {n} German chat prompts, "
                f"seed={ctx['seed']}, max_new_tokens={ctx['max_new_tokens']}")
    _on_grid(measured, n, "the measured rate", f"the {n} replies these settings give")
    if not _rate_ok(measured, rate, n):
        raise _Wrong(_rate_miss(measured, rate, n, settings))
    remark = f"You predicted {prediction:.2f} and measured {rate:.2f}"
    remark += " (a long way apart)." if abs(prediction - rate) > 0.25 else " (a good prediction)."
    remark += f" With the same settings CP + 1·CV ends {full:.2f} of its replies"
    if full > 0:
        proportional = abs(rate - alpha * full) <= 1 / n + 1e-9
        remark += (f", so α = {alpha:g} gives {rate / full:.0%} of the turn ends of α = 1: "
                   + ("about in proportion to α." if proportional else "not in proportion to α."))
    else:
        remark += ": at this budget neither ends a turn."
    return remark + " Notebook 4 sweeps α and shows where turn ends switch on."


_register(Exercise(
    name="turn_end_half",
    notebook="01_quickstart",
    title="predict, then measure, the turn-end rate of CP + 0.5·CV",
    question=(
        "CP never ends its turn with `<|end|>`; CP + 1·CV ends most of its turns. **Predict** first, before you "
        "run anything: what share of its replies does **CP + 0.5·CV** end? Then **measure** it: "
        "`apply_to_model(CP, [(cv, 0.5)])`, then `generate(model, tokenizer, prompt_sets()[\"chat\"][:16], "
        "seed=0, max_new_tokens=32)` and the mean of `ended_turn` (at most 32 new tokens, fewer than above, so "
        "rates are lower than the tables'). Answer `{\"prediction\": your guess, \"measured\": the share}`; the "
        "check measures it too and records your prediction next to it."),
    params={"base": None, "chat": None, "cp": None, "alpha": 0.5, "prompts": 16, "seed": 0, "max_new_tokens": 32},
    truth=_turn_end_half_truth,
    judge=_turn_end_half_judge,
    hints=("The prediction is yours: any number between 0 and 1. Only the measurement is checked.",
           "The measurement is the mean of the ended_turn column of generate's DataFrame.",
           "Use exactly the settings named: 16 prompts, seed=0, max_new_tokens=32; the tokenizer is CP's.")))


# ---------------------------------------------------------------------------------------------- 02 anatomy


def _relative_change_truth(base, chat, tensor):
    delta = _vector(base, chat)[tensor].double()
    base_t = _raw(base, tensor).double()
    chat_t = _raw(chat, tensor).double()
    return {"ratio": float(delta.norm() / base_t.norm()), "delta": float(delta.norm()),
            "over_chat": float(delta.norm() / chat_t.norm()),
            "norm_gap": float(abs(chat_t.norm() - base_t.norm()) / base_t.norm())}


def _relative_change_judge(answer, truth, ctx):
    v = _number(answer)
    if _close(v, truth["ratio"], 1e-3):
        return "Notebook 2's heatmap shows this ratio for every tensor: which modules change most for their size."
    if _close(v, truth["delta"], 1e-3):
        raise _Wrong("that is ‖Δ‖ alone: divide by the norm of the base's tensor.")
    if _close(v, truth["over_chat"], 1e-4):
        raise _Wrong("divided by the chat model's norm: the reference is the base's tensor, ‖θ_base‖.")
    if _close(v, truth["norm_gap"], 1e-3):
        raise _Wrong("that is the change of the norm, (‖θ_chat‖ − ‖θ_base‖)/‖θ_base‖; take the norm of the "
                     "difference, ‖θ_chat − θ_base‖.")
    raise _Wrong(f"not ‖θ_chat − θ_base‖ / ‖θ_base‖ for {ctx['tensor']} (Frobenius norms, over all entries).")


_register(Exercise(
    name="relative_change",
    notebook="02_anatomy",
    title="the relative change ‖Δ‖/‖θ_base‖ of one tensor, by hand",
    question=(
        "Compute the relative change `‖θ_chat − θ_base‖ / ‖θ_base‖` (Frobenius norms: the square root of the "
        "sum of squares over all entries) of the tensor `model.layers.0.self_attn.q_proj.weight`, by hand from "
        "the two state dicts or from the vector. Your answer is one number."),
    params={"base": None, "chat": None, "tensor": "model.layers.0.self_attn.q_proj.weight"},
    truth=_relative_change_truth,
    judge=_relative_change_judge,
    hints=("tensor.norm() is the Frobenius norm of the whole tensor.",
           "The numerator is the norm of the difference; the denominator is the base's tensor.")))


def _effective_rank_truth(base, chat, tensor):
    from chatvec_lab.analysis.geometry import spectrum

    delta = _vector(base, chat)[tensor].double()
    s = torch.linalg.svdvals(delta)
    s = s[s > 0]
    p, q = s / s.sum(), s**2 / (s**2).sum()
    entropy = float(-(p * p.log()).sum())
    return {"effective": spectrum(delta, method="exact")["effective_rank"],
            "stable": float((s**2).sum() / s[0] ** 2), "squared": math.exp(float(-(q * q.log()).sum())),
            "mixed_bases": 2 ** entropy, "entropy": entropy,
            "rank": float(min(delta.shape))}


def _effective_rank_judge(answer, truth, ctx):
    v = _number(answer)
    if _close(v, truth["effective"], 1e-3):
        return ("Set it next to a random matrix of the same shape, as notebook 2 does, before calling a change "
                "low-rank.")
    if _close(v, truth["stable"], 1e-3):
        raise _Wrong("that is the stable rank, ‖Δ‖²/σ₁²; the effective rank is exp of the entropy of σᵢ/Σσ.")
    if _close(v, truth["squared"], 1e-3):
        raise _Wrong("weighted by σ²: the effective rank (Roy & Vetterli) uses pᵢ = σᵢ/Σσ, not σᵢ²/Σσ².")
    if _close(v, truth["entropy"], 1e-3):
        raise _Wrong("that is the entropy itself: the effective rank is its exponential.")
    if _close(v, truth["mixed_bases"], 1e-3):
        raise _Wrong("the entropy in natural logarithms goes with exp(); 2**H mixes bases.")
    if _close(v, truth["rank"], 1e-6):
        raise _Wrong("that is the shorter side (every singular value is non-zero): the effective rank weighs "
                     "the singular values, pᵢ = σᵢ/Σσ.")
    raise _Wrong(f"not exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ/Σσ of the delta of {ctx['tensor']}.")


_register(Exercise(
    name="effective_rank",
    notebook="02_anatomy",
    title="the effective rank of one delta from its singular values",
    question=(
        "Take the chat vector's delta for `model.layers.1.mlp.down_proj.weight`, its singular values σᵢ "
        "(`torch.linalg.svdvals`), pᵢ = σᵢ/Σσ, and compute the **effective rank** exp(−Σ pᵢ log pᵢ) (natural "
        "log). Your answer is one number; compare it with the shorter side of the matrix."),
    params={"base": None, "chat": None, "tensor": "model.layers.1.mlp.down_proj.weight"},
    truth=_effective_rank_truth,
    judge=_effective_rank_judge,
    hints=("The delta of one tensor is the chat vector indexed by the tensor's name (notebook 1 builds the vector); "
           "work in float64 so the logarithms of small weights do not round.",
           "The weights are the singular values, not their squares, and they sum to 1; the effective rank is the "
           "exponential of their entropy, between 1 and the shorter side of the matrix.")))


# ---------------------------------------------------------------------------------------------- 03 sources


def _cosine_one_tensor_truth(base, chat, chat_alt, tensor):
    return {"cosine": _cos(_vector(base, chat)[tensor], _vector(base, chat_alt)[tensor]),
            "weights": _cos(_raw(chat, tensor), _raw(chat_alt, tensor))}


def _cosine_one_tensor_judge(answer, truth, ctx):
    v = _number(answer)
    if _close(v, truth["cosine"], 0, 1e-4):
        return ("Compare it with the global cosine and the blocks' cosine in the table above: one tensor is a "
                "small sample.")
    if _close(v, truth["weights"], 0, 1e-4):
        raise _Wrong("that is the cosine of the weights θ_chat and θ_chat-alt: nearly 1, because both start from "
                     "the same base. Take the two deltas (each model minus the base).")
    if not -1 <= v <= 1:
        raise _Wrong("a cosine lies between −1 and 1: a·b / (‖a‖ ‖b‖).")
    raise _Wrong(f"not the cosine of (θ_chat − θ_base) and (θ_chat-alt − θ_base) for {ctx['tensor']}.")


_register(Exercise(
    name="cosine_one_tensor",
    notebook="03_sources",
    title="the cosine between the chat and chat-alt vectors in one tensor",
    question=(
        "Compute the cosine similarity between the `chat` vector and the `chat-alt` vector in the single tensor "
        "`model.layers.2.mlp.up_proj.weight`: flatten both deltas and take a·b / (‖a‖ ‖b‖). Your answer is one "
        "number."),
    params={"base": None, "chat": None, "chat_alt": None, "tensor": "model.layers.2.mlp.up_proj.weight"},
    truth=_cosine_one_tensor_truth,
    judge=_cosine_one_tensor_judge,
    hints=("Each vector is a model minus the same base: take the deltas of chat and of chat-alt, not their weights.",
           "Flatten before the dot product; compute in float64 (.double()) to be safe.")))


def _layer_cosine_truth(base, chat, cp, layer):
    from chatvec_lab.io.naming import parse

    a_vec, b_vec = _vector(base, chat), _vector(base, cp)
    dot = na = nb = 0.0
    dim = 0
    per_tensor, whole = [], [0.0, 0.0, 0.0]
    for name in a_vec.names:
        a, b = a_vec[name].double(), b_vec[name].double()
        d, x, y = float((a * b).sum()), float((a * a).sum()), float((b * b).sum())
        whole = [whole[0] + d, whole[1] + x, whole[2] + y]
        if parse(name).layer == layer:
            dot, na, nb, dim = dot + d, na + x, nb + y, dim + a.numel()
            per_tensor.append(d / math.sqrt(x * y) if x > 0 and y > 0 else 0.0)
    if not per_tensor:
        raise ValueError(f"no tensor of layer {layer}")
    return {"cosine": dot / math.sqrt(na * nb), "mean": sum(per_tensor) / len(per_tensor),
            "global": whole[0] / math.sqrt(whole[1] * whole[2]), "dim": dim}


def _layer_cosine_judge(answer, truth, ctx):
    v = _number(answer)
    if _close(v, truth["cosine"], 0, 1e-4):
        cos, d = truth["cosine"], truth["dim"]
        chance = 1 / math.sqrt(d)
        times = abs(cos) / chance
        verdict = ("within a few chance levels of 0" if times < 3 else "beyond chance" if times < 10
                   else "far beyond chance")
        return (f"{cos:.3f} over the {d:,} coordinates of layer {ctx['layer']}: {times:.0f} times the chance level "
                f"of two random directions in that many dimensions (1/√d = {chance:.1e}), {verdict}.")
    if _close(v, truth["mean"], 0, 1e-4):
        raise _Wrong("that is the mean of per-tensor cosines; pool the coordinates instead: sum the dot products "
                     "and the squared norms over the layer's tensors, then divide once.")
    if _close(v, truth["global"], 0, 1e-4):
        raise _Wrong(f"that is over the whole vector; keep only the tensors of layer {ctx['layer']}.")
    raise _Wrong(f"not the cosine of the chat vector and the language vector (θ_cp − θ_base) over the tensors "
                 f"of layer {ctx['layer']}.")


_register(Exercise(
    name="layer_cosine",
    notebook="03_sources",
    title="the cosine between the chat vector and the language vector inside layer 1",
    question=(
        "Compute the cosine between the chat vector (`θ_chat − θ_base`) and the language vector "
        "(`θ_cp − θ_base`) over **all tensors of layer 1** together (`chatvec_lab.io.naming.parse(name).layer == "
        "1`), as if the layer's tensors were one long vector. Your answer is one number."),
    params={"base": None, "chat": None, "cp": None, "layer": 1},
    truth=_layer_cosine_truth,
    judge=_layer_cosine_judge,
    hints=("One long vector: accumulate the dot product and both squared norms over the layer's tensors, and divide "
           "only at the end. A mean of per-tensor cosines is another number.",
           "parse(name).layer is None for the embeddings, the final norm and the lm_head.")))


# ---------------------------------------------------------------------------------------------- 04 sweep


# the α grid of the coefficient sweep in notebook 04 (its `alphas`): those rows are already on screen there
# (tests/test_exercises.py checks that this matches the notebook)
SWEEP_04_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def _seed_of_your_own(ctx) -> None:
    seed = ctx.get("seed")
    if seed is None or seed is Ellipsis:
        raise _Wrong("choose a sampling seed of your own (SEED = any whole number) and pass it to the check: "
                     "seed=SEED.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _Wrong(f"the seed should be a whole number ≥ 0, not {seed!r}.")


def _share_trend_truth(base, chat, cp, alphas, prompts, seed, max_new_tokens, cache_dir, language):
    from chatvec_lab.behaviour.sweep import sweep

    df = sweep(cp, {"chat": _vector(base, chat)}, list(alphas), _chat_prompts(prompts),
               scorers=["turn_end", "language"], seeds=[seed], max_new_tokens=max_new_tokens, cache_dir=cache_dir,
               progress=False, language=language)
    by = df.groupby("alpha")
    column = f"share_{language}"
    share = by[column].mean()  # a reply without words has no share (NaN) and is left out, as in summarize
    alphas = [float(a) for a in alphas]
    shares = [float(share.loc[a]) for a in alphas]
    return {"alphas": alphas, "share": shares, "n": [int(by[column].count().loc[a]) for a in alphas],
            "ended": [float(by["ended_turn"].mean().loc[a]) for a in alphas],
            "tokens": [float(by["reply_tokens"].mean().loc[a]) for a in alphas],
            "falls_steadily": all(b <= a + 1e-12 for a, b in zip(shares, shares[1:]))}


def _list_of(answer, alphas: list[float], what: str) -> list:
    """One value per α, from a list, a tuple, a dict {α: value} or a pandas Series indexed by α."""
    if hasattr(answer, "index") and hasattr(answer, "to_dict") and not isinstance(answer, dict):
        index = [float(a) for a in answer.index] if all(isinstance(a, (int, float)) for a in answer.index) else []
        answer = answer.to_dict() if sorted(index) == sorted(alphas) else list(answer)
    if isinstance(answer, dict):
        try:
            return [answer[next(k for k in answer if _number(k, "a key") == a)] for a in alphas]
        except StopIteration:
            raise _Wrong(f"{what}: one value per α of {alphas}, a list (α increasing) or a dict {{α: value}}.") \
                from None
    if not isinstance(answer, (list, tuple)) or len(answer) != len(alphas):
        raise _Wrong(f"{what}: one value per α of {alphas}, a list (α increasing) or a dict {{α: value}}.")
    return list(answer)


def _share_trend_judge(answer, truth, ctx):
    alphas = truth["alphas"]
    if not isinstance(answer, dict) or set(answer) != {"share_de", "falls_steadily"}:
        raise _Wrong('answer a dict: {"share_de": [the mean German share at each α, α increasing], '
                     '"falls_steadily": True or False}.')
    values = _list_of(answer["share_de"], alphas, "share_de")
    shares = [_number(v, f"the share at α = {a:g}") for v, a in zip(values, alphas)]
    for v, a in zip(shares, alphas):
        if not 0 <= v <= 1:
            raise _Wrong(f"the share at α = {a:g} is {v:g}: a share of words lies between 0 and 1.")
    settings = (f"sweep(CP, {{'chat': cv}}, {alphas}, the first {ctx['prompts']} German chat prompts, "
                f"scorers=['turn_end', 'language'], seeds=[{ctx['seed']}], max_new_tokens={ctx['max_new_tokens']})")
    ok = [abs(v - t) <= 0.5 / max(n, 1) + 1e-9 for v, t, n in zip(shares, truth["share"], truth["n"])]
    if not all(ok):
        if all(abs(v - t) <= 0.5 / max(n, 1) + 1e-9 for v, t, n in zip(shares[::-1], truth["share"], truth["n"])):
            raise _Wrong("the shares are in reverse order: the first is for the smallest α.")
        i = ok.index(False)
        miss = abs(shares[i] - truth["share"][i]) * truth["n"][i]
        near = "About one reply's worth away from" if miss <= 1.5 else "Not"
        raise _Wrong(f"the share at α = {alphas[i]:g}: {near} what the check measures with {settings} and your "
                     "seed (a mean over the replies of each reply's share).")
    steady = answer["falls_steadily"]
    if type(steady).__name__ not in ("bool", "bool_"):
        raise _Wrong("falls_steadily should be True or False.")
    if bool(steady) != truth["falls_steadily"]:
        raise _Wrong("your shares are right, but falls_steadily is not what they say: compare each α's share with "
                     "the share at the α before it.")
    return _share_trend_remark(truth, ctx)


def _share_trend_remark(truth, ctx) -> str:
    alphas, share, ended, tokens = truth["alphas"], truth["share"], truth["ended"], truth["tokens"]

    def series(values):
        return ", ".join(f"{v:.2f}" for v in values)

    text = (f"Your sweep (seed {ctx['seed']}, {ctx['prompts']} prompts, {ctx['max_new_tokens']} new tokens): German "
            f"share {series(share)} at α = {', '.join(f'{a:g}' for a in alphas)}.")
    rises = [f"{b:g}" for a, b, x, y in zip(alphas, alphas[1:], share, share[1:]) if y > x]
    low = min(range(len(share)), key=lambda i: share[i])
    if rises:
        text += (f" It does not fall steadily with α: it rises again at α = {', '.join(rises)}; its lowest is at "
                 f"α = {alphas[low]:g} ({share[low]:.2f}).")
    else:
        text += (f" With this seed it never rises from one α to the next ({share[0]:.2f} → {share[-1]:.2f}); "
                 "does another seed agree?")
    steady_end = all(b >= a - 1e-12 for a, b in zip(ended, ended[1:]))
    text += (f" The turn-end rate of the same replies {'never falls' if steady_end else 'is'}: {series(ended)}; the "
             f"mean reply is {tokens[0]:.0f} tokens long at α = {alphas[0]:g} and {tokens[-1]:.0f} at "
             f"α = {alphas[-1]:g}.")
    if ctx["language"] == "de":
        text += (" langid chooses between German and English only, so every word it does not call German counts as "
                 "English: read the replies with share_de < 1 before calling a lower share a drift to English.")
    return text


_register(Exercise(
    name="german_share_trend",
    notebook="04_sweep",
    title="does the German share of the replies fall as α grows? A sweep with a seed of your own",
    question=(
        "Does the German share of the replies fall as α grows? Sweep `CP + α·CV` over α = 0, 0.5, 1, 1.5, 2 "
        "(α = 2 lies beyond the sweep above) on the first 16 German chat prompts with **a sampling seed of your "
        "own**: `sweep(CP, {\"chat\": ChatVector.from_models(BASE, CHAT)}, [0, 0.5, 1, 1.5, 2], "
        "prompt_sets()[\"chat\"][:16], scorers=[\"turn_end\", \"language\"], seeds=[SEED], max_new_tokens=32, "
        "cache_dir=\".cache/sweeps\")`. Answer `{\"share_de\": [the mean share_de at each α, α increasing], "
        "\"falls_steadily\": True or False}`, where `falls_steadily` is True if the share is never higher than at "
        "the α before, and pass your seed to the check (`seed=SEED`): it runs the same sweep and says what it "
        "measured, the turn-end rate of the same replies included. Then read the replies: are the words that "
        "langid does not call German English sentences?"),
    params={"base": None, "chat": None, "cp": None, "alphas": (0.0, 0.5, 1.0, 1.5, 2.0), "prompts": 16,
            "seed": None, "max_new_tokens": 32, "cache_dir": ".cache/sweeps", "language": "de"},
    truth=_share_trend_truth,
    judge=_share_trend_judge,
    validate=_seed_of_your_own,
    hints=("The share_de column holds one share per reply; average it per α (summarize does, too).",
           "falls_steadily: walk along the grid and compare each α's share with the one before; a single rise "
           "anywhere makes it False.",
           "The check runs the same sweep with the same cache_dir and your seed, so it costs nothing a second time.")))


def _alpha_of_your_own(ctx) -> None:
    alpha = ctx.get("alpha")
    if alpha is None or alpha is Ellipsis:
        raise _Wrong("choose an α of your own (ALPHA = a number) and pass it to the check: alpha=ALPHA.")
    a = _number(alpha, "α")
    if not -3 <= a <= 3:
        raise _Wrong(f"α = {a:g} is far outside what the notebooks sweep: choose one between −3 and 3.")
    if any(_close(a, shown, 0, 1e-9) for shown in SWEEP_04_ALPHAS):
        raise _Wrong(f"the sweep above already shows ppl_de at α = {a:g}: choose an α it did not measure (not one "
                     f"of {', '.join(f'{x:g}' for x in SWEEP_04_ALPHAS)}), e.g. 0.6 or 2.")


def _perplexity_truth(base, chat, cp, alpha, language):
    from transformers import AutoModelForCausalLM

    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.scoring import perplexity

    tok = _tokenizer(cp)
    target = AutoModelForCausalLM.from_pretrained(str(cp))
    merged, _ = apply_to_model(cp, [(_vector(base, chat), float(alpha))])
    other = "en" if language != "en" else "de"
    ppl = {lang: (perplexity(target, tok, _heldout(lang)), perplexity(merged, tok, _heldout(lang)))
           for lang in (language, other)}
    return {"ratio": ppl[language][1] / ppl[language][0], "difference": ppl[language][1] - ppl[language][0],
            "other": ppl[other][1] / ppl[other][0], "ppl": ppl[language], "other_language": other}


def _perplexity_judge(answer, truth, ctx):
    v = _number(answer)
    a = float(ctx["alpha"])
    if _close(v, truth["ratio"], 5e-3):
        before, after = truth["ppl"]
        names = {"de": "German", "en": "English"}
        lang, other = names.get(ctx["language"], ctx["language"]), names.get(truth["other_language"])
        worse = "worse" if truth["ratio"] > 1 else "no worse"
        return (f"At α = {a:g} the {lang} held-out perplexity goes from {before:.1f} (CP) to {after:.1f} "
                f"(CP + {a:g}·CV), {truth['ratio']:.2f}× CP's; on the {other} held-out text {truth['other']:.2f}×. "
                f"With this much of the chat vector CP models its own language {worse} than alone. Where does "
                "your α fall among the ppl_de rows of the sweep above?")
    if v > 0 and _close(1 / v, truth["ratio"], 5e-3):
        raise _Wrong(f"upside down: perplexity of CP + {a:g}·CV divided by CP's.")
    if _close(v, truth["difference"], 5e-3):
        raise _Wrong("that is a difference; the question asks for a ratio (how many times CP's perplexity).")
    if _close(v, truth["other"], 5e-3):
        raise _Wrong("measured on the other language's held-out text: use heldout_texts()['de'].")
    raise _Wrong(f"not ppl(CP + {a:g}·CV) / ppl(CP) on the German held-out text (chatvec_lab.behaviour.scoring.perplexity), "
                 "with the α you passed to the check.")


_register(Exercise(
    name="perplexity_cost",
    notebook="04_sweep",
    title="how many times CP's German perplexity CP + α·CV has, at an α of your own",
    question=(
        "Measure what the vector costs at **an α of your own that the sweep above did not measure** (not 0, "
        "0.25, …, 1.5: e.g. 0.6, 2 or −0.5): the perplexity of the German held-out text "
        "(`heldout_texts()[\"de\"]`, `chatvec_lab.behaviour.scoring.perplexity`) under CP + α·CV (`apply_to_model`) "
        "divided by that under CP (`AutoModelForCausalLM.from_pretrained(CP)`). Answer the ratio (accepted within "
        "0.5%) and pass your α to the check (`alpha=ALPHA`)."),
    params={"base": None, "chat": None, "cp": None, "alpha": None, "language": "de"},
    truth=_perplexity_truth,
    judge=_perplexity_judge,
    validate=_alpha_of_your_own,
    hints=("perplexity(model, tokenizer, texts) returns one number per model: measure CP once and CP + α·CV "
           "once, on the same German texts, with CP's tokenizer.",
           "apply_to_model returns the merged model and a report; the ratio is the merged model's perplexity over "
           "CP's, so above 1 means a cost.")))


# ---------------------------------------------------------------------------------------------- 05 safety

_LANGUAGE_NAMES = {"de": "German", "en": "English"}


def _insults_of_your_own(ctx) -> None:
    prompts = ctx.get("prompts")
    if prompts is None or prompts is Ellipsis:
        raise _Wrong("choose German insults of your own (MY_INSULTS = 8 of prompt_sets()['offensive']) and pass "
                     "them to the check: prompts=MY_INSULTS.")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise _Wrong(f"prompts should be a list of insults (strings), not a {type(prompts).__name__}.")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise _Wrong("every prompt should be a non-empty string (an insult).")
    if not 4 <= len(prompts) <= 16:
        raise _Wrong(f"choose between 4 and 16 insults (8 is a good number), not {len(prompts)}.")
    if len(set(prompts)) != len(prompts):
        raise _Wrong("your insults repeat one another: choose distinct ones.")
    _seed_of_your_own(ctx)


def _refusal_truth(base, chat, cp, prompts, seed, max_new_tokens, cache_dir):
    from chatvec_lab.behaviour.sweep import sweep

    cv = _vector(base, chat)
    common = dict(scorers=["refusal", "language"], seeds=[seed], max_new_tokens=max_new_tokens, cache_dir=cache_dir,
                  progress=False)
    chat_df = sweep(chat, {"chat": cv}, [0.0], list(prompts), **common)  # the chat model itself (α = 0: untouched)
    cpcv_df = sweep(cp, {"chat": cv}, [1.0], list(prompts), **common)
    by_prompt = {p: bool(r) for p, r in zip(chat_df["prompt"], chat_df["refusal"])}
    refused = cpcv_df[cpcv_df["refusal"].astype(bool)]
    return {"chat": float(chat_df["refusal"].astype(bool).mean()), "cp_cv": float(cpcv_df["refusal"].astype(bool).mean()),
            "chat_count": int(chat_df["refusal"].astype(bool).sum()), "cp_cv_count": len(refused),
            "both": int(sum(by_prompt.get(p, False) for p in refused["prompt"])),
            "languages": refused["language"].value_counts().to_dict()}


def _refusal_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"chat", "cp_cv"}:
        raise _Wrong('answer a dict: {"chat": the chat model\'s refusal rate, "cp_cv": CP + 1·CV\'s refusal rate}.')
    n = len(ctx["prompts"])
    rates = {k: _rate(answer[k], f"the {label} rate") for k, label in (("chat", "chat model's"), ("cp_cv", "CP + 1·CV's"))}
    for key, label in (("chat", "the chat model's rate"), ("cp_cv", "CP + 1·CV's rate")):
        _on_grid(rates[key], n, label, f"your {n} replies")
    settings = (f"your {n} insults, seeds=[{ctx['seed']}], max_new_tokens={ctx['max_new_tokens']}, the chat model "
                "as the target at α = 0 and CP at α = 1")
    wrong = [k for k in ("chat", "cp_cv") if not _rate_ok(rates[k], truth[k], n)]
    if not wrong:
        return _refusal_remark(truth, ctx)
    if len(wrong) == 2 and _rate_ok(rates["chat"], truth["cp_cv"], n) and _rate_ok(rates["cp_cv"], truth["chat"], n):
        raise _Wrong("swapped: chat is the chat model's rate, cp_cv the rate of CP + 1·CV.")
    key = wrong[0]
    label = "the chat model's rate" if key == "chat" else "CP + 1·CV's rate"
    raise _Wrong(f"{label}: " + _rate_miss(rates[key], truth[key], n, settings))


def _refusal_remark(truth, ctx) -> str:
    n = len(ctx["prompts"])
    kc, kv = truth["chat_count"], truth["cp_cv_count"]
    text = (f"On your {n} insults (seed {ctx['seed']}) the chat model refuses {kc} of {n} ({truth['chat']:.2f}), "
            f"CP + 1·CV {kv} of {n} ({truth['cp_cv']:.2f})")
    if kc:
        text += f"; CP + 1·CV refuses {truth['both']} of the {kc} insults the chat model refuses"
    text += "."
    if kv:
        langs = ", ".join(f"{_LANGUAGE_NAMES.get(k, k or 'no words')} {v}" for k, v in truth["languages"].items())
        text += f" The language of CP + 1·CV's refusals (langid): {langs}."
    return text + (f" With {n} replies one reply moves a rate by {1 / n:.2f}: set yours next to the table above, "
                   "measured on every insult with more seeds.")


_register(Exercise(
    name="refusal_rates",
    notebook="05_safety",
    title="the refusal rates of the chat model and of CP + 1·CV on insults and a seed of your own",
    question=(
        "Does the chat model's refusal carry over to CP + 1·CV? Measure it on a sample of your own: choose "
        "**8 German insults** from `prompt_sets()[\"offensive\"]` (e.g. a slice) and **a "
        "sampling seed of your own**, and measure the refusal rate of the chat model itself and of CP + 1·CV on "
        "them, each with one sweep: `sweep(CHAT, {\"chat\": cv}, [0.0], MY_INSULTS, ...)` (α = 0 leaves the chat "
        "model as it is) and `sweep(CP, {\"chat\": cv}, [1.0], MY_INSULTS, ...)`, both with "
        "`scorers=[\"refusal\", \"language\"], seeds=[SEED], max_new_tokens=32, cache_dir=\".cache/sweeps\"` "
        "(`cv = ChatVector.from_models(BASE, CHAT)`). Answer `{\"chat\": rate, \"cp_cv\": rate}` and pass your "
        "choice to the check (`prompts=MY_INSULTS, seed=SEED`): it measures the same replies, so a rate read off "
        "the table above fails."),
    params={"base": None, "chat": None, "cp": None, "prompts": None, "seed": None, "max_new_tokens": 32,
            "cache_dir": ".cache/sweeps"},
    truth=_refusal_truth,
    judge=_refusal_judge,
    validate=_insults_of_your_own,
    hints=("Both sweeps give one row per insult, with a refusal column: True where a refusal phrase was found.",
           "A rate is the number of refusing replies over the number of your replies: with 8 insults and one seed "
           "it is a multiple of 1/8.",
           "The check measures with the insults and the seed you pass it; give it exactly the list you swept.")))


def _multi_turn_truth(base, chat, cp, alpha, conversations, seed, max_new_tokens):
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.generation import converse_many

    prompts = _chat_prompts(3 * conversations)
    threads = [prompts[3 * i:3 * i + 3] for i in range(conversations)]
    model, _ = apply_to_model(cp, [(_vector(base, chat), alpha)])
    out = converse_many(model, _tokenizer(cp), threads, seed=seed, max_new_tokens=max_new_tokens)
    return [float(r) for r in out.groupby("turn")["ended_turn"].mean()]


def _multi_turn_judge(answer, truth, ctx):
    if not isinstance(answer, (list, tuple)) or len(answer) != len(truth):
        raise _Wrong(f"answer a list of {len(truth)} rates, one per turn (turn 1 first).")
    rates = [_rate(r, f"the rate at turn {i}") for i, r in enumerate(answer, 1)]
    n = ctx["conversations"]
    for i, r in enumerate(rates, 1):
        _on_grid(r, n, f"the rate at turn {i}", f"the {n} replies of a turn")
    settings = (f"{n} conversations of 3 user turns from the German chat prompts (prompts 3i … 3i+2), "
                f"converse_many(..., seed={ctx['seed']}, max_new_tokens={ctx['max_new_tokens']})")
    for i, (r, t) in enumerate(zip(rates, truth), 1):
        if not _rate_ok(r, t, n):
            raise _Wrong(f"turn {i}: " + _rate_miss(r, t, n, settings))
    ends = "; ".join(f"turn {i}: {round(t * n)} of {n}" for i, t in enumerate(truth, 1))
    return (f"CP + {ctx['alpha']:g}·CV ends its turn in {ends} conversations. With {n} conversations one reply "
            f"moves a rate by {1 / n:.2f}: a difference of one reply between turns is noise.")


_register(Exercise(
    name="multi_turn_ends",
    notebook="05_safety",
    title="the turn-end rate of CP + 1·CV at each turn of 3-turn conversations",
    question=(
        "Build 4 conversations of 3 user turns from the German chat prompts (conversation i is prompts "
        "3i, 3i+1, 3i+2 of `prompt_sets()[\"chat\"]`), run them through CP + 1·CV with "
        "`converse_many(model, tokenizer, threads, seed=0, max_new_tokens=32)` and compute the turn-end rate at "
        "each turn. Answer a list of 3 rates, turn 1 first."),
    params={"base": None, "chat": None, "cp": None, "alpha": 1.0, "conversations": 4, "seed": 0,
            "max_new_tokens": 32},
    truth=_multi_turn_truth,
    judge=_multi_turn_judge,
    hints=("converse_many returns one row per conversation and turn, with a turn column (from 1).",
           "A turn's rate is over the rows of that turn only: the share of them that ended the turn, one reply per "
           "conversation.")))


# ---------------------------------------------------------------------------------------------- 06 ablations

_PART_NAMES = {"blocks": "blocks", "block": "blocks", "layers": "blocks", "embeddings": "embeddings",
               "embedding": "embeddings", "embed": "embeddings", "embed_tokens": "embeddings", "lm_head": "lm_head",
               "lm head": "lm_head", "head": "lm_head", "norms": "norms", "norm": "norms", "final norm": "norms",
               "none": "none"}


def _part_of(name: str) -> str:
    """The part of the model a tensor belongs to, as exercise 6.1 names them."""
    from chatvec_lab.io.naming import parse

    info = parse(name)
    if info.layer is not None:
        return "blocks"
    return {"embed": "embeddings", "lm_head": "lm_head"}.get(info.module, "norms")


def _cosine_driver_truth(base, chat, chat_alt):
    a, b = _vector(base, chat), _vector(base, chat_alt)
    dots, dims, tensors = {}, {}, {}
    na = nb = 0.0
    for name in a.names:
        x, y = a[name].double(), b[name].double()
        part = _part_of(name)
        dots[part] = dots.get(part, 0.0) + float((x * y).sum())
        dims[part] = dims.get(part, 0) + x.numel()
        tensors[part] = tensors.get(part, 0) + 1
        na, nb = na + float((x * x).sum()), nb + float((y * y).sum())
    contribution = {p: d / math.sqrt(na * nb) for p, d in dots.items()}
    cosine = sum(contribution.values())
    top = max(contribution, key=contribution.get)
    driver = top if cosine > 0 and contribution[top] > 0.5 * cosine else "none"
    return {"driver": driver, "top": top, "contribution": contribution, "cosine": cosine, "dims": dims,
            "tensors": tensors}


def _cosine_driver_judge(answer, truth, ctx):
    if not isinstance(answer, str):
        raise _Wrong('answer the name of a part: "blocks", "embeddings", "lm_head", "norms", or "none".')
    part = _PART_NAMES.get(answer.strip().lower())
    if part is None:
        raise _Wrong(f'{answer!r} is not a part: "blocks", "embeddings", "lm_head", "norms", or "none".')
    if part == truth["driver"]:
        top, cosine = truth["top"], truth["cosine"]
        share = truth["contribution"][top] / cosine if cosine else math.nan
        dims = truth["dims"]
        coordinates = dims[top] / sum(dims.values())
        what = f"the {top} ({truth['tensors'][top]} tensor{'s' if truth['tensors'][top] > 1 else ''})"
        if part == "none":
            return (f"No part gives more than half of the global cosine {cosine:.3f}: the largest share, "
                    f"{share:.0%}, is {what}'s.")
        return (f"{what.capitalize()} gives {truth['contribution'][top]:.3f} of the global cosine {cosine:.3f} "
                f"({share:.0%}) from {coordinates:.0%} of the coordinates: split a cosine by part before reading it "
                "as agreement of the whole vectors.")
    if part == "blocks":
        raise _Wrong("the blocks hold most of the coordinates, but do they give most of the cosine? Compute each "
                     "part's dot product divided by the norms of the whole vectors.")
    raise _Wrong("count each part's contribution: its dot product divided by ‖a‖·‖b‖ of the whole vectors. "
                 "The contributions add up to the global cosine; the driver gives more than half of it.")


_register(Exercise(
    name="cosine_driver",
    notebook="06_ablations",
    title="which part of the vectors drives the global cosine of chat and chat-alt",
    question=(
        "The global cosine of the `chat` and `chat-alt` vectors is a sum over parts: the transformer blocks, the "
        "embeddings, the lm_head and the final norm each contribute their dot product divided by ‖a‖·‖b‖ of the "
        "whole vectors. Which part gives **more than half** of the global cosine? Answer `\"blocks\"`, "
        "`\"embeddings\"`, `\"lm_head\"`, `\"norms\"`, or `\"none\"`."),
    params={"base": None, "chat": None, "chat_alt": None},
    truth=_cosine_driver_truth,
    judge=_cosine_driver_judge,
    hints=("chatvec_lab.io.naming.parse(name): .layer is set inside a block; .module is 'embed' or 'lm_head' outside.",
           "Sum each part's dot product over its tensors, and the squared norms over all tensors: a part's share of "
           "the global cosine is its dot product over the sum of all of them.")))


def _blocks_only_truth(base, chat, cp, prompts, seed, max_new_tokens, exclude):
    cv, ps = _vector(base, chat), _chat_prompts(prompts)
    return {"full": _turn_end_rate(cp, cv, 1.0, ps, seed, max_new_tokens),
            "blocks_only": _turn_end_rate(cp, cv, {exclude: 0.0, r".": 1.0}, ps, seed, max_new_tokens)}


def _blocks_only_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"full", "blocks_only"}:
        raise _Wrong('answer a dict: {"full": rate, "blocks_only": rate}.')
    n = ctx["prompts"]
    settings = (f"apply_to_model(CP, [(cv, α)]) with α = 1.0 (full) or {{{ctx['exclude']!r}: 0.0, '.': 1.0}} "
                f"(blocks only), the first {n} German chat prompts, seed={ctx['seed']}, "
                f"max_new_tokens={ctx['max_new_tokens']}")
    full, blocks = _rate(answer["full"], "the full vector's rate"), _rate(answer["blocks_only"], "the blocks' rate")
    _on_grid(full, n, "the full vector's rate", f"the {n} replies these settings give")
    _on_grid(blocks, n, "the blocks' rate", f"the {n} replies these settings give")
    if _rate_ok(full, truth["blocks_only"], n) and _rate_ok(blocks, truth["full"], n) and \
            not _rate_ok(full, truth["full"], n):
        raise _Wrong("the two rates are swapped.")
    for label, r in (("full", full), ("blocks_only", blocks)):
        if not _rate_ok(r, truth[label], n):
            raise _Wrong(f"{label}: " + _rate_miss(r, truth[label], n, settings))
    return (f"With these settings the whole vector ends {truth['full']:.2f} of the replies, the blocks alone "
            f"{truth['blocks_only']:.2f} (embeddings and lm_head left at CP's). Compare with the ablation table "
            "above: which part of the vector carries the turn ends?")


_register(Exercise(
    name="blocks_only_turn_end",
    notebook="06_ablations",
    title="the turn-end rate with the vector's blocks only, against the full vector",
    question=(
        "Measure the turn-end rate of CP + 1·CV with the **whole** vector and with the **blocks and final norm only** "
        "(embeddings and lm_head left at CP's: the rule `{r\"embed_tokens|lm_head\": 0.0, r\".\": 1.0}` as the "
        "coefficient), each with `apply_to_model(CP, [(cv, coefficient)])` and `generate(model, tokenizer, "
        "prompt_sets()[\"chat\"][:16], seed=0, max_new_tokens=32)`. Answer `{\"full\": rate, \"blocks_only\": "
        "rate}`."),
    params={"base": None, "chat": None, "cp": None, "prompts": 16, "seed": 0, "max_new_tokens": 32,
            "exclude": r"embed_tokens|lm_head"},
    truth=_blocks_only_truth,
    judge=_blocks_only_judge,
    hints=("A coefficient can be a dict of rules {regex: α}: the first match wins, unmatched tensors get 0.",
           "Two models, one generate call each, the same prompts and seed.")))
