"""The exercises of notebook 01_quickstart: one tensor of the language vector by hand; predict, then measure,
the turn-end rate of CP + 0.5·CV.

Each exercise is a question, a ``truth`` that measures the right answer from the models it is given, and a ``judge``
that compares the learner's answer with it (``chatvec_lab.course.checking``); ``exercises.check`` runs them.
"""
from __future__ import annotations

import torch

from chatvec_lab.course.checking import Exercise, Wrong, as_rate, as_tensor, on_grid, rate_miss, rate_ok
from chatvec_lab.course.measuring import chat_prompts, raw_tensor, turn_end_rate, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


def _language_vector_truth(base, cp, chat, tensor):
    return vector_of(base, cp)[tensor]


def _language_vector_judge(answer, truth, ctx):
    a = as_tensor(answer)
    name = ctx["tensor"]
    if tuple(a.shape) != tuple(truth.shape):
        raise Wrong(f"the tensor {name} has shape {tuple(truth.shape)}; yours has {tuple(a.shape)}. "
                    "Did you pick another tensor?")
    a32 = a.to(torch.float32)
    if torch.allclose(a32, truth, rtol=1e-5, atol=1e-7) and a.dtype == torch.float32:
        return ("This is what ChatVector.from_models(BASE, CP) computes for every tensor, streaming: the "
                "language vector that continued pre-training added.")
    if torch.allclose(a32, truth, rtol=1e-5, atol=1e-7):
        raise Wrong(f"the values are right but the dtype is {a.dtype}: give the difference in float32.")
    if torch.allclose(a32, -truth, rtol=1e-5, atol=1e-7):
        raise Wrong("the sign is flipped: the new model minus the base, θ_cp − θ_base.")
    base_t, cp_t = raw_tensor(ctx["base"], name), raw_tensor(ctx["cp"], name)
    if torch.allclose(a32, (cp_t - base_t).to(torch.float32), rtol=1e-5, atol=1e-7):
        raise Wrong(f"close, but subtracted in {cp_t.dtype}, which rounds the difference: convert both tensors "
                    "to float32 (.float()) before subtracting.")
    if torch.allclose(a32, vector_of(ctx["base"], ctx["chat"])[name], rtol=1e-5, atol=1e-7):
        raise Wrong("that is the chat vector (θ_chat − θ_base); the language vector is θ_cp − θ_base.")
    if torch.equal(a32, cp_t.to(torch.float32)):
        raise Wrong("that is CP's weight itself: subtract the base's weight of the same tensor.")
    raise Wrong(f"not θ_cp − θ_base for {name}: check which two files you loaded and the tensor name.")


EXERCISES.append(Exercise(
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


def _turn_end_half_truth(base, chat, cp, alpha, prompts, seed, max_new_tokens, device, dtype):
    cv, ps = vector_of(base, chat), chat_prompts(prompts)
    return {"rate": turn_end_rate(cp, cv, alpha, ps, seed, max_new_tokens, device, dtype),
            "full": turn_end_rate(cp, cv, 1.0, ps, seed, max_new_tokens, device, dtype)}


def _turn_end_half_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"prediction", "measured"}:
        raise Wrong('answer with a dict: {"prediction": your guess, "measured": the rate you measured}.')
    prediction = as_rate(answer["prediction"], "your prediction")
    measured = as_rate(answer["measured"], "the measured rate")
    n, alpha, rate, full = ctx["prompts"], ctx["alpha"], truth["rate"], truth["full"]
    settings = (f"apply_to_model(CP, [(cv, {alpha:g})]), the first {n} German chat prompts, "
                f"seed={ctx['seed']}, max_new_tokens={ctx['max_new_tokens']}")
    on_grid(measured, n, "the measured rate", f"the {n} replies these settings give")
    if not rate_ok(measured, rate, n):
        raise Wrong(rate_miss(measured, rate, n, settings))
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


EXERCISES.append(Exercise(
    name="turn_end_half",
    notebook="01_quickstart",
    title="predict, then measure, the turn-end rate of CP + 0.5·CV",
    question=(
        "CP never ends its turn with `<|end|>`; CP + 1·CV ends most of its turns. **Predict** first, before you "
        "run anything: what share of its replies does **CP + 0.5·CV** end? Then **measure** it: "
        "`apply_to_model(CP, [(cv, 0.5)], device=DEVICE, dtype=DTYPE)`, then "
        "`generate(model, tokenizer, prompt_sets()[\"chat\"][:16], "
        "seed=0, max_new_tokens=32)` and the mean of `ended_turn` (at most 32 new tokens, fewer than above, so "
        "rates are lower than the tables'). Answer `{\"prediction\": your guess, \"measured\": the share}`; the "
        "check measures it too and records your prediction next to it."),
    params={"base": None, "chat": None, "cp": None, "alpha": 0.5, "prompts": 16, "seed": 0, "max_new_tokens": 32,
            "device": "auto", "dtype": "auto"},
    truth=_turn_end_half_truth,
    judge=_turn_end_half_judge,
    hints=("The prediction is yours: any number between 0 and 1. Only the measurement is checked.",
           "The measurement is the mean of the ended_turn column of generate's DataFrame.",
           "Use exactly the settings named: 16 prompts, seed=0, max_new_tokens=32; the tokenizer is CP's.")))
