"""The demo report's sentences and captions: each generated from the numbers it describes, with their 95% intervals.

A sentence claims a difference only where the two intervals do not overlap (``report_numbers.compare``), and says
"no clear difference" where they do, whichever way the numbers come out: the result (``result_sentences``), the
refusal transfer (``refusal_transfer``), the two families (``family_sentences``), the atlas (``atlas_blocks``) and
the figures' captions (``FIGURES`` says what each figure plots; the rest of a caption comes from the data).
"""
from __future__ import annotations

import math

import pandas as pd

from chatvec_lab.course.report_numbers import BASELINE, FAMILIES, HEADLINE, ci, compare, headline_group, rows_of

# the figures the demo draws (course/demo.py), by file name
EFFECT_FIGURE = "toy_effect.png"
PERPLEXITY_FIGURE = "toy_perplexity.png"
MULTI_TURN_FIGURE = "toy_multiturn.png"
ATLAS_FIGURE = "atlas_knock_out.png"
# What each figure plots (the axes, not the result); the result part of each caption is generated from the data.
FIGURES = {
    EFFECT_FIGURE: "CP + α·chat vector over the α grid; bands: 95% intervals; dotted: the chat model.",
    MULTI_TURN_FIGURE: ("Three-turn German conversations: turn-end rate and German share at each turn, with 95% "
                        "intervals. A model that never ends its turn leaves the next turn to continue its own text."),
    ATLAS_FIGURE: "The ablation atlas, knock-out design at α = 1: one square per cell of the chat vector.",
    PERPLEXITY_FIGURE: "Perplexity of held-out German and English text under CP + α·CV (lower is better).",
    "cosine_matrix.png": ("Cosine similarity of whole vectors: the chat vector (`chat − base`), a second chat vector "
                          "trained on other data (`chat-alt − base`) and the language vector (`cp − base`)."),
    "layer_cosine.png": "The same cosines, layer by layer.",
    "sign_agreement.png": "Share of coordinates with the same sign, layer by layer (dashed: 0.5, chance).",
    "layer_norms_chat.png": "How large the chat vector is in each layer, one line per module kind (‖Δ‖).",
    "relative_norms_chat.png": "The chat vector relative to the base weights it changes (‖Δ‖ / ‖θ_base‖).",
    "spectra_chat.png": ("Singular values of the chat vector's 8 matrices with the lowest stable rank, normalised to "
                         "the largest: a fast drop means the change is close to low rank."),
    "layer_norms_chat-alt.png": "The second chat vector's size per layer and module, for comparison.",
    "layer_norms_language (cp − base).png": "The language vector's (`cp − base`) size per layer and module.",
}


# ------------------------------------------------------------------ the result

def difference_from(direction: str | None, what: str, more: str = "more", fewer: str = "fewer") -> str:
    """``compare``'s verdict in words: "clearly more than CP", "no clear difference from CP", …"""
    return {"higher": f"clearly {more} than {what}", "lower": f"clearly {fewer} than {what}",
            "same": f"no clear difference from {what}", None: f"not comparable with {what}"}[direction]


def refusal_transfer(head, cp, chat) -> str:
    """Whether refusals transferred from the chat model to CP + 1·CV, judged on intervals: ``"transfers"``
    (clearly above CP, no clearly below the chat model), ``"partly"`` (clearly above CP, clearly below chat),
    ``"does not"`` (no clearly above CP, clearly below chat), ``"no refusal to transfer"`` (the chat model
    itself refuses no clearly more than CP), ``"unclear"`` (the intervals cannot tell) or ``"unknown"``."""
    vs_cp, vs_chat = compare(head, cp, "refusal"), compare(head, chat, "refusal")
    chat_vs_cp = compare(chat, cp, "refusal")
    if None in (vs_cp, vs_chat, chat_vs_cp):
        return "unknown"
    if chat_vs_cp != "higher":
        return "no refusal to transfer"
    if vs_cp == "higher":
        return "partly" if vs_chat == "lower" else "transfers"
    return "does not" if vs_chat == "lower" else "unclear"


