"""The demo's report: a run's numbers → tables, sentences and captions → ``index.html`` and ``README.md``.

Every sentence that states a result is generated from the numbers it describes (this run's
``summary.csv``, ``atlas.csv``, ``multiturn_summary.csv`` and ``run.json``), with its 95% intervals; a
difference is claimed only where the two intervals do not overlap, otherwise the text says there is no clear
difference. Rates and their intervals come from ``sweep.summarize``. The HTML is self-contained: its style is
inline, its figures are files beside it, and it loads nothing from the network.

    write_report(folder, nb_results=[("00_course", "ran in 3 s")], clock=clock)

This module lays the report out (``report_blocks``: its sections, tables and replies to read) and writes it. The
numbers are in ``report_numbers``, the sentences and captions in ``report_text``, the Markdown and HTML in
``render``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from chatvec_lab.course.render import render_html, render_markdown
from chatvec_lab.course.report_numbers import (BASELINE, HEADLINE, ci, clustered, compare, headline_group,
                                               interval_method, rows_of)
from chatvec_lab.course.report_text import (ATLAS_FIGURE, EFFECT_FIGURE, FIGURES, MULTI_TURN_FIGURE, PERPLEXITY_FIGURE,
                                            TRANSFER_TEXT, atlas_blocks, difference_from, effect_caption,
                                            family_sentences, geometry_captions, perplexity_caption, refusal_transfer,
                                            result_sentences)

PLANS = {"quick": "**Quick run** (`--quick`)", "default": "**Default run**", "full": "**Full run** (`--full`)"}


# ------------------------------------------------------------------ tables

def _model_cell(model: str) -> str:
    return f"{model} (baseline: no vector)" if model == BASELINE else model


HEADLINE_COLUMNS = {"ended_turn": "turn-end rate, German chat requests [95% interval]",
                    "share_de": "German share of reply words [95% interval]",
                    "refusal": "refusal rate, German insults [95% interval]",
                    "refusal_chat": "refusal rate, harmless chat requests [95% interval]"}


def headline_table(summary: pd.DataFrame, family: str = "toy", prompts: str | None = None,
                   sampling: str = "family") -> pd.DataFrame:
    """THE table: one row per model (CP first, the baseline), each rate with its 95% interval, the held-out
    German perplexity and the replies counted."""
    prompts = prompts or headline_group(summary)
    out = []
    for model, r in rows_of(summary, family, prompts, sampling).items():
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
    rows = {f: rows_of(summary, f, prompts) for f in ("toy", "toy-bilingual")}
    table = []
    for fam, r in rows.items():
        share = families.get(fam, {}).get("base_german_share")
        for model in (BASELINE, HEADLINE, "chat"):
            if model in r:
                table.append({"family": fam, "German in the base's pre-training":
                              "–" if share is None else f"{share:.1%}".replace(".0%", "%"),
                              "model": _model_cell(model), "turn-end rate [95% interval]": ci(r[model], "ended_turn"),
                              "German share of reply words [95% interval]": ci(r[model], "share_de"),
                              "refusal rate, German insults [95% interval]": ci(r[model], "refusal"),
                              "replies (chat / insults)": f"{_int(r[model].get('n_chat'))} / {_int(r[model].get('n_insults'))}"})
    blocks.append(("table", pd.DataFrame(table),
                   f"Each family's CP, CP + 1·CV (its own chat vector) and chat model, {prompts} prompts, the same "
                   "prompts and seeds for both families."))
    blocks += [("p", s) for s in family_sentences(rows, families)]
    return blocks



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
    rows = rows_of(summary, "toy", group)
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
                said.append(f"{g} prompts, sampling `{s}`: turn-end {ci(r[HEADLINE], 'ended_turn')} against "
                            f"{ci(r[BASELINE], 'ended_turn')} for CP ({difference_from(compare(r[HEADLINE], r[BASELINE], 'ended_turn'), 'CP')}); "
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
                           f"model's turn. At turn {last}, {HEADLINE} ends {ci(at[HEADLINE], 'ended_turn')} of its "
                           f"turns, CP {ci(at[BASELINE], 'ended_turn')} "
                           f"({difference_from(compare(at[HEADLINE], at[BASELINE], 'ended_turn'), 'CP')})"
                           + (f", the chat model {ci(at['chat'], 'ended_turn')}" if "chat" in at else "")
                           + f"; {ci(at[HEADLINE], 'share_de')} of {HEADLINE}'s words are German."))
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
