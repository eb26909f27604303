"""The exercises of notebook 04_sweep: the German share of the replies over α with a seed of the learner's own, and
the perplexity cost of CP + α·CV at an α the notebook's sweep did not measure.

Both ask for a choice of the learner's own (a seed, an α), passed to the check, which measures with it: a number
copied from the notebook's tables fails. Each exercise is a ``truth`` and a ``judge`` (``chatvec_lab.course.checking``).
"""
from __future__ import annotations

from chatvec_lab.course.checking import Exercise, Wrong, as_number, close, seed_of_your_own
from chatvec_lab.course.measuring import chat_prompts, heldout_text, load_tokenizer, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


# the α grid of the coefficient sweep in notebook 04 (its `alphas`): those rows are already on screen there
# (tests/test_exercises.py checks that this matches the notebook)
SWEEP_04_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def _share_trend_truth(base, chat, cp, alphas, prompts, seed, max_new_tokens, cache_dir, language, device, dtype):
    from chatvec_lab.behaviour.sweep import sweep

    df = sweep(cp, {"chat": vector_of(base, chat)}, list(alphas), chat_prompts(prompts),
               scorers=["ended_turn", "language"], seeds=[seed], max_new_tokens=max_new_tokens, cache_dir=cache_dir,
               progress=False, language=language, device=device, dtype=dtype)
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
            return [answer[next(k for k in answer if as_number(k, "a key") == a)] for a in alphas]
        except StopIteration:
            raise Wrong(f"{what}: one value per α of {alphas}, a list (α increasing) or a dict {{α: value}}.") \
                from None
    if not isinstance(answer, (list, tuple)) or len(answer) != len(alphas):
        raise Wrong(f"{what}: one value per α of {alphas}, a list (α increasing) or a dict {{α: value}}.")
    return list(answer)


