"""The demo's report: a run's numbers → tables, sentences and captions → ``index.html`` and ``README.md``.

Every sentence that states a result is generated here from the numbers it describes (this run's
``summary.csv``, ``atlas.csv``, ``multiturn_summary.csv`` and ``run.json``), with its 95% intervals; a
difference is claimed only where the two intervals do not overlap, otherwise the text says there is no clear
difference. Rates and their intervals come from ``sweep.summarize``. The HTML is self-contained: its style is
inline, its figures are files beside it, and it loads nothing from the network.

    write_report(folder, plan="default", clock=clock, notebooks=[("00_course", "ran in 3 s")])
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

HEADLINE = "CP + 1·CV"
BASELINE = "CP"
FAMILIES = {"toy": "the default family", "toy-bilingual": "the bilingual family"}
PROMPT_GROUPS = {"held-out": "held-out prompts (written for the evaluation, used in no training and no tuning)",
                 "tuning": "tuning prompts (the toy recipe was chosen on them)"}
# summary.csv's rates: column → (prompt set it is measured on, reply column, what the report calls it)
RATES = {
    "turn_end": ("chat", "ended_turn", "turn-end rate, German chat requests"),
    "german_share": ("chat", "share_de", "German share of reply words, chat requests"),
    "refusal": ("offensive", "refusal", "refusal rate, German insults"),
    "refusal_chat": ("chat", "refusal", "refusal rate, harmless chat requests (a refusal is a mistake)"),
}
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
PLANS = {"quick": "**Quick run** (`--quick`)", "default": "**Default run**", "full": "**Full run** (`--full`)"}


# ------------------------------------------------------------------ numbers

def interval_method() -> str:
    """How ``sweep.summarize`` computes its intervals, in a few words read from its own docstring."""
    from chatvec_lab.behaviour.sweep import summarize

    doc = (summarize.__doc__ or "").lower()
    if "wilson" in doc:
        text = "the Wilson score interval for the rates"
        if "t·se" in doc:
            text += "; mean ± t·SE, clipped to [0, 1], for the German share"
        return text
    return "the interval `sweep.summarize` computes"


def clustered() -> bool:
    """Whether ``sweep.summarize`` counts the replies of one prompt (several seeds) as clustered."""
    from chatvec_lab.behaviour.sweep import summarize

    return "design effect" in (summarize.__doc__ or "").lower()


def label(alpha: float) -> str:
    """A row's model name for CP + α·CV."""
    return BASELINE if alpha == 0 else f"CP + {alpha:g}·CV"


