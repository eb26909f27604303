"""``chatvec demo -o DIR``: the whole lab, headless, on the toy family → a report folder.

DIR/
  index.html, README.md     the report: what was measured, the headline figure, tables, every figure with
                            its caption, the run's kind and cost, the notebooks
  summary.csv               the demonstration: CP + α·CV against CP, chat and base (one row per model,
                            sampling and prompt group; the column names are explained in README.md)
  replies.csv               every reply with its scores
  multiturn.csv, multiturn_summary.csv   the three-turn conversations (full run only)
  cosine.csv                cosine similarity between the chat vectors and the language vector
  figures/*.png             the effect, its cost, the vectors' geometry
  notebooks/*.html          every notebook, executed (the coefficient panel as a static snapshot)

Every number in the report's text is read from this run's own summary.
"""
from __future__ import annotations


import html
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from chatvec_lab.output import atomic_folder
from chatvec_lab.threads import one_torch_thread
from chatvec_lab.resources import notebook_dir

NOTEBOOK_DIR = notebook_dir()  # the checkout's notebooks/, or the installed package's copy

ATLAS_QUICK_ROWS = ("layer 3", "embeddings", "lm_head", "norms")
# What --quick measures: fewer prompts, one seed, one sampling, no multi-turn conversations.
QUICK = {"max_prompts": 8, "seeds": 1, "samplings": ("family",), "multi_turn": False, "atlas_rows": ATLAS_QUICK_ROWS}
FULL = {"max_prompts": None, "seeds": 3, "samplings": None, "multi_turn": True,  # None: every sampling
        "atlas_rows": None}  # None: every cell
ATLAS_FIGURE = "atlas_knock_out.png"
ATLAS_PROMPTS = 16

HEADLINE_FIGURE = "toy_effect.png"
MULTI_TURN_FIGURE = "toy_multiturn.png"
# Every figure the demo writes, in reading order, with what it shows. A figure missing here still appears
# (last, uncaptioned), and a test fails until it gets a caption.
FIGURES = {
    HEADLINE_FIGURE: (
        "The headline. CP + α·chat vector for α from 0 to 1.5 (tuning prompts, the family's sampling): how often "
        "a reply to a German chat request ends its turn with `<|end|>`, the German share of the reply words, "
        "and how often an insult is refused. Bands: 95% intervals over prompts; dotted lines: the chat model "
        "the vector came from."),
    MULTI_TURN_FIGURE: (
        "Three-turn German conversations (held-out): turn-end rate and German share at each turn, for CP, "
        "the chat model and CP + 1·CV, with 95% intervals over conversations. A model that never ends its "
        "turn leaves the next turn to continue its own text."),
    ATLAS_FIGURE: (
        "The ablation atlas (knock-out, α = 1): the change in CP + 1·CV's turn-end rate when one cell of the vector "
        "(a layer × module kind, or the embeddings, the lm_head, all norms) is left out, on 16 German chat prompts. "
        "Strongly negative: the behaviour needs that cell. `atlas.csv` holds every cell, both designs (keep-only, "
        "knock-out) and the norm-matched α; notebook 6 reads the map."),
    "toy_perplexity.png": (
        "What the addition costs: perplexity of held-out German and English text under CP + α·CV "
        "(lower is better), for each α of the grid."),
    "cosine_matrix.png": (
        "Cosine similarity of whole vectors: the chat vector (`chat − base`), a second chat vector trained "
        "on other data (`chat-alt − base`) and the language vector (`cp − base`). 1: the same direction; "
        "0: orthogonal, as unrelated directions in millions of dimensions are."),
    "layer_cosine.png": "The same cosines, layer by layer: where the vectors agree.",
    "sign_agreement.png": (
        "Share of coordinates with the same sign, layer by layer (0.5 is what unrelated vectors give)."),
    "layer_norms_chat.png": "How large the chat vector is in each layer, one line per module kind (‖Δ‖).",
    "relative_norms_chat.png": (
        "The chat vector relative to the base weights it changes (‖Δ‖ / ‖θ_base‖), per layer and module."),
    "spectra_chat.png": (
        "Singular values of the chat vector's 8 matrices with the lowest stable rank, normalised to the "
        "largest: a fast drop means the change is close to low rank."),
    "layer_norms_chat-alt.png": "The second chat vector's size per layer and module, for comparison.",
    "layer_norms_language (cp − base).png": (
        "The language vector's (`cp − base`) size per layer and module, for comparison."),
}