TRANSFER_TEXT = {
    "transfers": "the refusal transfers",
    "partly": "the refusal transfers only in part",
    "does not": "the refusal does not transfer",
    "no refusal to transfer": "there is no refusal to transfer (the chat model itself refuses no clearly more "
                              "than CP)",
    "unclear": "these intervals cannot tell whether the refusal transfers",
    "unknown": "the refusal could not be judged",
}


def refusal_sentence(head, cp, chat, who: str = HEADLINE) -> str:
    """What the refusal numbers say, whichever way they come out, with intervals."""
    verdict = refusal_transfer(head, cp, chat)
    vs_cp = difference_from(compare(head, cp, "refusal"), f"CP ({ci(cp, 'refusal')})")
    vs_chat = difference_from(compare(head, chat, "refusal"), f"the chat model ({ci(chat, 'refusal')})")
    return f"{who} refuses {ci(head, 'refusal')} of German insults, {vs_cp} and {vs_chat}: {TRANSFER_TEXT[verdict]}."


def result_sentences(rows: dict, head_name: str = HEADLINE) -> list[str]:
    """The result, sentence by sentence, from the summary's rows (``{model: row}``): turn-end, German share,
    refusal and perplexity of CP + 1·CV against CP and the chat model. Differences only where intervals do not
    overlap."""
    cp, head, chat = rows.get(BASELINE), rows.get(head_name), rows.get("chat")
    if cp is None or head is None:
        return ["This run measured no CP or CP + 1·CV row, so it states no result."]
    out = []
    turn = (f"{head_name} ends {ci(head, 'ended_turn')} of its turns on German chat requests against "
            f"{ci(cp, 'ended_turn')} for CP")
    direction = compare(head, cp, "ended_turn")
    turn += {"higher": ": clearly more (the 95% intervals do not overlap)",
             "lower": ": clearly fewer (the 95% intervals do not overlap)",
             "same": ": no clear difference (the intervals overlap)", None: ""}[direction]
    if chat is not None:
        turn += f"; the chat model ends {ci(chat, 'ended_turn')}"
        d = compare(head, chat, "ended_turn")
        turn += {"higher": f", clearly fewer than {head_name}", "lower": f", clearly more than {head_name}",
                 "same": f", no clear difference from {head_name}", None: ""}[d]
    out.append(turn + ".")
    share = (f"{ci(head, 'share_de')} of {head_name}'s reply words are German, against {ci(cp, 'share_de')} "
             f"for CP")
    if chat is not None:
        share += f" and {ci(chat, 'share_de')} for the chat model"
        d = compare(head, chat, "share_de")
        share += {"higher": f" ({head_name} answers in clearly more German than the chat model)",
                  "lower": f" ({head_name} answers in clearly less German than the chat model)",
                  "same": " (no clear difference from the chat model)", None: ""}[d]
    out.append(share + ".")
    if chat is not None:
        out.append(refusal_sentence(head, cp, chat, head_name))
    else:
        out.append(f"{head_name} refuses {ci(head, 'refusal')} of German insults, CP {ci(cp, 'refusal')}.")
    if not pd.isna(cp.get("ppl_de", math.nan)) and not pd.isna(head.get("ppl_de", math.nan)):
        change = "higher" if head["ppl_de"] > cp["ppl_de"] else "lower" if head["ppl_de"] < cp["ppl_de"] else "the same"
        out.append(f"The cost: the perplexity of held-out German text is {head['ppl_de']:.1f} under {head_name}, "
                   f"{change} than CP's {cp['ppl_de']:.1f}.")
    return out


# ------------------------------------------------------------------ captions

def _series(rows: list, name: str) -> str:
    return ", ".join(f"{r[name]:.2f}" if not pd.isna(r[name]) else "–" for r in rows)


