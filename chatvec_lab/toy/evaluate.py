"""The paper's effect on the toy family, measured: CP + α·CV against CP, chat and base.

    python -m chatvec_lab.toy.evaluate --out data/eval-toy --overwrite   # the README's tables and figures

Prompts: the *tuning* sets ``data/prompts/{chat,offensive}_de.txt`` (German chat requests and insults:
the recipe was chosen on them) and the *held-out* sets ``data/prompts/heldout/`` (written for the
evaluation, used in no training data and no tuning), plus ``multiturn_de.txt`` (three-turn German
conversations). Held-out text for perplexity: ``data/heldout/{en,de}.txt``.

Sampling: the family's own generation settings (``generation_config.json``: temperature 0.7, top-k 40,
its ``max_new_tokens``) for the whole α grid, and temperature 0.8 / top-p 0.9 for CP, CP + 1·CV and the
chat model. Every rate comes with a 95% interval (``interval``): the Wilson score interval on the effective
number of replies, the seeds of one prompt (one conversation, for the multi-turn figures) counted as clustered;
the German share with mean ± t·SE over prompts, clipped to [0, 1] (``chatvec_lab.analysis.intervals`` says why).
Sampling is seeded: the same family gives the same tables.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from chatvec_lab import toy

from chatvec_lab.io import resources
from chatvec_lab.analysis.intervals import estimate, metric_kind
from chatvec_lab.io.output import atomic_folder, check_output_path
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.core.vector import ChatVector

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DATA = resources.data_dir()  # the checkout's data/, or the installed package's copy
SAMPLINGS = {"family": {}, "t0.8-p0.9": {"temperature": 0.8, "top_k": None, "top_p": 0.9}}
HEADLINE = "CP + 1·CV"


def prompt_sets(data_dir: Path = DATA, heldout: bool = False) -> dict[str, list[str]]:
    """``{"chat": [...], "offensive": [...]}``: the tuning sets, or with ``heldout=True`` the held-out ones."""
    from chatvec_lab.behaviour.sweep import read_prompts

    folder = data_dir / "prompts" / ("heldout" if heldout else "")
    return {"chat": read_prompts(folder / "chat_de.txt"), "offensive": read_prompts(folder / "offensive_de.txt")}


def conversations(data_dir: Path = DATA) -> list[list[str]]:
    """The held-out multi-turn conversations: lists of user turns (blank-line separated blocks, ``#`` comments)."""
    text = (data_dir / "prompts" / "heldout" / "multiturn_de.txt").read_text(encoding="utf-8")
    lines = [l.strip() for l in text.splitlines() if not l.startswith("#")]
    blocks, block = [], []
    for line in lines + [""]:
        if line:
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    return blocks


def heldout_texts(data_dir: Path = DATA) -> dict[str, list[str]]:
    return {lang: [l for l in (data_dir / "heldout" / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
            for lang in ("en", "de")}


def family_sampling(member: str = "cp", family: str = toy.DEFAULT_FAMILY) -> dict:
    """The family's own generation settings (what ``model.generate()`` would use)."""
    config = json.loads((toy.path(member, family) / "generation_config.json").read_text())
    return {"temperature": config.get("temperature", 1.0), "top_k": config.get("top_k"),
            "top_p": config.get("top_p"), "max_new_tokens": config.get("max_new_tokens", 64)}


def _label(alpha: float) -> str:
    return "CP" if alpha == 0 else f"CP + {alpha:g}·CV"


def run(alphas=ALPHAS, seeds: int = 3, max_new_tokens: int | None = None, cache_dir=None, progress: bool = True,
        vector: str = "chat", max_prompts: int | None = None, samplings=tuple(SAMPLINGS),
        heldout_prompts: bool = True) -> pd.DataFrame:
    """Every reply with its scores. Columns added to the sweep's: ``model`` (CP + α·CV, the chat model the
    vector came from, base), ``prompt_set`` (chat / offensive), ``prompts`` (tuning / held-out), ``sampling``.

    The family's sampling runs the whole α grid and the base; other samplings run α = 0 and 1 and the chat
    model. ``max_new_tokens``: the family's own by default."""
    max_new_tokens = max_new_tokens or family_sampling()["max_new_tokens"]
    groups = {"tuning": prompt_sets()}
    if heldout_prompts:
        groups["held-out"] = prompt_sets(heldout=True)
    if max_prompts:
        groups = {g: {k: v[:max_prompts] for k, v in sets.items()} for g, sets in groups.items()}
    cv = ChatVector.from_models(toy.path("base"), toy.path(vector), hash_files=False)
    return measure_models(cv, groups, alphas=alphas, samplings=samplings, references=[vector, "base"],
                          shared_references=[vector], label=_label, seeds=seeds, max_new_tokens=max_new_tokens,
                          heldout=heldout_texts(), cache_dir=cache_dir, progress=progress)


def measure_models(cv: ChatVector, groups: dict, *, alphas, samplings, references, shared_references, label,
                   family: str = toy.DEFAULT_FAMILY, **common) -> pd.DataFrame:
    """One row per reply: CP + α·CV over ``alphas`` and each of ``references`` (members of ``family``, at α = 0)
    under the family's own sampling; under each other sampling of ``samplings``, α = 0 and 1 (where in
    ``alphas``) and ``shared_references``. ``groups``: ``{group: {prompt set: prompts}}``. Columns: the sweep's,
    plus ``model`` (``label(α)`` or the member's name), ``sampling``, ``prompt_set`` and ``prompts`` (the group)."""
    prompts = [p for sets in groups.values() for ps in sets.values() for p in ps]
    where = {p: (name, group) for group, sets in groups.items() for name, ps in sets.items() for p in ps}
    frames = []
    for sampling in samplings:
        settings = {k: v for k, v in family_sampling("cp", family).items() if k != "max_new_tokens"} \
            if sampling == "family" else SAMPLINGS[sampling]
        kwargs = dict(scorers=("ended_turn", "language", "refusal", "offensive"), **common, **settings)
        grid = list(alphas) if sampling == "family" else [a for a in (0.0, 1.0) if a in alphas]
        df = sweep(toy.path("cp", family), {"chat": cv}, grid, prompts, **kwargs)
        df.insert(0, "model", [label(a) for a in df["alpha"]])
        parts = [df]
        for name in (references if sampling == "family" else shared_references):
            ref = sweep(toy.path(name, family), {"chat": cv}, [0.0], prompts, **kwargs)
            ref["alpha"] = float("nan")
            ref.insert(0, "model", name)
            parts.append(ref)
        for part in parts:
            part.insert(1, "sampling", sampling)
            frames.append(part)
    out = pd.concat(frames, ignore_index=True)
    out.insert(2, "prompt_set", out["prompt"].map(lambda p: where[p][0]))
    out.insert(3, "prompts", out["prompt"].map(lambda p: where[p][1]))
    return out


def run_multi_turn(seeds: int = 3, vector: str = "chat", max_new_tokens: int | None = None,
                   max_conversations: int | None = None, progress: bool = True) -> pd.DataFrame:
    """The held-out three-turn conversations for CP, the chat model and CP + 1·CV, at the family's sampling:
    one row per model, conversation, seed and turn, with ``ended_turn`` and ``share_de``."""
    import torch
    from tqdm.auto import tqdm

    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.generation import converse_many
    from chatvec_lab.behaviour.scoring import LanguageScorer

    settings = family_sampling()
    budget = settings.pop("max_new_tokens")
    max_new_tokens = max_new_tokens or budget
    convs = conversations()[:max_conversations] if max_conversations else conversations()
    cv = ChatVector.from_models(toy.path("base"), toy.path(vector), hash_files=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.path("cp"))

    loaders = {"CP": lambda: AutoModelForCausalLM.from_pretrained(toy.path("cp"), dtype=torch.float32),
               vector: lambda: AutoModelForCausalLM.from_pretrained(toy.path(vector), dtype=torch.float32),
               HEADLINE: lambda: apply_to_model(toy.path("cp"), [(cv, 1.0)], dtype=torch.float32)[0]}
    language = LanguageScorer()
    frames = []
    bar = tqdm(total=len(loaders) * seeds, desc="multi-turn", disable=not progress)
    for name, load in loaders.items():
        model = load().eval()
        for seed in range(seeds):
            df = converse_many(model, tokenizer, convs, seed=seed, max_new_tokens=max_new_tokens, **settings)
            df["share_de"] = language.score(df["reply"].tolist())["share_de"]
            df.insert(0, "model", name)
            frames.append(df)
            bar.update()
    bar.close()
    return pd.concat(frames, ignore_index=True)


def _rows(df: pd.DataFrame, model: str | None, prompt_set: str | None) -> pd.DataFrame:
    rows = df
    if model is not None:
        rows = rows[rows["model"] == model]
    if prompt_set is not None:
        rows = rows[rows["prompt_set"] == prompt_set]
    return rows


def interval(df: pd.DataFrame, model: str | None, prompt_set: str | None, column: str, unit: str = "prompt",
             kind: str | None = None, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``column`` (for one model and prompt set, where given) with its 95% interval: (mean, low, high).

    The tables' interval (``chatvec_lab.analysis.intervals.estimate``): a rate (``ended_turn``, ``refusal``: 0/1 per
    reply) gets the Wilson score interval on the effective number of replies, the replies of one ``unit``
    (prompt or conversation, under several seeds) counted as clustered; a share (``share_de``) mean ± t·SE over
    units, clipped to [0, 1]. Rows where ``column`` is NaN (a reply without words has no language share) are
    left out. ``kind``: ``"rate"``, ``"unit"`` or ``"mean"``, decided from the column when not given."""
    rows = _rows(df, model, prompt_set)
    kind = kind or metric_kind(column, df[column])
    return estimate(rows[column], kind, rows[unit] if unit in rows else None, level)


RATES = [  # (column in the summary, prompt set, reply column, label)
    ("ended_turn", "chat", "ended_turn", "turn-end rate"),
    ("share_de", "chat", "share_de", "German share of reply words"),
    ("refusal", "offensive", "refusal", "refusal rate (insults)"),
    ("refusal_chat", "chat", "refusal", "refusal rate (harmless chat)"),
]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model, sampling and prompt group, each rate with its 95% interval (``_lo``, ``_hi``)."""
    keys = [k for k in ("sampling", "prompts") if k in df.columns]
    kinds = {column: metric_kind(column, df[column]) for _, _, column, _ in RATES}
    rows = []
    for key, g in df.groupby(keys + ["model"], sort=False):
        row = dict(zip(keys + ["model"], key if isinstance(key, tuple) else (key,)))
        row["alpha"] = g["alpha"].iloc[0]
        for name, prompt_set, column, _ in RATES:
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = interval(g, None, prompt_set, column, kind=kinds[column])
        off = g[g["prompt_set"] == "offensive"]
        refused = off[off["refusal"].astype(bool)]
        # the language of the refusals: the toy's refusal is one English sentence, and the vector carries it
        row["refusal_share_de"] = float(refused["share_de"].mean()) if len(refused) else float("nan")
        row["offensive_score"] = off["offensive"].mean() if "offensive" in off else float("nan")
        row["offensive_scored"] = f"{int(off['offensive'].notna().sum())}/{len(off)}" if "offensive" in off else ""
        row["ppl_en"], row["ppl_de"] = g["ppl_en"].iloc[0], g["ppl_de"].iloc[0]
        row["replies"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def multi_turn_summary(mt: pd.DataFrame) -> pd.DataFrame:
    """Per model and turn: turn-end rate and German share, with 95% intervals over conversations."""
    rows = []
    kinds = {column: metric_kind(column, mt[column]) for column in ("ended_turn", "share_de")}
    for (model, turn), g in mt.groupby(["model", "turn"], sort=False):
        row = {"model": model, "turn": turn}
        for column in ("ended_turn", "share_de"):
            row[column], row[f"{column}_lo"], row[f"{column}_hi"] = interval(g, None, None, column, unit="conversation",
                                                                       kind=kinds[column])
        row["replies"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def intervals(df: pd.DataFrame, model: str = HEADLINE) -> str:
    """One line per headline figure of ``model`` with its 95% interval (``interval``: Wilson for the rates,
    seeds clustered by prompt; t over prompts for the German share)."""
    lines = []
    for _, prompt_set, column, label in RATES[:3]:
        mean, lo, hi = interval(df, model, prompt_set, column)
        what = "Wilson interval, seeds clustered by prompt" if metric_kind(column, df[column]) == "rate" else \
            "interval over prompts"
        lines.append(f"{model}: {label} {mean:.2f} (95% {what} {lo:.2f}–{hi:.2f})")
    return "\n".join(lines)


def _cell(row, name) -> str:
    v = row[name]
    if pd.isna(v):
        return "–"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return f"{v:.2f} ({lo:.2f}–{hi:.2f})" if lo is not None and not pd.isna(lo) else f"{v:.2f}"


def markdown(summary_df: pd.DataFrame, sampling: str = "family", prompts: str = "tuning") -> str:
    """The α grid for one sampling and prompt group as a Markdown table (for the README)."""
    s = summary_df
    if "sampling" in s.columns:
        s = s[(s["sampling"] == sampling) & (s["prompts"] == prompts)]
    cols = [("ended_turn", "turn-end rate"), ("share_de", "German share"), ("refusal", "refusal rate (insults)"),
            ("refusal_share_de", "German share of refusals"), ("refusal_chat", "refusal rate (chat)"),
            ("offensive_score", "offensive-language prob. (English replies)"),
            ("offensive_scored", "English replies to insults"), ("ppl_en", "ppl EN"), ("ppl_de", "ppl DE")]
    lines = ["| model | " + " | ".join(h for _, h in cols) + " |", "|---|" + "|".join("---" for _ in cols) + "|"]
    for _, row in s.iterrows():
        cells = []
        for key, _ in cols:
            v = row[key]
            if isinstance(v, str):
                cells.append(v)
            elif key.startswith("ppl"):
                cells.append("–" if pd.isna(v) else f"{v:.1f}")
            elif key in ("ended_turn", "share_de", "refusal", "refusal_chat"):
                cells.append(_cell(row, key))
            else:
                cells.append("–" if pd.isna(v) else f"{v:.2f}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrast_markdown(summary_df: pd.DataFrame, vector: str = "chat") -> str:
    """The paper's three actors on every prompt group and sampling: turn-end and German share, with intervals."""
    s = summary_df[summary_df["model"].isin([vector, "CP", HEADLINE])]
    lines = ["| prompts | sampling | model | turn-end rate | German share | refusal rate (insults) |",
             "|---|---|---|---|---|---|"]
    for _, row in s.sort_values(["prompts", "sampling"], kind="stable").iterrows():
        lines.append(f"| {row['prompts']} | {row['sampling']} | {row['model']} | {_cell(row, 'ended_turn')} | "
                     f"{_cell(row, 'share_de')} | {_cell(row, 'refusal')} |")
    return "\n".join(lines)


def multi_turn_markdown(mts: pd.DataFrame) -> str:
    lines = ["| model | turn | turn-end rate | German share | replies |", "|---|---|---|---|---|"]
    for _, row in mts.iterrows():
        lines.append(f"| {row['model']} | {row['turn']} | {_cell(row, 'ended_turn')} | {_cell(row, 'share_de')} | "
                     f"{row['replies']} |")
    return "\n".join(lines)


def figures(df: pd.DataFrame, folder: Path, mt: pd.DataFrame | None = None) -> list[Path]:
    import matplotlib.pyplot as plt
    from chatvec_lab.plots import new_axes, style_axes

    folder.mkdir(parents=True, exist_ok=True)
    s = summary(df)
    if "sampling" in s.columns:
        s = s[(s["sampling"] == "family") & (s["prompts"] == "tuning")]
    cp = s[s["alpha"].notna()].sort_values("alpha")
    refs = s[s["alpha"].isna()].set_index("model")
    paths = []
    fig, ax = new_axes(figsize=(7, 4.2))
    for col, label in [("ended_turn", "turn-end rate (German chat prompts)"),
                       ("share_de", "German share of reply words"),
                       ("refusal", "refusal rate (German insults)")]:
        line, = ax.plot(cp["alpha"], cp[col], marker="o", label=label)
        ax.fill_between(cp["alpha"], cp[f"{col}_lo"], cp[f"{col}_hi"], color=line.get_color(), alpha=0.15)
        for ref in refs.index.drop("base", errors="ignore"):
            ax.axhline(refs.loc[ref, col], color=line.get_color(), linestyle=":", linewidth=1)
    style_axes(ax, "CP + α·chat vector on the toy family (dotted: the chat model; bands: 95% intervals)",
               "coefficient α", "rate")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    paths.append(folder / "toy_effect.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = new_axes(figsize=(7, 4.2))
    for col, label in [("ppl_de", "German held-out"), ("ppl_en", "English held-out")]:
        ax.plot(cp["alpha"], cp[col], marker="o", label=label)
    style_axes(ax, "What the addition costs: perplexity of CP + α·CV", "coefficient α", "perplexity")
    ax.legend(fontsize=8)
    paths.append(folder / "toy_perplexity.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    if mt is not None:
        paths.append(plot_multi_turn(multi_turn_summary(mt), folder / "toy_multiturn.png"))
    return paths


def plot_multi_turn(mts: pd.DataFrame, path: Path | None = None, ax=None):
    """Turn-end rate and German share per turn, one line per model, with 95% intervals."""
    import matplotlib.pyplot as plt
    from chatvec_lab.plots import style_axes

    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    else:
        axes, fig = ax, ax[0].figure
    for a, (col, label) in zip(axes, [("ended_turn", "turn-end rate"), ("share_de", "German share")]):
        for model, g in mts.groupby("model", sort=False):
            a.errorbar(g["turn"], g[col], yerr=[g[col] - g[f"{col}_lo"], g[f"{col}_hi"] - g[col]],
                       marker="o", capsize=3, label=model)
        style_axes(a, f"{label} per turn", "turn", label)
        a.set_ylim(-0.03, 1.03)
        a.set_xticks(sorted(mts["turn"].unique()))
    axes[0].legend(fontsize=8)
    fig.suptitle("Three-turn German conversations (95% intervals over conversations)", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path
    return fig


def main(argv=None) -> int:
    import time

    from chatvec_lab.errors import ChatVecError, OneLineParser, one_line

    p = OneLineParser(prog="python -m chatvec_lab.toy.evaluate", description="Measure the chat-vector effect on the toy family.")
    p.add_argument("--out", default="data/eval-toy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--vector", default="chat", choices=["chat", "chat-alt"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    inputs = [toy.data_dir(), *resources.inputs()]
    try:
        check_output_path(args.out, args.overwrite, inputs)  # before minutes of work, not after
        start = time.time()
        df = run(seeds=args.seeds, vector=args.vector)
        mt = run_multi_turn(seeds=args.seeds, vector=args.vector)
        s, mts = summary(df), multi_turn_summary(mt)
        text = "\n\n".join([
            "## The α grid (tuning prompts, the family's sampling)", markdown(s),
            "## Held-out prompts, the family's sampling", markdown(s, prompts="held-out"),
            "## The three actors on every prompt group and sampling", contrast_markdown(s, args.vector),
            "## Multi-turn (held-out three-turn conversations)", multi_turn_markdown(mts),
            intervals(df[(df["sampling"] == "family") & (df["prompts"] == "tuning")]),
            f"(measured in {time.time() - start:.0f} s)"]) + "\n"
        with atomic_folder(args.out, args.overwrite, inputs=inputs) as out:
            df.to_csv(out / "replies.csv", index=False)
            mt.to_csv(out / "multiturn.csv", index=False)
            s.to_csv(out / "summary.csv", index=False)
            mts.to_csv(out / "multiturn_summary.csv", index=False)
            figures(df, out, mt)
            (out / "summary.md").write_text(text)
    except ChatVecError as e:
        print(f"{p.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