def _order(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows in reading order: family, sampling, prompt group, then CP, CP + α·CV by α, chat, others."""
    def model_key(row):
        if not pd.isna(row["alpha"]):
            return (0, float(row["alpha"]), "")
        return (1, 0.0, "") if row["model"] == "chat" else (2, 0.0, str(row["model"]))
    keys = []
    for _, row in summary.iterrows():
        fam = list(FAMILIES).index(row["family"]) if row.get("family") in FAMILIES else 9
        group = list(PROMPT_GROUPS).index(row["prompts"]) if row.get("prompts") in PROMPT_GROUPS else 9
        keys.append((fam, 0 if row.get("sampling", "family") == "family" else 1, str(row.get("sampling", "")),
                     group, *model_key(row)))
    order = sorted(range(len(summary)), key=lambda i: keys[i])
    return summary.iloc[order].reset_index(drop=True)


def summarize_replies(df: pd.DataFrame) -> pd.DataFrame:
    """One row per family, sampling, prompt group and model: each rate of ``RATES`` with its 95% interval
    (``_lo``, ``_hi``; from ``sweep.summarize``), how many replies it counts (``n_chat``, ``n_insults``), the
    prompts and seeds behind them, and the held-out perplexities. This is ``summary.csv``."""
    from chatvec_lab.behaviour.sweep import summarize

    df = df.copy()
    if "family" not in df:
        df["family"] = "toy"
    keys = [k for k in ("family", "sampling", "prompts", "model") if k in df.columns]
    parts = []
    for name, (prompt_set, column, _) in RATES.items():
        rows = df[df["prompt_set"] == prompt_set].copy()
        if not len(rows):
            continue
        rows[column] = rows[column].astype(float)
        s = summarize(rows, [column], by=keys)
        s = s.rename(columns={column: name, f"{column}_lo": f"{name}_lo", f"{column}_hi": f"{name}_hi",
                              "n": "n_chat" if prompt_set == "chat" else "n_insults"})
        parts.append(s[keys + [c for c in s.columns if c not in keys]])
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p[[c for c in p.columns if c not in out.columns or c in keys]], on=keys, how="outer")
    g = df.groupby(keys, sort=False, dropna=False)
    extra = g.agg(alpha=("alpha", "first"), prompts_n=("prompt", "nunique"), seeds=("seed", "nunique"),
                  replies=("reply", "size")).reset_index()
    for col in ("ppl_en", "ppl_de"):
        if col in df:
            extra[col] = g[col].first().to_numpy()
    out = extra.merge(out, on=keys, how="left")
    return _order(out)


def summarize_turns(mt: pd.DataFrame) -> pd.DataFrame:
    """The three-turn conversations per model and turn: turn-end rate and German share with 95% intervals."""
    from chatvec_lab.behaviour.sweep import summarize

    mt = mt.assign(ended_turn=mt["ended_turn"].astype(float))
    s = summarize(mt, ["ended_turn", "share_de"], by=["model", "turn"])
    s = s.rename(columns={c: c.replace("ended_turn", "turn_end").replace("share_de", "german_share") for c in s})
    return s.rename(columns={"n": "replies"})


def ci(row, name: str, digits: int = 2) -> str:
    """``0.91 [0.84, 0.95]``: a rate and its 95% interval ("–" when undefined)."""
    v = row.get(name) if row is not None else None
    if v is None or pd.isna(v):
        return "–"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def compare(a, b, name: str) -> str | None:
    """``"higher"`` / ``"lower"`` where the 95% intervals of ``a`` and ``b`` do not overlap, ``"same"`` (no clear
    difference) where they do; None when either is missing."""
    if a is None or b is None:
        return None
    try:
        a_lo, a_hi, b_lo, b_hi = (float(x[k]) for x, k in ((a, f"{name}_lo"), (a, f"{name}_hi"),
                                                             (b, f"{name}_lo"), (b, f"{name}_hi")))
    except (KeyError, TypeError, ValueError):
        return None
    if any(math.isnan(x) for x in (a_lo, a_hi, b_lo, b_hi)):
        return None
    return "higher" if a_lo > b_hi else "lower" if a_hi < b_lo else "same"


def _than(direction: str | None, what: str, more: str = "more", fewer: str = "fewer") -> str:
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
    vs_cp = _than(compare(head, cp, "refusal"), f"CP ({ci(cp, 'refusal')})")
    vs_chat = _than(compare(head, chat, "refusal"), f"the chat model ({ci(chat, 'refusal')})")
    return f"{who} refuses {ci(head, 'refusal')} of German insults, {vs_cp} and {vs_chat}: {TRANSFER_TEXT[verdict]}."


def result_sentences(rows: dict, head_name: str = HEADLINE) -> list[str]:
    """The result, sentence by sentence, from the summary's rows (``{model: row}``): turn-end, German share,
    refusal and perplexity of CP + 1·CV against CP and the chat model. Differences only where intervals do not
    overlap."""
    cp, head, chat = rows.get(BASELINE), rows.get(head_name), rows.get("chat")
    if cp is None or head is None:
        return ["This run measured no CP or CP + 1·CV row, so it states no result."]
    out = []
    turn = (f"{head_name} ends {ci(head, 'turn_end')} of its turns on German chat requests against "
            f"{ci(cp, 'turn_end')} for CP")
    direction = compare(head, cp, "turn_end")
    turn += {"higher": ": clearly more (the 95% intervals do not overlap)",
             "lower": ": clearly fewer (the 95% intervals do not overlap)",
             "same": ": no clear difference (the intervals overlap)", None: ""}[direction]
    if chat is not None:
        turn += f"; the chat model ends {ci(chat, 'turn_end')}"
        d = compare(head, chat, "turn_end")
        turn += {"higher": f", clearly fewer than {head_name}", "lower": f", clearly more than {head_name}",
                 "same": f", no clear difference from {head_name}", None: ""}[d]
    out.append(turn + ".")
    share = (f"{ci(head, 'german_share')} of {head_name}'s reply words are German, against {ci(cp, 'german_share')} "
             f"for CP")
    if chat is not None:
        share += f" and {ci(chat, 'german_share')} for the chat model"
        d = compare(head, chat, "german_share")
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


# ------------------------------------------------------------------ tables

def _rows(summary: pd.DataFrame, family: str = "toy", prompts: str | None = None, sampling: str = "family") -> dict:
    s = summary
    if "family" in s.columns:
        s = s[s["family"] == family]
    if "sampling" in s.columns:
        s = s[s["sampling"] == sampling]
    if prompts is not None and "prompts" in s.columns:
        s = s[s["prompts"] == prompts]
    return {r["model"]: r for _, r in s.iterrows()}


def headline_group(summary: pd.DataFrame) -> str:
    groups = set(summary["prompts"]) if "prompts" in summary.columns else set()
    return "held-out" if "held-out" in groups else (sorted(groups)[0] if groups else "")


def _model_cell(model: str) -> str:
    return f"{model} (baseline: no vector)" if model == BASELINE else model


HEADLINE_COLUMNS = {"turn_end": "turn-end rate, German chat requests [95% interval]",
                    "german_share": "German share of reply words [95% interval]",
                    "refusal": "refusal rate, German insults [95% interval]",
                    "refusal_chat": "refusal rate, harmless chat requests [95% interval]"}


def headline_table(summary: pd.DataFrame, family: str = "toy", prompts: str | None = None,
                   sampling: str = "family") -> pd.DataFrame:
    """THE table: one row per model (CP first, the baseline), each rate with its 95% interval, the held-out
    German perplexity and the replies counted."""
    prompts = prompts or headline_group(summary)
    out = []
    for model, r in _rows(summary, family, prompts, sampling).items():
        cells = {"model": _model_cell(model), "α": "–" if pd.isna(r["alpha"]) else f"{r['alpha']:g}"}
        cells.update({h: ci(r, k) for k, h in HEADLINE_COLUMNS.items()})
        cells["German perplexity, held-out text"] = "–" if pd.isna(r.get("ppl_de")) else f"{r['ppl_de']:.1f}"
        cells["replies (chat requests / insults)"] = f"{_int(r.get('n_chat'))} / {_int(r.get('n_insults'))}"
        out.append(cells)
    return pd.DataFrame(out)


def _int(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{int(v)}"


def _short(text, limit: int = 160) -> str:
    text = " ↵ ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def examples_table(replies: pd.DataFrame, models, family: str = "toy", prompts: str | None = None) -> tuple:
    """A reply per model to one German chat request and to one insult (the same two prompts for every model,
    the first seed): the request is the group's first; the insult the first one the chat model refused, if
    it refused any, else the first. Returns ``(table, how the prompts were chosen)``."""
    df = replies
    if "family" in df:
        df = df[df["family"] == family]
    if "sampling" in df:
        df = df[df["sampling"] == "family"]
    if prompts and "prompts" in df:
        df = df[df["prompts"] == prompts]
    if not len(df):
        return pd.DataFrame(), ""
    df = df[df["seed"] == df["seed"].min()]
    chat_prompts = list(dict.fromkeys(df.loc[df["prompt_set"] == "chat", "prompt"]))
    insults = list(dict.fromkeys(df.loc[df["prompt_set"] == "offensive", "prompt"]))
    refused = df[(df["model"] == "chat") & (df["prompt_set"] == "offensive") & df["refusal"].astype(bool)]
    insult = refused["prompt"].iloc[0] if len(refused) else (insults[0] if insults else None)
    chosen = [p for p in (chat_prompts[:1] + [insult]) if p is not None]
    rows = []
    for model in models:
        for p in chosen:
            hit = df[(df["model"] == model) & (df["prompt"] == p)]
            if not len(hit):
                continue
            r = hit.iloc[0]
            rows.append({"model": _model_cell(model), "prompt": p, "reply (first 160 characters; ↵: new line)": _short(r["reply"]),
                         "ended its turn": "yes" if bool(r["ended_turn"]) else "no",
                         "refusal": "yes" if bool(r["refusal"]) else "no"})
    how = ("the group's first chat request, and " + ("the first insult the chat model refused" if len(refused)
                                                     else "the first insult (the chat model refused none)"))
    return pd.DataFrame(rows), how


# ------------------------------------------------------------------ sections

def _series(rows: list, name: str) -> str:
    return ", ".join(f"{r[name]:.2f}" if not pd.isna(r[name]) else "–" for r in rows)


def effect_caption(summary: pd.DataFrame, prompts: str | None = None) -> str:
    """The α-grid figure's caption, from the numbers it plots."""
    rows = _rows(summary, "toy", prompts or headline_group(summary))
    grid = sorted((r for r in rows.values() if not pd.isna(r["alpha"])), key=lambda r: r["alpha"])
    if not grid:
        return FIGURES[EFFECT_FIGURE]
    alphas = ", ".join(f"{r['alpha']:g}" for r in grid)
    text = (f"CP + α·CV for α = {alphas} on the {prompts or headline_group(summary)} prompts. Turn-end rate: "
            f"{_series(grid, 'turn_end')}; German share: {_series(grid, 'german_share')}; refusal of insults: "
            f"{_series(grid, 'refusal')}.")
    chat = rows.get("chat")
    if chat is not None:
        text += (f" The chat model (dotted): turn-end {ci(chat, 'turn_end')}, German share "
                 f"{ci(chat, 'german_share')}, refusal {ci(chat, 'refusal')}.")
    return text + " Bands: 95% intervals."


def perplexity_caption(summary: pd.DataFrame) -> str:
    rows = _rows(summary, "toy", headline_group(summary))
    grid = sorted((r for r in rows.values() if not pd.isna(r["alpha"]) and not pd.isna(r.get("ppl_de"))),
                  key=lambda r: r["alpha"])
    if len(grid) < 2:
        return FIGURES[PERPLEXITY_FIGURE]
    alphas = ", ".join(f"{r['alpha']:g}" for r in grid)
    de, en = (", ".join(f"{r[c]:.1f}" for r in grid) for c in ("ppl_de", "ppl_en"))
    return (f"Perplexity of held-out text under CP + α·CV for α = {alphas}: German {de}; English {en} (lower is "
            "better; one fixed text, so no interval).")


def family_blocks(summary: pd.DataFrame, families: dict, prompts: str | None = None) -> list[tuple]:
    """The two families side by side (CP, CP + 1·CV, chat): a table with intervals, and what it says.

    ``families``: ``{name: {"found": bool, "base_german_share": float, "folder": str, "note": str}}`` (run.json)."""
    blocks: list[tuple] = [("h2", "Two families: what transfers depends on what the base saw")]
    second = families.get("toy-bilingual", {})
    if not second.get("found"):
        blocks.append(("p", f"The second family (`toy-bilingual`) was not found ({second.get('note') or 'not measured'}), "
                       "so this run compares nothing here."))
        return blocks
    prompts = prompts or headline_group(summary)
    rows = {f: _rows(summary, f, prompts) for f in ("toy", "toy-bilingual")}
    table = []
    for fam, r in rows.items():
        share = families.get(fam, {}).get("base_german_share")
        for model in (BASELINE, HEADLINE, "chat"):
            if model in r:
                table.append({"family": fam, "German in the base's pre-training":
                              "–" if share is None else f"{share:.1%}".replace(".0%", "%"),
                              "model": _model_cell(model), "turn-end rate [95% interval]": ci(r[model], "turn_end"),
                              "German share of reply words [95% interval]": ci(r[model], "german_share"),
                              "refusal rate, German insults [95% interval]": ci(r[model], "refusal"),
                              "replies (chat / insults)": f"{_int(r[model].get('n_chat'))} / {_int(r[model].get('n_insults'))}"})
    blocks.append(("table", pd.DataFrame(table),
                   f"Each family's CP, CP + 1·CV (its own chat vector) and chat model, {prompts} prompts, the same "
                   "prompts and seeds for both families."))
    blocks += [("p", s) for s in family_sentences(rows, families)]
    return blocks


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
        out.append(f"In {names[fam]}, CP + 1·CV ends {ci(head, 'turn_end')} of its turns against "
                   f"{ci(cp, 'turn_end')} for CP ({_than(compare(head, cp, 'turn_end'), 'CP', 'higher', 'lower')}), "
                   f"with {ci(head, 'german_share')} of its words German; "
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
        gap = {f: r[HEADLINE]["german_share"] - r["chat"]["german_share"] for f, r in (("toy", a), ("toy-bilingual", b))}
        chat_between = compare(b["chat"], a["chat"], "german_share")
        out.append("Language contrast (how much more German CP + 1·CV speaks than the chat model the vector came "
                   f"from): {gap['toy']:+.2f} in the default family, {gap['toy-bilingual']:+.2f} in the bilingual "
                   f"one; the bilingual chat model's replies are {ci(b['chat'], 'german_share')} German against "
                   f"{ci(a['chat'], 'german_share')} in the default family ("
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


# ------------------------------------------------------------------ the whole report

def _sampling_text(sampling: dict | None) -> str:
    if not sampling:
        return "the family's own sampling"
    parts = [f"temperature {sampling['temperature']:g}"] + ([f"top-k {sampling['top_k']}"] if sampling.get("top_k") else []) \
        + ([f"top-p {sampling['top_p']:g}"] if sampling.get("top_p") else [])
    return f"the family's own sampling ({', '.join(parts)}, up to {sampling.get('max_new_tokens')} new tokens)"


def report_blocks(summary: pd.DataFrame, replies: pd.DataFrame | None = None, run: dict | None = None,
                  nb_results=(), clock=None, figures=(), atlas: pd.DataFrame | None = None,
                  turns: pd.DataFrame | None = None) -> list[tuple]:
    """The report as blocks (see ``render_markdown``). ``run``: run.json (plan, its settings, families, geometry
    facts, sampling); ``clock``: a ``demo.Clock`` (its phases and totals)."""
    run = run or {}
    plan = run.get("plan", "default")
    settings = run.get("settings", {})
    figures = set(figures)
    group = headline_group(summary)
    rows = _rows(summary, "toy", group)
    blocks: list[tuple] = [("h1", "The chat vector on a toy model family: a chatvec_lab report")]
    blocks.append(("p", "A **chat vector** is the difference between a chat model's weights and those of the base model "
                   "it was fine-tuned from, `θ_chat − θ_base`. Huang et al. (ACL 2024, "
                   "[arXiv 2310.04799](https://arxiv.org/abs/2310.04799)) add it to a model continually pre-trained "
                   "(CP) from the same base on a new language, and report that the CP model then follows the chat "
                   "format in that language without training, and refuses harmful requests as the chat model does. "
                   "This report measures which of these carry over on a toy family small enough to run on a laptop. "
                   "Every sentence below that states a result is generated from this run's own numbers and claims a "
                   "difference only where the 95% intervals do not overlap."))
    kind = PLANS.get(plan, plan)
    if settings:
        kind += (f": {settings.get('what', '')}" if settings.get("what") else "")
    if clock is not None:
        wall, cpu = clock.total()
        load = f"; load average {clock.load:.1f} when it started" if getattr(clock, "load", None) is not None else ""
        kind += (f". It took **{wall:.0f} s** wall-clock and **{cpu:.0f} s of CPU time** (this process and every "
                 f"process it started, the notebook kernels included) on {os.cpu_count()} cores{load}.")
    else:
        kind += "."
    blocks.append(("p", kind + {"quick": " `chatvec demo` (no flag) measures every held-out prompt; `--full` "
                                "everything.", "default": " `chatvec demo --full` adds the tuning prompts, "
                                "three seeds, a second sampling, three-turn conversations, the atlas's keep-only "
                                "design and every notebook.", "full": ""}.get(plan, "")))

    # the result: the table first, then what it says, then replies to read
    blocks.append(("h2", "The result"))
    table = headline_table(summary, "toy", group)
    seeds = int(rows[BASELINE]["seeds"]) if BASELINE in rows and not pd.isna(rows[BASELINE].get("seeds")) else 1
    counts = (f"{_int(rows[BASELINE].get('n_chat'))} replies to German chat requests and "
              f"{_int(rows[BASELINE].get('n_insults'))} to insults per model, {seeds} per prompt"
              if BASELINE in rows else "")
    caption = (f"The default family, {group} prompts ({counts}), {_sampling_text(run.get('sampling'))}. Each rate "
               f"is a share of replies with its 95% interval ({interval_method()}); the last column says how many "
               "replies it counts.")
    if seeds > 1:
        caption += (" Replies to one prompt under several seeds are not independent: the intervals count them as "
                    "clustered by prompt (a design effect), not as independent replies." if clustered() else
                    " Replies to one prompt share the prompt, so with several seeds the interval, which counts "
                    "replies, is narrower than the prompts alone warrant.")
    blocks.append(("table", table, caption))
    blocks += [("p", s) for s in result_sentences(rows)]
    if replies is not None and len(replies):
        models = [m for m in rows]
        examples, how = examples_table(replies, models, "toy", group)
        if len(examples):
            blocks.append(("table", examples, f"Replies to read: each model's reply to the same two prompts ({how}), "
                           "first seed. The toy's replies are short and often garbled: read whether a reply stays in "
                           "German, ends its turn and refuses, not its sense."))
    if EFFECT_FIGURE in figures:
        blocks.append(("fig", EFFECT_FIGURE, effect_caption(summary, group)))

    blocks += family_blocks(summary, run.get("families", {}), group)

    others = summary[(summary.get("family", "toy") == "toy")
                     & ((summary["prompts"] != group) | (summary["sampling"] != "family"))] \
        if {"prompts", "sampling"} <= set(summary.columns) else summary.iloc[:0]
    if len(others):
        blocks.append(("h2", "The same on other prompts and sampling"))
        said = []
        for (g, s), part in others.groupby(["prompts", "sampling"], sort=False):
            r = {row["model"]: row for _, row in part.iterrows()}
            if BASELINE in r and HEADLINE in r:
                said.append(f"{g} prompts, sampling `{s}`: turn-end {ci(r[HEADLINE], 'turn_end')} against "
                            f"{ci(r[BASELINE], 'turn_end')} for CP ({_than(compare(r[HEADLINE], r[BASELINE], 'turn_end'), 'CP')}); "
                            + (TRANSFER_TEXT[refusal_transfer(r[HEADLINE], r[BASELINE], r.get('chat'))] +
                               f" (refusal {ci(r[HEADLINE], 'refusal')}, chat {ci(r['chat'], 'refusal')})"
                               if r.get("chat") is not None else ""))
        blocks.append(("ul", said))

    blocks.append(("h2", "Three-turn conversations"))
    if turns is not None and len(turns):
        last = int(turns["turn"].max())
        at = {r["model"]: r for _, r in turns[turns["turn"] == last].iterrows()}
        if HEADLINE in at and BASELINE in at:
            blocks.append(("p", f"Held-out German conversations of {last} user turns, each reply fed back as the "
                           f"model's turn. At turn {last}, {HEADLINE} ends {ci(at[HEADLINE], 'turn_end')} of its "
                           f"turns, CP {ci(at[BASELINE], 'turn_end')} "
                           f"({_than(compare(at[HEADLINE], at[BASELINE], 'turn_end'), 'CP')})"
                           + (f", the chat model {ci(at['chat'], 'turn_end')}" if "chat" in at else "")
                           + f"; {ci(at[HEADLINE], 'german_share')} of {HEADLINE}'s words are German."))
        if MULTI_TURN_FIGURE in figures:
            blocks.append(("fig", MULTI_TURN_FIGURE, FIGURES[MULTI_TURN_FIGURE]))
    else:
        blocks.append(("p", "Not measured in this run; `chatvec demo --full` adds them."))

    placed = {EFFECT_FIGURE, MULTI_TURN_FIGURE}
    if atlas is not None and len(atlas):
        ab = atlas_blocks(atlas)
        if ab:
            blocks.append(("h2", "Where in the vector chat lives"))
            blocks += [b for b in ab if b[0] != "fig" or ATLAS_FIGURE in figures]
            placed.add(ATLAS_FIGURE)

    captions = {PERPLEXITY_FIGURE: perplexity_caption(summary), **geometry_captions(run.get("geometry", {}))}
    rest = [f for f in FIGURES if f in figures and f not in placed] + sorted(f for f in figures if f not in FIGURES)
    if rest:
        blocks.append(("h2", "What the addition costs, and the vectors' geometry"))
        for f in rest:
            blocks.append(("fig", f, captions.get(f, FIGURES.get(f, ""))))

    blocks.append(("h2", "What was measured"))
    blocks.append(("p", "Each model answered German chat requests and German insults. Each reply is scored: does it "
                   "**end its turn** with `<|end|>` (a chat model stops; a plain language model runs on), what "
                   "**share of its words is German** (langid, word by word), and, for insults, is it a **refusal** "
                   "(for chat requests a refusal is a mistake). The **perplexity** of held-out English and German "
                   "text says what the addition costs the model's language modelling. The toy family "
                   "(`chatvec_lab.toy`): `base` is pre-trained on English text with a little German; `chat` is base "
                   "fine-tuned on English chat dialogues that end each reply with `<|end|>` and answer insults with a "
                   "polite English refusal; `cp` is base continually pre-trained on German. The chat vector is "
                   "`chat − base`. " + (settings.get("details", ""))))

    blocks.append(("h2", "Notebooks"))
    nb_results = list(nb_results)
    if nb_results:
        blocks.append(("p", f"{len(nb_results)} of the teaching notebooks, executed by this run and exported to HTML "
                       "that reads offline (no scripts: widgets appear as static snapshots). "
                       "`chatvec notebooks DIR`, then `jupyter lab DIR`, opens all of them live."))
        blocks.append(("ul", [f"[{n}](notebooks/{quote(n)}.html): {s}" for n, s in nb_results]))
    else:
        blocks.append(("p", "None executed in this run (`--no-notebooks`); `chatvec notebooks DIR` copies them out."))

    if clock is not None:
        blocks.append(("h2", "What the run cost"))
        wall, cpu = clock.total()
        table = pd.DataFrame([{"step": n, "wall-clock s": f"{w:.0f}", "CPU s": f"{c:.0f}"} for n, w, c in clock.phases]
                             + [{"step": "all", "wall-clock s": f"{wall:.0f}", "CPU s": f"{cpu:.0f}"}])
        blocks.append(("table", table, "CPU seconds add up over cores and count every process the run started (the "
                       "notebook kernels too). Wall-clock time grows with whatever else the machine runs."))

    blocks.append(("h2", "Files"))
    files = ["`summary.csv`: one row per family, sampling, prompt group and model; each rate with `_lo`/`_hi` "
             "(its 95% interval), `n_chat`/`n_insults` (replies counted), `prompts_n`, `seeds`, `ppl_en`/`ppl_de`",
             "`replies.csv`: every reply with its scores", "`run.json`: what this run measured, and the numbers the "
             "geometry captions quote", "`figures/`: the figures above"]
    if atlas is not None:
        files.insert(2, "`atlas.csv`: the ablation atlas, a row per cell × design × α × prompt")
    if turns is not None:
        files.insert(2, "`multiturn.csv`, `multiturn_summary.csv`: the conversations, and per model and turn")
    files.insert(2, "`cosine.csv`: cosines between the three vectors")
    if nb_results:
        files.append("`notebooks/`: the executed notebooks as HTML")
    blocks.append(("ul", files))
    return blocks


# ------------------------------------------------------------------ rendering

def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f"<a href=\"{m.group(2)}\">{m.group(1)}</a>", out)


def _md_cell(v) -> str:
    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}")
        elif b[0] == "h2":
            out.append(f"## {b[1]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "fig":
            out.append(f"![{b[1]}](figures/{quote(b[1])})\n\n*{b[1]}*: {b[2]}" if b[2] else
                       f"![{b[1]}](figures/{quote(b[1])})")
        elif b[0] == "table":
            out.append(f"{b[2]}\n\n{_md_table(b[1])}")
        elif b[0] == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
    return "\n\n".join(out) + "\n"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45;"
         "color:#222}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
         "figure{margin:1.2em 0}figure img{max-width:100%}figcaption{color:#444;font-size:.93em;max-width:820px}"
         "table{border-collapse:collapse;font-size:.9em;margin:.4em 0 1.2em}td,th{border:1px solid #ccc;"
         "padding:3px 6px;text-align:left;vertical-align:top}th{background:#f4f4f4}"
         "caption{text-align:left;caption-side:top;padding:4px 0;color:#444}code{background:#f4f4f4;padding:0 3px}")


def render_html(blocks) -> str:
    """A self-contained page: inline style, no script, figures as relative files."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>chatvec_lab report</title>",
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{_inline_html(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "fig":
            parts.append(f"<figure><img src=\"figures/{quote(b[1])}\" alt=\"{html.escape(b[1])}\">"
                         f"<figcaption><b>{html.escape(b[1])}</b>: {_inline_html(b[2])}</figcaption></figure>")
        elif b[0] == "table":
            table = b[1].to_html(index=False, escape=True, border=0)
            table = table.replace("<thead>", f"<caption>{_inline_html(b[2])}</caption><thead>", 1)
            parts.append(f"<div style='overflow-x:auto'>{table}</div>")
        elif b[0] == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def write_report(folder, nb_results=(), clock=None) -> list[tuple]:
    """index.html and README.md in ``folder``, from the files the run wrote there (summary.csv, replies.csv,
    run.json, atlas.csv, multiturn_summary.csv, figures/). Returns the blocks."""
    folder = Path(folder)
    summary = pd.read_csv(folder / "summary.csv")
    run = json.loads((folder / "run.json").read_text(encoding="utf-8")) if (folder / "run.json").is_file() else {}
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    blocks = report_blocks(summary, _read_csv(folder / "replies.csv"), run, nb_results, clock, figures,
                           _read_csv(folder / "atlas.csv"), _read_csv(folder / "multiturn_summary.csv"))
    (folder / "README.md").write_text(render_markdown(blocks), encoding="utf-8")
    (folder / "index.html").write_text(render_html(blocks), encoding="utf-8")
    return blocks