def effect_caption(summary: pd.DataFrame, prompts: str | None = None) -> str:
    """The α-grid figure's caption, from the numbers it plots."""
    rows = rows_of(summary, "toy", prompts or headline_group(summary))
    grid = sorted((r for r in rows.values() if not pd.isna(r["alpha"])), key=lambda r: r["alpha"])
    if not grid:
        return FIGURES[EFFECT_FIGURE]
    alphas = ", ".join(f"{r['alpha']:g}" for r in grid)
    text = (f"CP + α·CV for α = {alphas} on the {prompts or headline_group(summary)} prompts. Turn-end rate: "
            f"{_series(grid, 'ended_turn')}; German share: {_series(grid, 'share_de')}; refusal of insults: "
            f"{_series(grid, 'refusal')}.")
    chat = rows.get("chat")
    if chat is not None:
        text += (f" The chat model (dotted): turn-end {ci(chat, 'ended_turn')}, German share "
                 f"{ci(chat, 'share_de')}, refusal {ci(chat, 'refusal')}.")
    return text + " Bands: 95% intervals."


def perplexity_caption(summary: pd.DataFrame) -> str:
    rows = rows_of(summary, "toy", headline_group(summary))
    grid = sorted((r for r in rows.values() if not pd.isna(r["alpha"]) and not pd.isna(r.get("ppl_de"))),
                  key=lambda r: r["alpha"])
    if len(grid) < 2:
        return FIGURES[PERPLEXITY_FIGURE]
    alphas = ", ".join(f"{r['alpha']:g}" for r in grid)
    de, en = (", ".join(f"{r[c]:.1f}" for r in grid) for c in ("ppl_de", "ppl_en"))
    return (f"Perplexity of held-out text under CP + α·CV for α = {alphas}: German {de}; English {en} (lower is "
            "better; one fixed text, so no interval).")



# ------------------------------------------------------------------ the two families, the atlas, the geometry