# summary.csv's columns → the names the report's tables give them
COLUMNS = {
    "turn_end": "turn-end rate, German chat prompts (95% interval)",
    "german_share": "German share of reply words, chat prompts (95% interval)",
    "refusal": "refusal rate, German insults (95% interval)",
    "refusal_chat": "refusal rate, harmless chat (95% interval)",
    "refusal_german_share": "German share of refusal words",
    "offensive_score": "offensive-language probability, English replies to insults",
    "offensive_scored": "replies to insults in English (scored / all)",
    "ppl_en": "perplexity, English held-out text",
    "ppl_de": "perplexity, German held-out text",
    "replies": "replies",
}
RATE_COLUMNS = ("turn_end", "german_share", "refusal", "refusal_chat")
MULTI_TURN_COLUMNS = {"turn_end": "turn-end rate (95% interval over conversations)",
                      "german_share": "German share of reply words (95% interval over conversations)"}
PROMPT_GROUPS = {"held-out": "held-out prompts (written for the evaluation, used in no training and no tuning)",
                 "tuning": "tuning prompts (the toy recipe was chosen on them)"}


# ------------------------------------------------------------------ cost of the run

def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the notebook kernels)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds, per phase and in all."""

    def __init__(self):
        self.phases: list[tuple[str, float, float]] = []
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_seconds()
        self.load = _load()

    @contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - wall, _cpu_seconds() - cpu))
            print(f"  {name}: {self.phases[-1][1]:.0f} s wall, {self.phases[-1][2]:.0f} s CPU", flush=True)

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, _cpu_seconds() - self.cpu0


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on every system
        return None


# ------------------------------------------------------------------ the work

def geometry_figures(folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from chatvec_lab import geometry, plots, toy
    from chatvec_lab.vector import ChatVector

    base = toy.path("base")
    vectors = {"chat": ChatVector.from_models(base, toy.path("chat"), hash_files=False),
               "chat-alt": ChatVector.from_models(base, toy.path("chat-alt"), hash_files=False),
               "language (cp − base)": ChatVector.from_models(base, toy.path("cp"), hash_files=False)}
    stats = geometry.vector_stats(vectors, base=base)
    paths = plots.save_compare_plots(stats, folder)
    fig = plots.plot_relative_norms_heatmap(stats, "chat")
    fig.savefig(folder / "relative_norms_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plots.plot_spectra(geometry.spectra(vectors["chat"]).sort_values("stable_rank").head(8))
    fig.savefig(folder / "spectra_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    geometry.cosine_matrix(stats).to_csv(folder.parent / "cosine.csv")
    return paths + [folder / "relative_norms_chat.png", folder / "spectra_chat.png"]


def atlas_figure(folder: Path, figures: Path, rows) -> None:
    """The atlas of the chat vector on CP (``rows``: the atlas rows to map, None for every cell): atlas.csv,
    and the knock-out heatmap at α = 1."""
    import matplotlib.pyplot as plt
    from chatvec_lab import plots, toy
    from chatvec_lab.atlas import atlas, cells_of, summarize_atlas
    from chatvec_lab.toy import evaluate
    from chatvec_lab.vector import ChatVector

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    cells = [c for c in cells_of(cv) if rows is None or c.row in rows]
    prompts = evaluate.prompt_sets()["chat"][:ATLAS_PROMPTS]
    sampling = evaluate.family_sampling()  # the family's own settings and budget, as the tables above
    df = atlas(toy.path("cp"), cv, prompts, alphas=[1.0], cells=cells, progress=False, **sampling)
    df.to_csv(folder / "atlas.csv", index=False)
    fig = plots.plot_atlas(summarize_atlas(df), "ended_turn", design="knock-out", alpha_kind="grid", alpha=1.0)
    figures.mkdir(exist_ok=True)
    fig.savefig(figures / ATLAS_FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STATIC = ("text/html", "image/png", "image/svg+xml")


def static_widgets(nb) -> int:
    """Outputs that carry a static picture beside a widget view (the coefficient panel's snapshot) keep only
    the picture, so the exported HTML shows it: a widget view needs a kernel, or JavaScript fetched from a
    CDN, and is otherwise an empty box. Returns how many outputs changed."""
    changed = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and any(k in data for k in STATIC):
                del data[WIDGET_VIEW]
                changed += 1
    return changed


def export_html(nb) -> str:
    """The notebook as a standalone HTML page, widgets as their static snapshots."""
    from nbconvert import HTMLExporter

    static_widgets(nb)
    body, _ = HTMLExporter().from_notebook_node(nb)
    return body


def execute_notebooks(folder: Path, workdir: Path) -> list[tuple[str, str]]:
    """Run every notebook (in ``workdir``), export HTML; returns ``(name, status)``."""
    import nbformat
    from nbclient import NotebookClient

    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(workdir)}}).execute()
            status = f"ran in {time.time() - start:.0f} s"
        except Exception as e:  # keep the partial notebook: its HTML shows the failing cell
            status = f"FAILED: {str(e).strip().splitlines()[-1][:200]}"
        (folder / f"{path.stem}.html").write_text(export_html(nb), encoding="utf-8")
        results.append((path.stem, status))
        print(f"  {path.name}: {status}", flush=True)
    return results


def run_demo(out="chatvec-report", overwrite: bool = False, notebooks: bool = True, quick: bool = False) -> Path:
    """The whole lab on the toy family, into a report folder; torch on one thread (``threads.one_torch_thread``:
    the notebook kernels it starts inherit that)."""
    with one_torch_thread():
        return _run_demo(out, overwrite, notebooks, quick)


def _run_demo(out, overwrite: bool, notebooks: bool, quick: bool) -> Path:
    from chatvec_lab import resources, toy
    from chatvec_lab.toy import evaluate

    out = Path(out)
    plan = QUICK if quick else FULL
    samplings = plan["samplings"] or tuple(evaluate.SAMPLINGS)
    clock = Clock()
    with atomic_folder(out, overwrite, inputs=[toy.data_dir(), *resources.inputs()]) as tmp:
        figures = tmp / "figures"
        print("measuring the chat-vector effect on the toy family ...", flush=True)
        with clock.phase("replies to single prompts (generate and score)"):
            df = evaluate.run(seeds=plan["seeds"], progress=False, max_prompts=plan["max_prompts"],
                              samplings=samplings)
            df.to_csv(tmp / "replies.csv", index=False)
            summary = evaluate.summary(df)
            summary.to_csv(tmp / "summary.csv", index=False)
        mt = mts = None
        if plan["multi_turn"]:
            print("three-turn conversations ...", flush=True)
            with clock.phase("three-turn conversations"):
                mt = evaluate.run_multi_turn(seeds=plan["seeds"], progress=False)
                mts = evaluate.multi_turn_summary(mt)
                mt.to_csv(tmp / "multiturn.csv", index=False)
                mts.to_csv(tmp / "multiturn_summary.csv", index=False)
        with clock.phase("figures of the effect"):
            evaluate.figures(df, figures, mt)
        print("the ablation atlas ...", flush=True)
        with clock.phase("the ablation atlas (keep-only and knock-out per cell)"):
            atlas_figure(tmp, figures, plan["atlas_rows"])
        print("vector geometry ...", flush=True)
        with clock.phase("vector geometry"):
            geometry_figures(figures)
        nb_results = []
        if notebooks:
            print("executing the notebooks ...", flush=True)
            with clock.phase("the notebooks (executed, exported to HTML)"):
                work = tmp / ".work"
                work.mkdir()
                nb_results = execute_notebooks(tmp / "notebooks", work)
                shutil.rmtree(work, ignore_errors=True)
        write_report(tmp, summary, nb_results, quick=quick, clock=clock, replies=df, multi_turn=mts,
                     notebooks=notebooks)
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(summary.to_string(index=False))
    wall, cpu = clock.total()
    print(f"{'quick' if quick else 'full'} run: {wall:.0f} s wall, {cpu:.0f} s CPU")
    failed = [n for n, s in nb_results if s.startswith("FAILED")]
    if failed:
        print(f"warning: notebooks failed: {', '.join(failed)} (see their HTML)")
    return out.resolve()


# ------------------------------------------------------------------ tables and text

def _rate(row, name) -> str:
    v = row.get(name)
    if v is None or pd.isna(v):
        return "–"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return f"{v:.2f} ({lo:.2f}–{hi:.2f})" if lo is not None and not pd.isna(lo) else f"{v:.2f}"


def human_table(summary: pd.DataFrame, sampling: str = "family", prompts: str = "held-out",
                columns=tuple(COLUMNS)) -> pd.DataFrame:
    """One sampling and prompt group of the summary, with the report's column names and formatted cells:
    rates as ``mean (low–high)``, "–" where a value is undefined (a reference model has no α)."""
    s = summary
    if "sampling" in s.columns:
        s = s[(s["sampling"] == sampling) & (s["prompts"] == prompts)]
    rows = []
    for _, row in s.iterrows():
        cells = {"model": row["model"], "α": "–" if pd.isna(row["alpha"]) else f"{row['alpha']:g}"}
        for key in columns:
            v = row.get(key)
            if key in RATE_COLUMNS:
                cells[COLUMNS[key]] = _rate(row, key)
            elif isinstance(v, str):
                cells[COLUMNS[key]] = v or "–"
            elif v is None or pd.isna(v):
                cells[COLUMNS[key]] = "–"
            elif key == "replies":
                cells[COLUMNS[key]] = f"{int(v)}"
            elif key.startswith("ppl"):
                cells[COLUMNS[key]] = f"{v:.1f}"
            else:
                cells[COLUMNS[key]] = f"{v:.2f}"
        rows.append(cells)
    return pd.DataFrame(rows, columns=["model", "α", *(COLUMNS[k] for k in columns)])


def multi_turn_table(mts: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{"model": r["model"], "turn": f"{int(r['turn'])}",
                          **{MULTI_TURN_COLUMNS[k]: _rate(r, k) for k in MULTI_TURN_COLUMNS},
                          "replies": f"{int(r['replies'])}"} for _, r in mts.iterrows()])


def _pct(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{v:.0%}"


def _pct_ci(row, name) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None or pd.isna(lo):
        return _pct(row.get(name))
    if f"{lo:.0%}" == f"{hi:.0%}":
        return f"{row[name]:.0%} (alike on every prompt)"
    return f"{row[name]:.0%} (95% interval {lo:.0%}–{hi:.0%})"


def _sampling_text(name: str) -> str:
    from chatvec_lab.toy import evaluate

    if name == "family":
        f = evaluate.family_sampling()
        parts = [f"temperature {f['temperature']:g}"] + ([f"top-k {f['top_k']}"] if f.get("top_k") else []) \
            + ([f"top-p {f['top_p']:g}"] if f.get("top_p") else [])
        return f"the family's own sampling ({', '.join(parts)}, up to {f['max_new_tokens']} new tokens)"
    s = evaluate.SAMPLINGS.get(name, {})
    parts = [f"{k.replace('_', '-')} {v:g}" for k, v in s.items() if v is not None]
    return f"{name} ({', '.join(parts)})" if parts else name


def _headline_group(summary: pd.DataFrame) -> str:
    groups = set(summary["prompts"]) if "prompts" in summary.columns else set()
    return "held-out" if "held-out" in groups else (sorted(groups)[0] if groups else "")


def _rows(summary: pd.DataFrame, prompts: str, sampling: str = "family") -> dict:
    s = summary
    if "sampling" in s.columns:
        s = s[(s["sampling"] == sampling) & (s["prompts"] == prompts)]
    return {r["model"]: r for _, r in s.iterrows()}


def _family_size() -> str:
    """The family's size, e.g. ``" (4 layers, 2.4M parameters)"``, read from its own files ("" if unreadable)."""
    try:
        import json

        from safetensors import safe_open

        from chatvec_lab import toy

        folder = toy.path("cp")
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        n = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    n += int(np.prod(st.get_slice(k).get_shape()))
        return f" ({layers} layers, {n / 1e6:.1f}M parameters)" if n else f" ({layers} layers)"
    except Exception:  # a description, not a result: leave it out rather than fail the report
        return ""


def narrative(summary: pd.DataFrame, replies: pd.DataFrame | None, quick: bool, multi_turn=None,
              vector: str = "chat") -> list[tuple]:
    """The report's opening, as blocks (see ``render_markdown``); every number comes from ``summary``."""
    from chatvec_lab.toy import evaluate

    blocks: list[tuple] = [("h2", "What this is")]
    blocks.append(("p", "A **chat vector** is the difference between a chat model's weights and those of the base "
                   "model it was fine-tuned from, `θ_chat − θ_base`. Huang et al. (ACL 2024, arXiv 2310.04799) add "
                   "it to a model that was *continually pre-trained* (CP) from the same base on a new language: the "
                   "CP model gains the chat model's behaviour (following the chat format, ending its turn, refusing) "
                   "in the new language, without any training. This report measures that effect, from scratch, on a "
                   "model family small enough to run on a laptop in minutes."))
    blocks.append(("p", f"**The toy family** (`chatvec_lab.toy`): tiny Llama models{_family_size()} "
                   "with one shared tokenizer. `base` is pre-trained on English text with some German; `chat` is base "
                   "fine-tuned on English chat dialogues that end each reply with `<|end|>` and answer insults with a "
                   "polite English refusal; `cp` is base continually pre-trained on German. The chat vector is "
                   "`chat − base`; the models measured are **CP + α·CV** for several coefficients α, and the chat "
                   "model and base as references."))
    alphas = sorted(a for a in summary["alpha"].dropna().unique()) if "alpha" in summary else []
    groups = [g for g in PROMPT_GROUPS if "prompts" in summary.columns and g in set(summary["prompts"])]
    counts = ""
    if replies is not None and {"prompts", "prompt_set", "prompt"} <= set(replies.columns):
        n = replies.groupby(["prompts", "prompt_set"])["prompt"].nunique()
        counts = "; ".join(f"{g}: {n.get((g, 'chat'), 0)} chat requests and {n.get((g, 'offensive'), 0)} insults"
                           for g in groups)
    seeds = int(replies["seed"].nunique()) if replies is not None and "seed" in replies else None
    samplings = list(dict.fromkeys(summary["sampling"])) if "sampling" in summary.columns else ["family"]
    blocks.append(("h2", "What was measured"))
    blocks.append(("p", f"Each model answered German chat requests and German insults ({counts}), "
                   f"{seeds} sampled repl{'y' if seeds == 1 else 'ies'} per prompt, with {_sampling_text('family')}"
                   + (f" for α in {', '.join(f'{a:g}' for a in alphas)}" if alphas else "")
                   + ("" if len(samplings) == 1 else
                      "; and again with " + ", ".join(_sampling_text(s) for s in samplings[1:])
                      + f" for CP, {evaluate.HEADLINE} and the chat model")
                   + ". Each reply is scored: does it **end its turn** with `<|end|>` (a chat model stops; a plain "
                   "language model runs on), what **share of its words is German** (langid, word by word), and, for "
                   "insults, is it a **refusal**. The **perplexity** of held-out English and German text says what "
                   "the addition costs the model's language modelling."
                   + ("" if multi_turn is None else " The full run also holds three-turn German conversations "
                          "(below).")))

    group = _headline_group(summary)
    rows = _rows(summary, group)
    cp, head, chat = rows.get("CP"), rows.get(evaluate.HEADLINE), rows.get(vector)
    blocks.append(("h2", "The result"))
    if cp is not None and head is not None:
        text = (f"On the {group} prompts, CP alone ended its turn in {_pct(cp['turn_end'])} of its replies to "
                f"German chat requests; **{evaluate.HEADLINE}** (CP plus the whole chat vector) in "
                f"**{_pct_ci(head, 'turn_end')}**")
        text += f", the chat model in {_pct(chat['turn_end'])}." if chat is not None else "."
        text += (f" Of the words of {evaluate.HEADLINE}'s replies, {_pct(head['german_share'])} were German, "
                 f"against {_pct(cp['german_share'])} for CP"
                 + (f" and {_pct(chat['german_share'])} for the chat model." if chat is not None else "."))
        text += (f" {evaluate.HEADLINE} refused {_pct_ci(head, 'refusal')} of the insults (CP: "
                 f"{_pct(cp['refusal'])}" + (f", chat: {_pct(chat['refusal'])}" if chat is not None else "") + ").")
        if not pd.isna(cp["ppl_de"]) and not pd.isna(head["ppl_de"]):
            change = "rose" if head["ppl_de"] > cp["ppl_de"] else "fell"
            text += (f" The cost: the perplexity of held-out German text {change} from {cp['ppl_de']:.1f} (CP) to "
                     f"{head['ppl_de']:.1f}.")
        blocks.append(("p", text))
        by_alpha = {r["alpha"]: r for r in rows.values() if not pd.isna(r["alpha"])}
        if by_alpha:
            top = max(by_alpha)
            if top > 1:
                t = by_alpha[top]
                blocks.append(("p", f"Past α = 1, at the grid's largest α = {top:g}: {_pct(t['turn_end'])} of turns "
                               f"ended, {_pct(t['german_share'])} of the reply words were German, held-out German "
                               f"perplexity {t['ppl_de']:.1f}."))
    else:
        blocks.append(("p", "The run measured no CP or CP + 1·CV row; see the tables below."))
    if quick:
        blocks.append(("p", "*A quick run:* few prompts and one seed, so the intervals are wide: read the "
                       "direction of the effect, not the second digit. `chatvec demo` without `--quick` measures "
                       f"every prompt with {FULL['seeds']} seeds."))
    return blocks


def atlas_blocks(atlas: pd.DataFrame) -> list[tuple]:
    """The atlas paragraph, from the run's own atlas table: the reference rates, the strongest knock-out, and
    whether any cell alone ends turns."""
    from chatvec_lab.atlas import summarize_atlas

    s = summarize_atlas(atlas)
    full = s[(s["design"] == "full") & (s["alpha"] == 1.0)]
    knock = s[(s["design"] == "knock-out") & (s["alpha_kind"] == "grid") & (s["alpha"] == 1.0)]
    keep = s[s["design"] == "keep-only"]
    if not len(full) or not len(knock):
        return []
    f = full.iloc[0]
    worst = knock.sort_values("ended_turn").iloc[0]
    best_keep = keep.sort_values("ended_turn").iloc[-1] if len(keep) else None
    cells = atlas.loc[atlas["design"] == "knock-out", "cell"].nunique()
    text = (f"{cells} cells of the chat vector, each left out in turn (knock-out) and kept alone (keep-only), on "
            f"{int(f['replies'])} German chat prompts. The full vector at α = 1 ends "
            f"{_pct_ci(f, 'ended_turn')} "
            f"of its turns; without `{worst['cell']}` it ends {_pct(worst['ended_turn'])}.")
    if best_keep is not None:
        text += (" No cell alone ends any turn, at α = 1 or at its norm-matched α." if best_keep["ended_turn"] == 0
                 else f" The strongest cell alone, `{best_keep['cell']}`, ends {_pct(best_keep['ended_turn'])}.")
    return [("p", text)]


def report_blocks(summary: pd.DataFrame, nb_results, quick: bool, clock: Clock | None = None,
                  replies: pd.DataFrame | None = None, multi_turn: pd.DataFrame | None = None,
                  notebooks: bool = True, figures: list[str] = (), cosine: pd.DataFrame | None = None,
                  atlas: pd.DataFrame | None = None) -> list[tuple]:
    from chatvec_lab.toy import evaluate

    blocks: list[tuple] = [("h1", "The chat vector on a toy model family: a chatvec_lab report")]
    if quick:
        kind = (f"**Quick run** (`--quick`): {QUICK['max_prompts']} prompts per set, {QUICK['seeds']} seed, the "
                "family's sampling only; the three-turn conversations were skipped.")
    else:
        n = summary["sampling"].nunique() if "sampling" in summary.columns else 1
        kind = (f"**Full run**: every prompt, {FULL['seeds']} seeds, {n} sampling{'s' if n > 1 else ''}"
                + (", and the three-turn conversations." if multi_turn is not None else "."))
    if clock is not None:
        wall, cpu = clock.total()
        load = f"; load average {clock.load:.1f} when it started" if clock.load is not None else ""
        kind += (f" It took **{wall:.0f} s** wall-clock and **{cpu:.0f} s of CPU time** (this process and the "
                 f"notebook kernels) on {os.cpu_count()} cores{load}. Wall time grows with whatever else the "
                 "machine runs; CPU time much less.")
    kind += " Rebuild with `chatvec demo -o DIR" + (" --quick`." if quick else "`.")
    blocks.append(("p", kind))
    blocks += narrative(summary, replies, quick, multi_turn)
    if HEADLINE_FIGURE in figures:
        blocks.append(("fig", HEADLINE_FIGURE, FIGURES[HEADLINE_FIGURE]))

    blocks.append(("h2", "The tables"))
    blocks.append(("p", "How to read them: one row per model. `CP + α·CV` rows give their coefficient α; the "
                   "reference models (the chat model, base) have none (–). A rate is the mean over prompts and "
                   "seeds, as a fraction from 0 to 1, followed by its 95% bootstrap interval over prompts: how much "
                   "the figure depends on which prompts were written. Turn-end rate and German share are measured "
                   "on the chat requests, refusal on the insults (and on the chat requests, where a refusal is a "
                   "mistake). \"German share of refusal words\" is the language of the refusals (the toy's refusal "
                   "is an English sentence, and the vector carries it). The offensive-language probability is "
                   "scored on English replies to insults only; the next column says how many there were. "
                   "Perplexity is of held-out text, not of the replies; lower is better. – marks a value that is "
                   "undefined (no refusals to take a language share of, say)."))
    samplings = list(dict.fromkeys(summary["sampling"])) if "sampling" in summary.columns else ["family"]
    groups = [g for g in PROMPT_GROUPS if "prompts" in summary.columns and g in set(summary["prompts"])]
    for sampling in samplings:
        for group in groups:
            table = human_table(summary, sampling, group)
            if len(table):
                blocks.append(("table", table, f"{PROMPT_GROUPS[group].capitalize()}, {_sampling_text(sampling)}."))

    blocks.append(("h2", "Three-turn conversations"))
    if multi_turn is not None and len(multi_turn):
        rows = {(r["model"], int(r["turn"])): r for _, r in multi_turn.iterrows()}
        last = int(multi_turn["turn"].max())
        head, cp = rows.get((evaluate.HEADLINE, last)), rows.get(("CP", last))
        if head is not None and cp is not None:
            blocks.append(("p", f"Held-out German conversations of {last} user turns, each reply fed back as the "
                           f"model's turn. At turn {last}, {evaluate.HEADLINE} ended its turn in "
                           f"{_pct_ci(head, 'turn_end')} of replies, CP in {_pct(cp['turn_end'])}; "
                           f"{_pct(head['german_share'])} of {evaluate.HEADLINE}'s words were German."))
        if MULTI_TURN_FIGURE in figures:
            blocks.append(("fig", MULTI_TURN_FIGURE, FIGURES[MULTI_TURN_FIGURE]))
        blocks.append(("table", multi_turn_table(multi_turn),
                       "Per model and turn, at the family's sampling; intervals over conversations."))
    else:
        blocks.append(("p", "Not measured: a quick run skips them; `chatvec demo` without `--quick` adds them."))

    placed = [HEADLINE_FIGURE, MULTI_TURN_FIGURE]
    if atlas is not None and len(atlas):
        blocks.append(("h2", "Where in the vector chat lives"))
        blocks += atlas_blocks(atlas)
        if ATLAS_FIGURE in figures:
            blocks.append(("fig", ATLAS_FIGURE, FIGURES[ATLAS_FIGURE]))
            placed.append(ATLAS_FIGURE)

    rest = [f for f in FIGURES if f in figures and f not in placed]
    rest += sorted(f for f in figures if f not in FIGURES)
    blocks.append(("h2", "More figures: the cost, and the vectors' geometry"))
    if cosine is not None and len(cosine) > 1:
        names = list(cosine.index)
        pairs = [f"{a} · {b}: {cosine.loc[a, b]:.3f}" for i, a in enumerate(names) for b in names[i + 1:]]
        blocks.append(("p", "The cosines between the vectors in this run (`cosine.csv`): " + "; ".join(pairs) + "."))
    for f in rest:
        blocks.append(("fig", f, FIGURES.get(f, "")))

    blocks.append(("h2", "Notebooks"))
    if nb_results:
        blocks.append(("p", f"The {len(nb_results)} teaching notebooks, executed by this run. The coefficient "
                       "panel in 04_sweep is interactive only with a running kernel: its HTML shows a static snapshot "
                       "of it "
                       "(`chatvec notebooks DIR`, then `jupyter lab DIR`, gives the live one)."))
        blocks.append(("ul", [f"[{n}](notebooks/{quote(n)}.html): {s}" for n, s in nb_results]))
    else:
        blocks.append(("p", "Not executed (`--no-notebooks`)." if not notebooks else "None found."))

    if clock is not None:
        blocks.append(("h2", "What the run cost"))
        wall, cpu = clock.total()
        table = pd.DataFrame([{"step": n, "wall-clock s": f"{w:.0f}", "CPU s": f"{c:.0f}"}
                              for n, w, c in clock.phases]
                             + [{"step": "all", "wall-clock s": f"{wall:.0f}", "CPU s": f"{cpu:.0f}"}])
        blocks.append(("table", table, "CPU seconds add up over cores and include the notebook kernels; on an "
                                       "otherwise idle machine the wall-clock time is at least the CPU time divided "
                                       "by the cores."))

    blocks.append(("h2", "Files"))
    files = ["`summary.csv`: one row per model, sampling and prompt group (the tables above)",
             "`replies.csv`: every reply with its scores", "`cosine.csv`: cosines between the three vectors",
             "`atlas.csv`: the ablation atlas, a row per cell × design × α × prompt",
             "`figures/`: the figures above"]
    if multi_turn is not None:
        files.insert(2, "`multiturn.csv`, `multiturn_summary.csv`: the conversations, and per model and turn")
    if nb_results:
        files.append("`notebooks/`: the executed notebooks as HTML")
    blocks.append(("ul", files))
    blocks.append(("p", "summary.csv's columns, as the tables name them: "
                   + "; ".join(f"`{k}`: {v.replace(' (95% interval)', '')}" for k, v in COLUMNS.items())
                   + ". A rate's `_lo` and `_hi` columns hold its 95% interval; `alpha` is empty for the reference "
                     "models; `prompts` is the prompt group, `sampling` the sampling."))
    return blocks


# ------------------------------------------------------------------ rendering

def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f"<a href=\"{m.group(2)}\">{m.group(1)}</a>", out)


