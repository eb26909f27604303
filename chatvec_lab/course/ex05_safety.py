"""The exercises of notebook 05_safety: refusal rates of the chat model and of CP + 1·CV on insults and a seed of
the learner's own, and the turn-end rate at each turn of three-turn conversations (each a ``truth`` and a
``judge``: ``chatvec_lab.course.checking``)."""
from __future__ import annotations

from chatvec_lab.course.checking import Exercise, Wrong, as_rate, on_grid, rate_miss, rate_ok, seed_of_your_own
from chatvec_lab.course.measuring import chat_prompts, load_tokenizer, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


_LANGUAGE_NAMES = {"de": "German", "en": "English"}


def _insults_of_your_own(ctx) -> None:
    prompts = ctx.get("prompts")
    if prompts is None or prompts is Ellipsis:
        raise Wrong("choose German insults of your own (MY_INSULTS = 8 of prompt_sets()['offensive']) and pass "
                    "them to the check: prompts=MY_INSULTS.")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise Wrong(f"prompts should be a list of insults (strings), not a {type(prompts).__name__}.")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise Wrong("every prompt should be a non-empty string (an insult).")
    if not 4 <= len(prompts) <= 16:
        raise Wrong(f"choose between 4 and 16 insults (8 is a good number), not {len(prompts)}.")
    if len(set(prompts)) != len(prompts):
        raise Wrong("your insults repeat one another: choose distinct ones.")
    seed_of_your_own(ctx)


def _refusal_truth(base, chat, cp, prompts, seed, max_new_tokens, cache_dir, device, dtype):
    from chatvec_lab.behaviour.sweep import sweep

    cv = vector_of(base, chat)
    common = dict(scorers=["refusal", "language"], seeds=[seed], max_new_tokens=max_new_tokens, cache_dir=cache_dir,
                  progress=False, device=device, dtype=dtype)
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
        raise Wrong('answer a dict: {"chat": the chat model\'s refusal rate, "cp_cv": CP + 1·CV\'s refusal rate}.')
    n = len(ctx["prompts"])
    rates = {k: as_rate(answer[k], f"the {label} rate") for k, label in (("chat", "chat model's"), ("cp_cv", "CP + 1·CV's"))}
    for key, label in (("chat", "the chat model's rate"), ("cp_cv", "CP + 1·CV's rate")):
        on_grid(rates[key], n, label, f"your {n} replies")
    settings = (f"your {n} insults, seeds=[{ctx['seed']}], max_new_tokens={ctx['max_new_tokens']}, the chat model "
                "as the target at α = 0 and CP at α = 1")
    wrong = [k for k in ("chat", "cp_cv") if not rate_ok(rates[k], truth[k], n)]
    if not wrong:
        return _refusal_remark(truth, ctx)
    if len(wrong) == 2 and rate_ok(rates["chat"], truth["cp_cv"], n) and rate_ok(rates["cp_cv"], truth["chat"], n):
        raise Wrong("swapped: chat is the chat model's rate, cp_cv the rate of CP + 1·CV.")
    key = wrong[0]
    label = "the chat model's rate" if key == "chat" else "CP + 1·CV's rate"
    raise Wrong(f"{label}: " + rate_miss(rates[key], truth[key], n, settings))


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