def family_sentences(rows: dict, families: dict) -> list[str]:
    """What the two families' numbers say, generated from them: per family, what CP + 1·CV gains over CP; then
    whether refusals transfer in each, how the language contrast differs, and what that suggests about the
    paper's claim."""
    out = []
    verdicts, names = {}, {}
    for fam, r in rows.items():
        share = families.get(fam, {}).get("base_german_share")
        names[fam] = f"{FAMILIES.get(fam, fam)}" + (f" (base: {share:.1%} German)".replace(".0%", "%")
                                                     if share is not None else "")
        cp, head, chat = r.get(BASELINE), r.get(HEADLINE), r.get("chat")
        if cp is None or head is None:
            out.append(f"In {names[fam]} CP or CP + 1·CV was not measured.")
            continue
        verdicts[fam] = refusal_transfer(head, cp, chat)
        out.append(f"In {names[fam]}, CP + 1·CV ends {ci(head, 'ended_turn')} of its turns against "
                   f"{ci(cp, 'ended_turn')} for CP ({difference_from(compare(head, cp, 'ended_turn'), 'CP', 'higher', 'lower')}), "
                   f"with {ci(head, 'share_de')} of its words German; "
                   + (refusal_sentence(head, cp, chat, 'it') if chat is not None else
                      f"it refuses {ci(head, 'refusal')} of German insults."))
    if len(verdicts) < 2:
        return out
    same_folder = families.get("toy", {}).get("folder") and \
        families.get("toy", {}).get("folder") == families.get("toy-bilingual", {}).get("folder")
    if same_folder:
        out.append("Both families were read from the same folder (`CHATVEC_TOY_BILINGUAL_DIR` points at the "
                   "default family), so the two halves of the table are the same models: a check of the plumbing, "
                   "not a comparison, and it says nothing about the paper's claim.")
        return out
    a, b = rows["toy"], rows["toy-bilingual"]
    refusal_between = compare(b.get(HEADLINE), a.get(HEADLINE), "refusal")
    between = {"higher": "clearly more often in the bilingual family", "lower": "clearly less often in the bilingual "
               "family", "same": "with no clear difference between the families", None: "(not comparable)"}[refusal_between]
    out.append(f"Refusal: in the default family {TRANSFER_TEXT[verdicts['toy']]}, in the bilingual family "
               f"{TRANSFER_TEXT[verdicts['toy-bilingual']]}; CP + 1·CV refuses German insults {between} "
               f"({ci(b.get(HEADLINE), 'refusal')} against {ci(a.get(HEADLINE), 'refusal')}).")
    if a.get("chat") is not None and b.get("chat") is not None:
        gap = {f: r[HEADLINE]["share_de"] - r["chat"]["share_de"] for f, r in (("toy", a), ("toy-bilingual", b))}
        chat_between = compare(b["chat"], a["chat"], "share_de")
        out.append("Language contrast (how much more German CP + 1·CV speaks than the chat model the vector came "
                   f"from): {gap['toy']:+.2f} in the default family, {gap['toy-bilingual']:+.2f} in the bilingual "
                   f"one; the bilingual chat model's replies are {ci(b['chat'], 'share_de')} German against "
                   f"{ci(a['chat'], 'share_de')} in the default family ("
                   + {"higher": "clearly more German, so the contrast is weaker",
                      "lower": "clearly less German, so the contrast is stronger",
                      "same": "no clear difference, so these numbers do not show a weaker contrast",
                      None: "not comparable"}[chat_between] + ").")
    good = ("transfers", "partly")
    va, vb = verdicts["toy"], verdicts["toy-bilingual"]
    if vb in good and va not in good:
        claim = ("Refusals carried over only where the base had seen more German in pre-training. Llama-2, the "
                 "paper's base, had seen some Chinese and Korean; these numbers suggest that its refusals "
                 "transferring to Chinese and Korean CP models may rest on that exposure, and that a base which "
                 "barely saw the new language should not be expected to give the same.")
    elif va in good and vb in good:
        claim = ("Refusals carried over in both families, so in the toy the base's exposure to German was not "
                 "needed for them; the paper's result with Llama-2 would not depend on its Chinese and Korean "
                 "pre-training data either, as far as the toy can say.")
    elif va in good and vb not in good:
        claim = ("Refusals carried over in the default family but not in the bilingual one, the opposite of the "
                 "expectation that more German in pre-training helps; the toy gives no support to the idea that "
                 "Llama-2's transfer rests on its Chinese and Korean pre-training data.")
    else:
        claim = ("Neither family shows refusals carrying over, so this run does not reproduce the paper's safety "
                 "result in the toy, with or without German in the base's pre-training; it cannot say whether "
                 "Llama-2's Chinese and Korean pre-training data is what made it work there.")
    out.append("What it suggests about the paper's claim: " + claim)
    return out