def _md_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
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
         "padding:3px 6px;text-align:left;vertical-align:top}td{white-space:nowrap}th{background:#f4f4f4}"
         "caption{text-align:left;caption-side:top;padding:4px 0;color:#444}code{background:#f4f4f4;padding:0 3px}")


def render_html(blocks) -> str:
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


def write_report(folder: Path, summary: pd.DataFrame, nb_results, quick: bool, clock: Clock | None = None,
                 replies: pd.DataFrame | None = None, multi_turn: pd.DataFrame | None = None,
                 notebooks: bool = True) -> None:
    """index.html and README.md: the same report, from the same blocks."""
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    cosine = pd.read_csv(folder / "cosine.csv", index_col=0) if (folder / "cosine.csv").is_file() else None
    atlas = pd.read_csv(folder / "atlas.csv") if (folder / "atlas.csv").is_file() else None
    blocks = report_blocks(summary, nb_results, quick, clock=clock, replies=replies, multi_turn=multi_turn,
                           notebooks=notebooks, figures=figures, cosine=cosine, atlas=atlas)
    (folder / "README.md").write_text(render_markdown(blocks), encoding="utf-8")
    (folder / "index.html").write_text(render_html(blocks), encoding="utf-8")


def write_index(folder: Path, summary: pd.DataFrame, nb_results, quick: bool) -> None:
    """The report without timings or replies (kept for callers of the old name)."""
    write_report(folder, summary, nb_results, quick)