def _share_trend_judge(answer, truth, ctx):
    alphas = truth["alphas"]
    if not isinstance(answer, dict) or set(answer) != {"share_de", "falls_steadily"}:
        raise Wrong('answer a dict: {"share_de": [the mean German share at each α, α increasing], '
                    '"falls_steadily": True or False}.')
    values = _list_of(answer["share_de"], alphas, "share_de")
    shares = [as_number(v, f"the share at α = {a:g}") for v, a in zip(values, alphas)]
    for v, a in zip(shares, alphas):
        if not 0 <= v <= 1:
            raise Wrong(f"the share at α = {a:g} is {v:g}: a share of words lies between 0 and 1.")
    settings = (f"sweep(CP, {{'chat': cv}}, {alphas}, the first {ctx['prompts']} German chat prompts, "
                f"scorers=['ended_turn', 'language'], seeds=[{ctx['seed']}], max_new_tokens={ctx['max_new_tokens']})")
    ok = [abs(v - t) <= 0.5 / max(n, 1) + 1e-9 for v, t, n in zip(shares, truth["share"], truth["n"])]
    if not all(ok):
        if all(abs(v - t) <= 0.5 / max(n, 1) + 1e-9 for v, t, n in zip(shares[::-1], truth["share"], truth["n"])):
            raise Wrong("the shares are in reverse order: the first is for the smallest α.")
        i = ok.index(False)
        miss = abs(shares[i] - truth["share"][i]) * truth["n"][i]
        near = "About one reply's worth away from" if miss <= 1.5 else "Not"
        raise Wrong(f"the share at α = {alphas[i]:g}: {near} what the check measures with {settings} and your "
                    "seed (a mean over the replies of each reply's share).")
    steady = answer["falls_steadily"]
    if type(steady).__name__ not in ("bool", "bool_"):
        raise Wrong("falls_steadily should be True or False.")
    if bool(steady) != truth["falls_steadily"]:
        raise Wrong("your shares are right, but falls_steadily is not what they say: compare each α's share with "
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


EXERCISES.append(Exercise(
    name="german_share_trend",
    notebook="04_sweep",
    title="does the German share of the replies fall as α grows? A sweep with a seed of your own",
    question=(
        "Does the German share of the replies fall as α grows? Sweep `CP + α·CV` over α = 0, 0.5, 1, 1.5, 2 "
        "(α = 2 lies beyond the sweep above) on the first 16 German chat prompts with **a sampling seed of your "
        "own**: `sweep(CP, {\"chat\": ChatVector.from_models(BASE, CHAT)}, [0, 0.5, 1, 1.5, 2], "
        "prompt_sets()[\"chat\"][:16], scorers=[\"ended_turn\", \"language\"], seeds=[SEED], max_new_tokens=32, "
        "cache_dir=\".cache/sweeps\", device=DEVICE, dtype=DTYPE)`. Answer `{\"share_de\": [the mean share_de at "
        "each α, α increasing], "
        "\"falls_steadily\": True or False}`, where `falls_steadily` is True if the share is never higher than at "
        "the α before, and pass your seed to the check (`seed=SEED`): it runs the same sweep and says what it "
        "measured, the turn-end rate of the same replies included. Then read the replies: are the words that "
        "langid does not call German English sentences?"),
    params={"base": None, "chat": None, "cp": None, "alphas": (0.0, 0.5, 1.0, 1.5, 2.0), "prompts": 16,
            "seed": None, "max_new_tokens": 32, "cache_dir": ".cache/sweeps", "language": "de", "device": "auto",
            "dtype": "auto"},
    truth=_share_trend_truth,
    judge=_share_trend_judge,
    validate=seed_of_your_own,
    hints=("The share_de column holds one share per reply; average it per α (summarize does, too).",
           "falls_steadily: walk along the grid and compare each α's share with the one before; a single rise "
           "anywhere makes it False.",
           "The check runs the same sweep with the same cache_dir and your seed, so it costs nothing a second time.")))


def _alpha_of_your_own(ctx) -> None:
    alpha = ctx.get("alpha")
    if alpha is None or alpha is Ellipsis:
        raise Wrong("choose an α of your own (ALPHA = a number) and pass it to the check: alpha=ALPHA.")
    a = as_number(alpha, "α")
    if not -3 <= a <= 3:
        raise Wrong(f"α = {a:g} is far outside what the notebooks sweep: choose one between −3 and 3.")
    if any(close(a, shown, 0, 1e-9) for shown in SWEEP_04_ALPHAS):
        raise Wrong(f"the sweep above already shows ppl_de at α = {a:g}: choose an α it did not measure (not one "
                    f"of {', '.join(f'{x:g}' for x in SWEEP_04_ALPHAS)}), e.g. 0.6 or 2.")


def _perplexity_truth(base, chat, cp, alpha, language, device, dtype):
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.engines import load_target
    from chatvec_lab.behaviour.scoring import perplexity

    tok = load_tokenizer(cp)
    target, _ = load_target(cp, device=device, dtype=dtype)
    merged, _ = apply_to_model(cp, [(vector_of(base, chat), float(alpha))], device=device, dtype=dtype)
    other = "en" if language != "en" else "de"
    ppl = {lang: (perplexity(target, tok, heldout_text(lang)), perplexity(merged, tok, heldout_text(lang)))
           for lang in (language, other)}
    return {"ratio": ppl[language][1] / ppl[language][0], "difference": ppl[language][1] - ppl[language][0],
            "other": ppl[other][1] / ppl[other][0], "ppl": ppl[language], "other_language": other}


def _perplexity_judge(answer, truth, ctx):
    v = as_number(answer)
    a = float(ctx["alpha"])
    if close(v, truth["ratio"], 5e-3):
        before, after = truth["ppl"]
        names = {"de": "German", "en": "English"}
        lang, other = names.get(ctx["language"], ctx["language"]), names.get(truth["other_language"])
        worse = "worse" if truth["ratio"] > 1 else "no worse"
        return (f"At α = {a:g} the {lang} held-out perplexity goes from {before:.1f} (CP) to {after:.1f} "
                f"(CP + {a:g}·CV), {truth['ratio']:.2f}× CP's; on the {other} held-out text {truth['other']:.2f}×. "
                f"With this much of the chat vector CP models its own language {worse} than alone. Where does "
                "your α fall among the ppl_de rows of the sweep above?")
    if v > 0 and close(1 / v, truth["ratio"], 5e-3):
        raise Wrong(f"upside down: perplexity of CP + {a:g}·CV divided by CP's.")
    if close(v, truth["difference"], 5e-3):
        raise Wrong("that is a difference; the question asks for a ratio (how many times CP's perplexity).")
    if close(v, truth["other"], 5e-3):
        raise Wrong("measured on the other language's held-out text: use heldout_texts()['de'].")
    raise Wrong(f"not ppl(CP + {a:g}·CV) / ppl(CP) on the German held-out text (chatvec_lab.behaviour.scoring.perplexity), "
                "with the α you passed to the check.")


EXERCISES.append(Exercise(
    name="perplexity_cost",
    notebook="04_sweep",
    title="how many times CP's German perplexity CP + α·CV has, at an α of your own",
    question=(
        "Measure what the vector costs at **an α of your own that the sweep above did not measure** (not 0, "
        "0.25, …, 1.5: e.g. 0.6, 2 or −0.5): the perplexity of the German held-out text "
        "(`heldout_texts()[\"de\"]`, `chatvec_lab.behaviour.scoring.perplexity`) under CP + α·CV "
        "(`apply_to_model(..., device=DEVICE, dtype=DTYPE)`) divided by that under CP "
        "(`load_target(CP, device=DEVICE, dtype=DTYPE)`). Answer the ratio (accepted within "
        "0.5%) and pass your α to the check (`alpha=ALPHA`)."),
    params={"base": None, "chat": None, "cp": None, "alpha": None, "language": "de", "device": "auto", "dtype": "auto"},
    truth=_perplexity_truth,
    judge=_perplexity_judge,
    validate=_alpha_of_your_own,
    hints=("perplexity(model, tokenizer, texts) returns one number per model: measure CP once and CP + α·CV "
           "once, on the same German texts, with CP's tokenizer.",
           "apply_to_model returns the merged model and a report; the ratio is the merged model's perplexity over "
           "CP's, so above 1 means a cost.")))