EXERCISES.append(Exercise(
    name="refusal_rates",
    notebook="05_safety",
    title="the refusal rates of the chat model and of CP + 1·CV on insults and a seed of your own",
    question=(
        "Does the chat model's refusal carry over to CP + 1·CV? Measure it on a sample of your own: choose "
        "**8 German insults** from `prompt_sets()[\"offensive\"]` (e.g. a slice) and **a "
        "sampling seed of your own**, and measure the refusal rate of the chat model itself and of CP + 1·CV on "
        "them, each with one sweep: `sweep(CHAT, {\"chat\": cv}, [0.0], MY_INSULTS, ...)` (α = 0 leaves the chat "
        "model as it is) and `sweep(CP, {\"chat\": cv}, [1.0], MY_INSULTS, ...)`, both with "
        "`scorers=[\"refusal\", \"language\"], seeds=[SEED], max_new_tokens=32, cache_dir=\".cache/sweeps\", "
        "device=DEVICE, dtype=DTYPE` "
        "(`cv = ChatVector.from_models(BASE, CHAT)`). Answer `{\"chat\": rate, \"cp_cv\": rate}` and pass your "
        "choice to the check (`prompts=MY_INSULTS, seed=SEED`): it measures the same replies, so a rate read off "
        "the table above fails."),
    params={"base": None, "chat": None, "cp": None, "prompts": None, "seed": None, "max_new_tokens": 32,
            "cache_dir": ".cache/sweeps", "device": "auto", "dtype": "auto"},
    truth=_refusal_truth,
    judge=_refusal_judge,
    validate=_insults_of_your_own,
    hints=("Both sweeps give one row per insult, with a refusal column: True where a refusal phrase was found.",
           "A rate is the number of refusing replies over the number of your replies: with 8 insults and one seed "
           "it is a multiple of 1/8.",
           "The check measures with the insults and the seed you pass it; give it exactly the list you swept.")))


def _multi_turn_truth(base, chat, cp, alpha, conversations, seed, max_new_tokens, device, dtype):
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.generation import converse_many

    prompts = chat_prompts(3 * conversations)
    threads = [prompts[3 * i:3 * i + 3] for i in range(conversations)]
    model, _ = apply_to_model(cp, [(vector_of(base, chat), alpha)], device=device, dtype=dtype)
    out = converse_many(model, load_tokenizer(cp), threads, seed=seed, max_new_tokens=max_new_tokens)
    return [float(r) for r in out.groupby("turn")["ended_turn"].mean()]


def _multi_turn_judge(answer, truth, ctx):
    if not isinstance(answer, (list, tuple)) or len(answer) != len(truth):
        raise Wrong(f"answer a list of {len(truth)} rates, one per turn (turn 1 first).")
    rates = [as_rate(r, f"the rate at turn {i}") for i, r in enumerate(answer, 1)]
    n = ctx["conversations"]
    for i, r in enumerate(rates, 1):
        on_grid(r, n, f"the rate at turn {i}", f"the {n} replies of a turn")
    settings = (f"{n} conversations of 3 user turns from the German chat prompts (prompts 3i … 3i+2), "
                f"converse_many(..., seed={ctx['seed']}, max_new_tokens={ctx['max_new_tokens']})")
    for i, (r, t) in enumerate(zip(rates, truth), 1):
        if not rate_ok(r, t, n):
            raise Wrong(f"turn {i}: " + rate_miss(r, t, n, settings))
    ends = "; ".join(f"turn {i}: {round(t * n)} of {n}" for i, t in enumerate(truth, 1))
    return (f"CP + {ctx['alpha']:g}·CV ends its turn in {ends} conversations. With {n} conversations one reply "
            f"moves a rate by {1 / n:.2f}: a difference of one reply between turns is noise.")


EXERCISES.append(Exercise(
    name="multi_turn_ends",
    notebook="05_safety",
    title="the turn-end rate of CP + 1·CV at each turn of 3-turn conversations",
    question=(
        "Build 4 conversations of 3 user turns from the German chat prompts (conversation i is prompts "
        "3i, 3i+1, 3i+2 of `prompt_sets()[\"chat\"]`), run them through CP + 1·CV (`apply_to_model(CP, "
        "[(cv, 1.0)], device=DEVICE, dtype=DTYPE)`) with "
        "`converse_many(model, tokenizer, threads, seed=0, max_new_tokens=32)` and compute the turn-end rate at "
        "each turn. Answer a list of 3 rates, turn 1 first."),
    params={"base": None, "chat": None, "cp": None, "alpha": 1.0, "conversations": 4, "seed": 0,
            "max_new_tokens": 32, "device": "auto", "dtype": "auto"},
    truth=_multi_turn_truth,
    judge=_multi_turn_judge,
    hints=("converse_many returns one row per conversation and turn, with a turn column (from 1).",
           "A turn's rate is over the rows of that turn only: the share of them that ended the turn, one reply per "
           "conversation.")))
