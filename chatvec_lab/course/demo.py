"""``chatvec demo -o DIR``: the lab, headless, on the toy families → a report folder (the report: ``report``).

Three sizes (``PLANS``), all on one torch thread:

* default (``chatvec demo``): every held-out prompt (30 German chat requests, 24 insults), one reply each, at
  the family's own sampling, for CP, CP + α·CV (α = 0.5, 1, 1.5), the chat model and base; CP, CP + 1·CV and
  chat of the second family (``toy-bilingual``) on the same prompts; the atlas's knock-out map at α = 1 (every
  cell, 16 prompts); the vector geometry; the first three notebooks (00–02). README: what it costs.
* ``--quick``: the same kinds of numbers on 8 prompts per set, α = 0 and 1, the atlas's last layer and outer
  rows, one notebook: a smoke test, its intervals wide.
* ``--full``: tuning and held-out prompts, three seeds, a second sampling, the whole α grid, three-turn
  conversations, the atlas with both designs and norm-matched α, every notebook.

DIR/
  index.html, README.md   the report (``report.write_report``), reads offline
  summary.csv             one row per family, sampling, prompt group and model: each rate with its 95% interval
  replies.csv             every reply with its scores
  run.json                the plan, the families found, the sampling, the geometry's numbers
  atlas.csv, cosine.csv   the ablation atlas (knock-out at α = 1 by default); cosines between the vectors
  multiturn*.csv          the three-turn conversations (--full)
  figures/*.png           the effect, its cost, the atlas, the vectors' geometry
  notebooks/*.html        the executed notebooks, without scripts (widgets as static snapshots:
                          ``notebook_html``)

The run prints, and the report states, its wall-clock and CPU seconds: CPU of this process and of every
child it waited for (``resource.RUSAGE_CHILDREN``: the notebook kernels).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from chatvec_lab.course.notebook_html import execute_notebooks
from chatvec_lab.course.report import write_report
from chatvec_lab.course.report_numbers import PROMPT_GROUPS, headline_group, label, summarize_replies, summarize_turns
from chatvec_lab.course.report_text import ATLAS_FIGURE, EFFECT_FIGURE, MULTI_TURN_FIGURE, PERPLEXITY_FIGURE
from chatvec_lab.errors import ChatVecError, UsageError
from chatvec_lab.io.output import atomic_folder
from chatvec_lab.io.resources import notebook_dir
from chatvec_lab.core.threads import one_torch_thread

NOTEBOOK_DIR = notebook_dir()  # the checkout's notebooks/, or the installed package's copy
ATLAS_PROMPTS = 16
ATLAS_QUICK_ROWS = ("layer 3", "embeddings", "lm_head", "norms")
SECOND_FAMILY = "toy-bilingual"
PLANS = {
    "quick": dict(groups=("held-out",), max_prompts=8, seeds=1, alphas=(0.0, 1.0), refs=("chat", "base"),
                  samplings=("family",), multi_turn=False, atlas_rows=ATLAS_QUICK_ROWS, atlas_prompts=8,
                  atlas_designs=("knock-out",), norm_matched=False, notebooks=("00_course",),
                  what="8 held-out prompts per set, one reply each, α = 0 and 1, the atlas's last layer and outer "
                       "rows on 8 prompts, one notebook: a smoke test, its intervals wide"),
    "default": dict(groups=("held-out",), max_prompts=None, seeds=1, alphas=(0.0, 0.5, 1.0, 1.5),
                    refs=("chat", "base"), samplings=("family",), multi_turn=False, atlas_rows=None,
                    atlas_prompts=ATLAS_PROMPTS, atlas_designs=("knock-out",), norm_matched=False,
                    notebooks=("00_course", "01_quickstart", "02_anatomy"),
                    what="every held-out prompt, one reply each (so that an interval counts independent replies), "
                         "α = 0, 0.5, 1, 1.5, both toy families, the atlas's knock-out map, notebooks 00–02"),
    "full": dict(groups=("held-out", "tuning"), max_prompts=None, seeds=3, alphas=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
                 refs=("chat", "base"), samplings=None, multi_turn=True, atlas_rows=None, atlas_prompts=ATLAS_PROMPTS,
                 atlas_designs=("keep-only", "knock-out"), norm_matched=True, notebooks=None,
                 what="tuning and held-out prompts, three seeds, two samplings, the whole α grid, three-turn "
                      "conversations, the atlas's two designs at α = 1 and norm-matched α, every notebook"),
}


# ------------------------------------------------------------------ cost of the run

def cpu_seconds() -> float:
    """CPU seconds of this process and of its children it has waited for (the notebook kernels)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds (whole process tree), per phase and in all."""

    def __init__(self):
        self.phases: list[tuple[str, float, float]] = []
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        try:
            self.load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - not on every system
            self.load = None

    @contextmanager
    def phase(self, name: str, quiet: bool = False):
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - wall, cpu_seconds() - cpu))
            if not quiet:
                print(f"  {name}: {self.phases[-1][1]:.0f} s wall, {self.phases[-1][2]:.0f} s CPU", flush=True)

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, cpu_seconds() - self.cpu0


# ------------------------------------------------------------------ measuring

def family_info(family: str) -> dict:
    """Whether a toy family is there, where, and how much German its base saw (its ``recipe.json``)."""
    from chatvec_lab import toy

    try:
        folder = toy.path("cp", family).parent
        for member in ("base", "chat"):
            toy.path(member, family)
    except ChatVecError as e:
        return {"found": False, "note": str(e).split(":")[0] if ":" in str(e) else str(e),
                "folder": str(toy.data_dir(family))}
    share = None
    try:
        recipe = json.loads((folder / "base" / "recipe.json").read_text(encoding="utf-8"))
        share = float(recipe.get("recipe", recipe)["base_german_share"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"found": True, "folder": str(folder.resolve()), "base_german_share": share}


def measure(family: str, plan: dict, alphas=None, refs=None, samplings=None, device="auto",
            dtype="auto") -> pd.DataFrame:
    """Every reply with its scores for one family: CP + α·CV (its own chat vector) and the reference members,
    on the plan's prompt groups. Columns: the sweep's, plus ``family``, ``model``, ``sampling``, ``prompt_set``
    (chat / offensive) and ``prompts`` (the group)."""
    from chatvec_lab import toy
    from chatvec_lab.toy import evaluate
    from chatvec_lab.core.vector import ChatVector

    alphas = plan["alphas"] if alphas is None else alphas
    refs = plan["refs"] if refs is None else refs
    samplings = samplings or plan["samplings"] or tuple(evaluate.SAMPLINGS)
    groups = {g: evaluate.prompt_sets(heldout=g == "held-out") for g in plan["groups"]}
    if plan["max_prompts"]:
        groups = {g: {k: v[:plan["max_prompts"]] for k, v in sets.items()} for g, sets in groups.items()}
    cv = ChatVector.from_models(toy.path("base", family), toy.path("chat", family), hash_files=False)
    out = evaluate.measure_models(cv, groups, alphas=alphas, samplings=samplings, references=refs,
                                  shared_references=[r for r in refs if r == "chat"], label=label, family=family,
                                  seeds=plan["seeds"], heldout=evaluate.heldout_texts(), progress=False,
                                  max_new_tokens=evaluate.family_sampling("cp", family)["max_new_tokens"],
                                  device=device, dtype=dtype)
    out.insert(0, "family", family)
    return out


def second_family(plan: dict, device="auto", dtype="auto") -> pd.DataFrame:
    """CP, CP + 1·CV and chat of ``toy-bilingual`` on the held-out prompts (``toy.families.compare_families``, as
    notebook 03 measures them), with the plan's prompts and seeds, in ``measure``'s columns."""
    from chatvec_lab.toy.families import compare_families

    df = compare_families((SECOND_FAMILY,), prompts=plan["max_prompts"], seeds=plan["seeds"], progress=False,
                          device=device, dtype=dtype)
    df["alpha"] = df["alpha"].where(df["model"] != "chat")  # a reference model has no α
    df.insert(2, "sampling", "family")
    df.insert(4, "prompts", "held-out")
    return df


# ------------------------------------------------------------------ figures

def effect_figures(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """The α grid of the default family (headline prompt group, family sampling) with 95% intervals, the chat
    model dotted; and the perplexity of held-out text over α."""
    import matplotlib.pyplot as plt
    from chatvec_lab.plots import new_axes, style_axes

    folder.mkdir(parents=True, exist_ok=True)
    group = headline_group(summary)
    s = summary[(summary["family"] == "toy") & (summary["sampling"] == "family") & (summary["prompts"] == group)]
    grid = s[s["alpha"].notna()].sort_values("alpha")
    chat = s[s["model"] == "chat"]
    fig, ax = new_axes(figsize=(7, 4.2))
    for col, name in [("ended_turn", "turn-end rate (German chat requests)"),
                      ("share_de", "German share of reply words"), ("refusal", "refusal rate (German insults)")]:
        line, = ax.plot(grid["alpha"], grid[col], marker="o", label=name)
        ax.fill_between(grid["alpha"], grid[f"{col}_lo"], grid[f"{col}_hi"], color=line.get_color(), alpha=0.15)
        if len(chat):
            ax.axhline(float(chat[col].iloc[0]), color=line.get_color(), linestyle=":", linewidth=1)
    style_axes(ax, f"CP + α·chat vector, {group} prompts (dotted: the chat model; bands: 95% intervals)",
               "coefficient α", "rate")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    paths = [folder / EFFECT_FIGURE]
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    if grid["ppl_de"].notna().sum() > 1:
        fig, ax = new_axes(figsize=(7, 4.2))
        for col, name in [("ppl_de", "German held-out"), ("ppl_en", "English held-out")]:
            ax.plot(grid["alpha"], grid[col], marker="o", label=name)
        style_axes(ax, "What the addition costs: perplexity of CP + α·CV", "coefficient α", "perplexity")
        ax.legend(fontsize=8)
        paths.append(folder / PERPLEXITY_FIGURE)
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def geometry_figures(folder: Path) -> tuple[list[Path], dict]:
    """The vectors' geometry figures, cosine.csv beside the folder, and the numbers their captions quote."""
    import matplotlib.pyplot as plt
    from chatvec_lab import plots, toy
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.vector import ChatVector

    base = toy.path("base")
    names = ("chat", "chat-alt", "language (cp − base)")
    vectors = dict(zip(names, (ChatVector.from_models(base, toy.path(m), hash_files=False)
                               for m in ("chat", "chat-alt", "cp"))))
    stats = geometry.vector_stats(vectors, base=base)
    paths = plots.save_compare_plots(stats, folder)
    fig = plots.plot_relative_norms_heatmap(stats, "chat")
    fig.savefig(folder / "relative_norms_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    spec = geometry.spectra(vectors["chat"]).sort_values("stable_rank").head(8)
    fig = plots.plot_spectra(spec)
    fig.savefig(folder / "spectra_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    matrix = geometry.cosine_matrix(stats)
    matrix.to_csv(folder.parent / "cosine.csv")

    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    facts = {"cosine": {f"{a} · {b}": float(matrix.loc[a, b]) for a, b in pairs},
             "verdicts": {f"{a} · {b}": geometry.aligned(stats, a, b)["verdict"] for a, b in pairs}}
    for key, table, col in (("layer_cosine", geometry.cosine_by(stats, "layer"), "cosine"),
                            ("sign_agreement", geometry.sign_agreement(stats, "layer"), "sign_agreement")):
        t = table[table["layer"].notna()]
        facts[key] = {}
        for pair, g in t.groupby("pair", sort=False):
            lo, hi = g.loc[g[col].idxmin()], g.loc[g[col].idxmax()]
            facts[key][pair] = [float(lo[col]), int(lo["layer"]), float(hi[col]), int(hi["layer"])]
    norms = geometry.norms_by(stats, ("layer", "module"))
    norms = norms[norms["layer"].notna()]
    facts["largest"] = {}
    for name, g in norms.groupby("vector", sort=False):
        top = g.loc[g["norm"].idxmax()]
        facts["largest"][name] = [int(top["layer"]), str(top["module"]), float(top["norm"])]
    chat = norms[(norms["vector"] == "chat") & norms["rel_norm"].notna()]
    if len(chat):
        top = chat.loc[chat["rel_norm"].idxmax()]
        facts["largest_relative"] = [int(top["layer"]), str(top["module"]), float(top["rel_norm"])]
    if len(spec) and "random_stable_rank" in spec:
        facts["spectra"] = {"low": float(spec["stable_rank"].min()), "high": float(spec["stable_rank"].max()),
                            "random_low": float(spec["random_stable_rank"].min()),
                            "random_high": float(spec["random_stable_rank"].max())}
    return paths + [folder / "relative_norms_chat.png", folder / "spectra_chat.png"], facts


def atlas_figure(folder: Path, figures: Path, rows=None, designs=("knock-out",), norm_matched: bool = False,
                 prompts: int = ATLAS_PROMPTS, device="auto", dtype="auto") -> None:
    """The atlas of the chat vector on CP (``rows``: the atlas rows to map, None for every cell): atlas.csv,
    and the knock-out map at α = 1 (``plots.plot_atlas``: the turn-end rate lost without each cell)."""
    import matplotlib.pyplot as plt
    from chatvec_lab import plots, toy
    from chatvec_lab.behaviour.atlas import atlas, cells_of, summarize_atlas
    from chatvec_lab.toy import evaluate
    from chatvec_lab.core.vector import ChatVector

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    cells = [c for c in cells_of(cv) if rows is None or c.row in rows]
    sampling = evaluate.family_sampling()  # the family's own settings and budget, as the tables
    df = atlas(toy.path("cp"), cv, evaluate.prompt_sets()["chat"][:prompts], alphas=[1.0], cells=cells,
               designs=designs, norm_matched=norm_matched, progress=False, device=device, dtype=dtype, **sampling)
    df.to_csv(folder / "atlas.csv", index=False)
    fig = plots.plot_atlas(summarize_atlas(df), "ended_turn", design="knock-out", alpha_kind="grid", alpha=1.0)
    figures.mkdir(exist_ok=True)
    fig.savefig(figures / ATLAS_FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------ the run

def plan_name(quick: bool = False, full: bool = False) -> str:
    if quick and full:
        raise UsageError("--quick and --full exclude each other")
    return "quick" if quick else "full" if full else "default"


def run_demo(out="chatvec-report", overwrite: bool = False, notebooks: bool = True, quick: bool = False,
             full: bool = False, device="auto", dtype="auto") -> Path:
    """The lab on the toy families, into a report folder; torch on one thread (``threads.one_torch_thread``:
    the notebook kernels it starts inherit that). ``quick`` / ``full``: the plan (``PLANS``); default between.
    ``device`` / ``dtype``: where and in which precision the sweeps and the atlas run their models (``auto``: a GPU
    if there is one, the checkpoint's own dtype); the notebooks load their own."""
    from chatvec_lab.io.devices import resolve_device, resolve_dtype

    name = plan_name(quick, full)
    resolve_device(device), resolve_dtype(dtype)  # a device this machine lacks, or no dtype: one line, before any work
    with one_torch_thread():
        return _run_demo(out, overwrite, notebooks, name, device, dtype)


def _run_demo(out, overwrite: bool, notebooks: bool, name: str, device="auto", dtype="auto") -> Path:
    from chatvec_lab import toy
    from chatvec_lab.io import resources
    from chatvec_lab.toy import evaluate

    out, plan = Path(out), PLANS[name]
    clock = Clock()
    families = {f: family_info(f) for f in ("toy", SECOND_FAMILY)}
    inputs = [toy.data_dir(), resources.PACKAGE_DIR, *resources.inputs()]  # never into the installed package
    if families[SECOND_FAMILY]["found"]:
        inputs.append(Path(families[SECOND_FAMILY]["folder"]))
    with atomic_folder(out, overwrite, inputs=inputs) as tmp:
        figures = tmp / "figures"
        print(f"measuring the chat-vector effect on the toy family ({name} run) ...", flush=True)
        with clock.phase("replies to single prompts, default family (generate and score)"):
            df = measure("toy", plan, device=device, dtype=dtype)
        if families[SECOND_FAMILY]["found"]:
            with clock.phase(f"replies of the second family ({SECOND_FAMILY}: CP, CP + 1·CV, chat)"):
                df = pd.concat([df, second_family(plan, device, dtype)], ignore_index=True)
        else:
            print(f"  the second family ({SECOND_FAMILY}) is not there: {families[SECOND_FAMILY]['note']}", flush=True)
        df.to_csv(tmp / "replies.csv", index=False)
        summary = summarize_replies(df)
        summary.to_csv(tmp / "summary.csv", index=False)
        if plan["multi_turn"]:
            print("three-turn conversations ...", flush=True)
            with clock.phase("three-turn conversations"):
                mt = evaluate.run_multi_turn(seeds=plan["seeds"], progress=False)
                mt.to_csv(tmp / "multiturn.csv", index=False)
                turns = summarize_turns(mt)
                turns.to_csv(tmp / "multiturn_summary.csv", index=False)
                figures.mkdir(parents=True, exist_ok=True)
                evaluate.plot_multi_turn(turns, figures / MULTI_TURN_FIGURE)
        with clock.phase("figures of the effect"):
            effect_figures(summary, figures)
        print("the ablation atlas ...", flush=True)
        with clock.phase("the ablation atlas (" + " and ".join(plan["atlas_designs"]) + " per cell)"):
            atlas_figure(tmp, figures, plan["atlas_rows"], plan["atlas_designs"], plan["norm_matched"],
                         plan["atlas_prompts"], device, dtype)
        print("vector geometry ...", flush=True)
        with clock.phase("vector geometry"):
            _, facts = geometry_figures(figures)
        sampling = evaluate.family_sampling()
        (tmp / "run.json").write_text(json.dumps({
            "plan": name, "settings": {"what": plan["what"], "details": _details(plan)}, "families": families,
            "sampling": sampling, "geometry": facts}, indent=1, ensure_ascii=False), encoding="utf-8")
        nb_results = []
        if notebooks:
            print("executing the notebooks ...", flush=True)
            with clock.phase("the notebooks (executed, exported to HTML)"):
                work = tmp / ".work"
                work.mkdir()
                nb_results = execute_notebooks(tmp / "notebooks", work, plan["notebooks"], source=NOTEBOOK_DIR)
                shutil.rmtree(work, ignore_errors=True)
        write_report(tmp, nb_results, clock)
    head = summary[(summary["family"] == "toy") & (summary["sampling"] == "family")
                   & (summary["prompts"] == headline_group(summary))]
    cols = ["model", "ended_turn", "share_de", "refusal", "n_chat", "n_insults"]
    with pd.option_context("display.width", 200, "display.precision", 2):
        print(head[cols].to_string(index=False))
    wall, cpu = clock.total()
    print(f"{name} run: {wall:.0f} s wall, {cpu:.0f} s CPU (this process and the notebook kernels)")
    failed = [n for n, s in nb_results if s.startswith("FAILED")]
    if failed:
        print(f"warning: notebooks failed: {', '.join(failed)} (see their HTML)")
    return out.resolve()


def _details(plan: dict) -> str:
    groups = " and ".join(PROMPT_GROUPS[g] for g in plan["groups"])
    return (f"This run: {groups}" + (f", the first {plan['max_prompts']} of each set" if plan["max_prompts"] else "")
            + f"; {plan['seeds']} repl{'y' if plan['seeds'] == 1 else 'ies'} per prompt and model; α = "
            + ", ".join(f"{a:g}" for a in plan["alphas"]) + "; "
            + ("the family's own sampling" if plan["samplings"] == ("family",) else "every sampling")
            + f". The atlas: {' and '.join(plan['atlas_designs'])} at α = 1"
            + (" and at the norm-matched α" if plan["norm_matched"] else "") + f", on {plan['atlas_prompts']} "
            "tuning chat prompts. Rates are shares of replies; their 95% intervals come from `sweep.summarize`.")
