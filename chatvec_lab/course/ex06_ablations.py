"""The exercises of notebook 06_ablations: which part of the vectors drives the global cosine of chat and chat-alt,
and the turn-end rate with the vector's blocks only against the whole vector (each a ``truth`` and a ``judge``:
``chatvec_lab.course.checking``)."""
from __future__ import annotations

import math

from chatvec_lab.course.checking import Exercise, Wrong, as_rate, on_grid, rate_miss, rate_ok
from chatvec_lab.course.measuring import chat_prompts, turn_end_rate, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


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
    a, b = vector_of(base, chat), vector_of(base, chat_alt)
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
        raise Wrong('answer the name of a part: "blocks", "embeddings", "lm_head", "norms", or "none".')
    part = _PART_NAMES.get(answer.strip().lower())
    if part is None:
        raise Wrong(f'{answer!r} is not a part: "blocks", "embeddings", "lm_head", "norms", or "none".')
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
        raise Wrong("the blocks hold most of the coordinates, but do they give most of the cosine? Compute each "
                    "part's dot product divided by the norms of the whole vectors.")
    raise Wrong("count each part's contribution: its dot product divided by ‖a‖·‖b‖ of the whole vectors. "
                "The contributions add up to the global cosine; the driver gives more than half of it.")


EXERCISES.append(Exercise(
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


def _blocks_only_truth(base, chat, cp, prompts, seed, max_new_tokens, exclude, device, dtype):
    cv, ps = vector_of(base, chat), chat_prompts(prompts)
    return {"full": turn_end_rate(cp, cv, 1.0, ps, seed, max_new_tokens, device, dtype),
            "blocks_only": turn_end_rate(cp, cv, {exclude: 0.0, r".": 1.0}, ps, seed, max_new_tokens, device, dtype)}


def _blocks_only_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"full", "blocks_only"}:
        raise Wrong('answer a dict: {"full": rate, "blocks_only": rate}.')
    n = ctx["prompts"]
    settings = (f"apply_to_model(CP, [(cv, α)]) with α = 1.0 (full) or {{{ctx['exclude']!r}: 0.0, '.': 1.0}} "
                f"(blocks only), the first {n} German chat prompts, seed={ctx['seed']}, "
                f"max_new_tokens={ctx['max_new_tokens']}")
    full, blocks = as_rate(answer["full"], "the full vector's rate"), as_rate(answer["blocks_only"], "the blocks' rate")
    on_grid(full, n, "the full vector's rate", f"the {n} replies these settings give")
    on_grid(blocks, n, "the blocks' rate", f"the {n} replies these settings give")
    if rate_ok(full, truth["blocks_only"], n) and rate_ok(blocks, truth["full"], n) and \
            not rate_ok(full, truth["full"], n):
        raise Wrong("the two rates are swapped.")
    for label, r in (("full", full), ("blocks_only", blocks)):
        if not rate_ok(r, truth[label], n):
            raise Wrong(f"{label}: " + rate_miss(r, truth[label], n, settings))
    return (f"With these settings the whole vector ends {truth['full']:.2f} of the replies, the blocks alone "
            f"{truth['blocks_only']:.2f} (embeddings and lm_head left at CP's). Compare with the ablation table "
            "above: which part of the vector carries the turn ends?")


EXERCISES.append(Exercise(
    name="blocks_only_turn_end",
    notebook="06_ablations",
    title="the turn-end rate with the vector's blocks only, against the full vector",
    question=(
        "Measure the turn-end rate of CP + 1·CV with the **whole** vector and with the **blocks and final norm only** "
        "(embeddings and lm_head left at CP's: the rule `{r\"embed_tokens|lm_head\": 0.0, r\".\": 1.0}` as the "
        "coefficient), each with `apply_to_model(CP, [(cv, coefficient)], device=DEVICE, dtype=DTYPE)` and "
        "`generate(model, tokenizer, "
        "prompt_sets()[\"chat\"][:16], seed=0, max_new_tokens=32)`. Answer `{\"full\": rate, \"blocks_only\": "
        "rate}`."),
    params={"base": None, "chat": None, "cp": None, "prompts": 16, "seed": 0, "max_new_tokens": 32,
            "exclude": r"embed_tokens|lm_head", "device": "auto", "dtype": "auto"},
    truth=_blocks_only_truth,
    judge=_blocks_only_judge,
    hints=("A coefficient can be a dict of rules {regex: α}: the first match wins, unmatched tensors get 0.",
           "Two models, one generate call each, the same prompts and seed.")))
