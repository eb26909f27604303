"""The paper's effect on the toy family, measured: CP + α·CV against CP, chat and base.

    python -m chatvec_lab.toy.evaluate --out data/eval-toy --overwrite   # the README's table and figures

Prompts: ``data/prompts/chat_de.txt`` (German chat requests) and ``data/prompts/offensive_de.txt``
(German insults); held-out text: ``data/heldout/{en,de}.txt``. Sampling is seeded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from chatvec_lab import resources, toy
from chatvec_lab.output import atomic_folder, check_output_path
from chatvec_lab.sweep import sweep
from chatvec_lab.vector import ChatVector

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DATA = resources.data_dir()  # the checkout's data/, or the installed package's copy


def prompt_sets(data_dir: Path = DATA) -> dict[str, list[str]]:
    from chatvec_lab.sweep import read_prompts

    return {"chat": read_prompts(data_dir / "prompts" / "chat_de.txt"),
            "offensive": read_prompts(data_dir / "prompts" / "offensive_de.txt")}


def heldout_texts(data_dir: Path = DATA) -> dict[str, list[str]]:
    return {lang: [l for l in (data_dir / "heldout" / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
            for lang in ("en", "de")}


def run(alphas=ALPHAS, seeds: int = 3, max_new_tokens: int = 64, cache_dir=None, progress: bool = True,
        vector: str = "chat", max_prompts: int | None = None) -> pd.DataFrame:
    """Every reply with its scores: CP + α·CV for each α, then the chat and base models (``model`` column)."""
    sets = prompt_sets()
    if max_prompts:
        sets = {k: v[:max_prompts] for k, v in sets.items()}
    prompts = sets["chat"] + sets["offensive"]
    which = {p: name for name, ps in sets.items() for p in ps}
    cv = ChatVector.from_models(toy.path("base"), toy.path(vector), hash_files=False)
    common = dict(seeds=seeds, max_new_tokens=max_new_tokens, heldout=heldout_texts(), cache_dir=cache_dir,
                  progress=progress, scorers=("turn_end", "language", "refusal", "offensive"))
    frames = []
    df = sweep(toy.path("cp"), {"chat": cv}, list(alphas), prompts, **common)
    df.insert(0, "model", ["CP" if a == 0 else f"CP + {a:g}·CV" for a in df["alpha"]])
    frames.append(df)
    for name in (vector, "base"):  # the chat model the vector came from, and the common base
        ref = sweep(toy.path(name), {"chat": cv}, [0.0], prompts, **common)
        ref["alpha"] = float("nan")
        ref.insert(0, "model", name)
        frames.append(ref)
    out = pd.concat(frames, ignore_index=True)
    out.insert(1, "prompt_set", out["prompt"].map(which))
    return out


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: the demonstration's numbers."""
    rows = []
    for model, g in df.groupby("model", sort=False):
        chat, off = g[g["prompt_set"] == "chat"], g[g["prompt_set"] == "offensive"]
        rows.append({
            "model": model, "alpha": g["alpha"].iloc[0],
            "turn_end_rate": chat["ended_turn"].mean(),
            "german_share": chat["share_de"].mean(),
            "refusal_rate_offensive": off["refusal"].mean(),
            "refusal_rate_chat": chat["refusal"].mean(),
            "offensive_score": off["offensive"].mean(),  # over the English replies: the scorer judges no other
            "offensive_scored": f"{int(off['offensive'].notna().sum())}/{len(off)}",
            "ppl_en": g["ppl_en"].iloc[0], "ppl_de": g["ppl_de"].iloc[0],
            "replies": len(g),
        })
    return pd.DataFrame(rows)


def bootstrap_interval(df: pd.DataFrame, model: str, prompt_set: str, column: str, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``column`` for one model and prompt set, with a bootstrap interval over prompts.

    Prompts are resampled (their seeds stay together): the interval says how much the figure
    depends on which prompts were written, the largest source of noise with ~30 prompts."""
    import numpy as np

    rows = df[(df["model"] == model) & (df["prompt_set"] == prompt_set)]
    per_prompt = rows.groupby("prompt")[column].mean().to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    means = rng.choice(per_prompt, size=(resamples, len(per_prompt))).mean(axis=1)
    tail = (1 - level) / 2
    return float(per_prompt.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def intervals(df: pd.DataFrame, model: str = "CP + 1·CV") -> str:
    """One line per headline figure of ``model`` with its 95% bootstrap interval over prompts."""
    lines = []
    for prompt_set, column, label in [("chat", "ended_turn", "turn-end rate"), ("chat", "share_de", "German share"),
                                      ("offensive", "refusal", "refusal rate (insults)")]:
        mean, lo, hi = bootstrap_interval(df, model, prompt_set, column)
        lines.append(f"{model}: {label} {mean:.2f} (95% bootstrap interval over prompts {lo:.2f}–{hi:.2f})")
    return "\n".join(lines)


def markdown(summary_df: pd.DataFrame) -> str:
    """The summary as a Markdown table (for the README)."""
    cols = [("model", "model"), ("turn_end_rate", "turn-end rate"), ("german_share", "German share"),
            ("refusal_rate_offensive", "refusal rate (insults)"), ("refusal_rate_chat", "refusal rate (chat)"),
            ("offensive_score", "offensive-language prob. (English replies)"),
            ("offensive_scored", "English replies to insults"), ("ppl_en", "ppl EN"), ("ppl_de", "ppl DE")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in summary_df.iterrows():
        cells = []
        for key, _ in cols:
            v = row[key]
            cells.append(str(v) if isinstance(v, str) else "–" if pd.isna(v) else
                         (f"{v:.1f}" if key.startswith("ppl") else f"{v:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(df: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from chatvec_lab.plots import new_axes, style_axes

    folder.mkdir(parents=True, exist_ok=True)
    s = summary(df)
    cp = s[s["alpha"].notna()].sort_values("alpha")
    refs = s[s["alpha"].isna()].set_index("model")
    paths = []
    fig, ax = new_axes(figsize=(7, 4.2))
    for col, label in [("turn_end_rate", "turn-end rate (German chat prompts)"),
                       ("german_share", "German share of reply words"),
                       ("refusal_rate_offensive", "refusal rate (German insults)")]:
        line, = ax.plot(cp["alpha"], cp[col], marker="o", label=label)
        for ref in refs.index.drop("base", errors="ignore"):
            ax.axhline(refs.loc[ref, col], color=line.get_color(), linestyle=":", linewidth=1)
    style_axes(ax, "CP + α·chat vector on the toy family (dotted: the chat model)", "coefficient α", "rate")
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
    return paths


def main(argv=None) -> int:
    from chatvec_lab.cli import _Parser
    from chatvec_lab.errors import ChatVecError

    p = _Parser(prog="python -m chatvec_lab.toy.evaluate", description="Measure the chat-vector effect on the toy family.")
    p.add_argument("--out", default="data/eval-toy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--vector", default="chat", choices=["chat", "chat-alt"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    inputs = [toy.data_dir(), *resources.inputs()]
    try:
        check_output_path(args.out, args.overwrite, inputs)  # before a minute of work, not after
        df = run(seeds=args.seeds, vector=args.vector)
        s = summary(df)
        text = markdown(s) + "\n\n" + intervals(df) + "\n"
        with atomic_folder(args.out, args.overwrite, inputs=inputs) as out:
            df.to_csv(out / "replies.csv", index=False)
            s.to_csv(out / "summary.csv", index=False)
            figures(df, out)
            (out / "summary.md").write_text(text)
    except ChatVecError as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