def atlas_blocks(atlas: pd.DataFrame) -> list[tuple]:
    """The atlas paragraph and its figure's caption, from the run's own atlas table: the whole vector's
    turn-end rate, and which cells change it clearly when left out (intervals from ``sweep.summarize``).

    The figure (``plots.plot_atlas``, knock-out) shows ``ended_turn_effect`` = the whole vector's rate minus
    the rate without the cell; its colour map is ``plots.DIVERGING``."""
    from chatvec_lab.plots import DIVERGING
    from chatvec_lab.behaviour.sweep import summarize

    a = atlas.assign(ended_turn=atlas["ended_turn"].astype(float))
    full = a[(a["design"] == "full") & (a["alpha"] == 1.0)]
    knock = a[(a["design"] == "knock-out") & (a["alpha_kind"] == "grid") & (a["alpha"] == 1.0)]
    if not len(full) or not len(knock):
        return []
    f = summarize(full, ["ended_turn"], by="design").iloc[0]
    k = summarize(knock, ["ended_turn"], by="cell")
    k["direction"] = [compare(r, f, "ended_turn") for _, r in k.iterrows()]
    n_cells, n = len(k), int(f["n"])
    worst = k.sort_values("ended_turn").iloc[0]
    best = k.sort_values("ended_turn").iloc[-1]
    lower, higher = k[k["direction"] == "lower"], k[k["direction"] == "higher"]
    positive, negative = {"RdBu_r": ("red", "blue"), "RdBu": ("blue", "red")}.get(DIVERGING, ("the upper colours",
                                                                                           "the lower colours"))
    text = (f"{n_cells} cells of the chat vector (a layer × module kind, or the embeddings, the lm_head, all norms), "
            f"each left out in turn at α = 1, on {n} replies to the tuning chat prompts (not the held-out prompts of "
            "the table above). With the whole vector CP + 1·CV ends "
            f"{ci(f, 'ended_turn')} of its turns. ")
    if len(lower):
        names = ", ".join(f"`{c}` ({ci(r, 'ended_turn')})" for c, r in lower.sort_values("ended_turn").set_index("cell").head(5).iterrows())
        text += (f"Leaving out {len(lower)} of the cells clearly lowers it (intervals that do not overlap the whole "
                 f"vector's): {names}{' …' if len(lower) > 5 else ''}; the behaviour needs them. ")
    else:
        text += (f"No single cell's absence lowers it clearly: the lowest, without `{worst['cell']}`, is "
                 f"{ci(worst, 'ended_turn')}, overlapping the whole vector's interval. ")
    if len(higher):
        text += (f"Leaving out {len(higher)} cell(s) clearly raises it (the highest, without `{best['cell']}`: "
                 f"{ci(best, 'ended_turn')}).")
    caption = (f"Each square: CP + 1·CV's turn-end rate with the whole vector ({f['ended_turn']:.2f}) minus its rate "
               f"without that cell, on {n} prompts. Positive ({positive}): fewer turns end without the cell — the "
               f"behaviour needs it; negative ({negative}): more end without it; near 0 (white): no change. Here the "
               f"largest value is {f['ended_turn'] - worst['ended_turn']:+.2f} (`{worst['cell']}`), the smallest "
               f"{f['ended_turn'] - best['ended_turn']:+.2f} (`{best['cell']}`). `atlas.csv` holds every cell and "
               "reply.")
    return [("p", text.strip()), ("fig", ATLAS_FIGURE, caption)]


def geometry_captions(facts: dict) -> dict[str, str]:
    """The geometry figures' captions with their numbers (``run.json``'s ``geometry``); a figure without facts
    keeps its plain description."""
    out = {}
    cos = facts.get("cosine") or {}
    verdicts = facts.get("verdicts") or {}
    if cos:
        pairs = "; ".join(f"{p}: {v:.3f}" for p, v in cos.items())
        said = " ".join(f"{p}: {v}." for p, v in verdicts.items())
        out["cosine_matrix.png"] = f"{FIGURES['cosine_matrix.png']} Cosines: {pairs}. {said}".strip()
    for key, fig in (("layer_cosine", "layer_cosine.png"), ("sign_agreement", "sign_agreement.png")):
        ranges = facts.get(key) or {}
        if ranges:
            text = "; ".join(f"{p}: from {lo:.3f} (layer {llo}) to {hi:.3f} (layer {lhi})"
                             for p, (lo, llo, hi, lhi) in ranges.items())
            out[fig] = f"{FIGURES[fig]} By layer, {text}."
    for name, (layer, module, value) in (facts.get("largest") or {}).items():
        fig = f"layer_norms_{name}.png"
        if fig in FIGURES:
            out[fig] = f"{FIGURES[fig]} Largest: layer {layer}, `{module}` (‖Δ‖ = {value:.3g})."
    rel = facts.get("largest_relative")
    if rel:
        out["relative_norms_chat.png"] = (f"{FIGURES['relative_norms_chat.png']} Largest: layer {rel[0]}, "
                                          f"`{rel[1]}` ({rel[2]:.3g}).")
    spec = facts.get("spectra")
    if spec:
        out["spectra_chat.png"] = (f"{FIGURES['spectra_chat.png']} Their stable ranks: {spec['low']:.1f} to "
                                   f"{spec['high']:.1f}, against {spec['random_low']:.0f} to {spec['random_high']:.0f} "
                                   "for random matrices of the same shapes.")
    return out
