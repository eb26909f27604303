"""The two toy families side by side: what the base knew of German decides what the chat vector carries.

    from chatvec_lab.toy.families import compare_families, family_table
    replies = compare_families()            # one row per reply: family, model, prompt set, scores
    family_table(replies)                   # one row per family and model, every rate with its 95% interval

``toy`` (the default family) has a base that saw 0.5% German; ``toy-bilingual`` (the README's recipe 2) a
base that saw 10%. In each family the chat vector is its own ``chat − base``, applied to its own ``cp``, and
every model generates with its family's own sampling (``generation_config.json``: temperature, top-k and its
reply budget, 128 tokens for ``toy``, 64 for ``toy-bilingual``), on the held-out German prompt sets (chat
requests and insults; used in no training and no tuning).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from chatvec_lab import toy
from chatvec_lab.toy.evaluate import family_sampling

FAMILIES = ("toy", "toy-bilingual")
# the rows of the comparison: label → (member, α of the family's chat vector)
MODELS = {"CP": ("cp", 0.0), "CP + 1·CV": ("cp", 1.0), "chat": ("chat", 0.0)}
# which prompt set each metric is read on
METRIC_SETS = {"ended_turn": "chat", "share_de": "chat", "refusal": "offensive"}
METRIC_LABELS = {"ended_turn": "turn-end rate (German chat prompts)",
                 "share_de": "German share of reply words (German chat prompts)",
                 "refusal": "refusal rate (German insults)"}


def compare_families(families: Sequence[str] = FAMILIES, prompts: int | None = None, seeds: int = 2,
                     cache_dir=None, progress: bool = True, device="auto", dtype="auto") -> pd.DataFrame:
    """Every reply of CP, CP + 1·CV and the chat model of each family on the held-out German prompts (each model
    loaded on ``device`` in ``dtype``, as ``sweep`` loads it).

    ``prompts``: the first n of each held-out set (all by default); ``seeds`` sampling seeds per prompt.
    Columns: ``family``, ``model``, ``prompt_set`` (chat / offensive), ``max_new_tokens`` and the sweep's."""
    from chatvec_lab.behaviour.sweep import sweep
    from chatvec_lab.toy.evaluate import prompt_sets
    from chatvec_lab.core.vector import ChatVector

    sets = {name: ps[:prompts] if prompts else ps for name, ps in prompt_sets(heldout=True).items()}
    which = {p: name for name, ps in sets.items() for p in ps}
    every = list(which)
    frames = []
    for family in families:
        cv = ChatVector.from_models(toy.path("base", family), toy.path("chat", family), hash_files=False)
        sampling = family_sampling("cp", family)
        common = dict(seeds=seeds, scorers=("ended_turn", "language", "refusal"), language="de",
                      cache_dir=cache_dir, progress=progress, device=device, dtype=dtype, **sampling)
        for label, (member, alpha) in MODELS.items():
            df = sweep(toy.path(member, family), {"chat": cv}, [alpha], every, **common)
            df.insert(0, "family", family)
            df.insert(1, "model", label)
            df.insert(2, "prompt_set", df["prompt"].map(which))
            df["max_new_tokens"] = sampling["max_new_tokens"]
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def family_table(replies: pd.DataFrame) -> pd.DataFrame:
    """One row per family and model: each metric (on its prompt set, ``METRIC_SETS``) with ``<metric>_lo`` /
    ``<metric>_hi`` (``sweep.summarize``: Wilson for rates, clustered by prompt) and ``<metric>_n``."""
    from chatvec_lab.behaviour.sweep import summarize

    rows = None
    for metric, prompt_set in METRIC_SETS.items():
        part = replies[replies["prompt_set"] == prompt_set]
        s = summarize(part, [metric], by=["family", "model"])
        s = s.rename(columns={"n": f"{metric}_n"})[["family", "model", metric, f"{metric}_lo", f"{metric}_hi",
                                                      f"{metric}_n"]]
        rows = s if rows is None else rows.merge(s, on=["family", "model"])
    order = {m: i for i, m in enumerate(MODELS)}
    fam = {f: i for i, f in enumerate(dict.fromkeys(replies["family"]))}
    rows = rows.sort_values(["family", "model"], key=lambda c: c.map(fam if c.name == "family" else order))
    return rows.reset_index(drop=True)


def separated(table: pd.DataFrame, metric: str, a: tuple[str, str], b: tuple[str, str]) -> int:
    """+1 if (family, model) ``a``'s interval of ``metric`` lies wholly above ``b``'s, −1 wholly below, 0 if
    they overlap (no clear difference at this n)."""
    t = table.set_index(["family", "model"])
    if t.loc[a, f"{metric}_lo"] > t.loc[b, f"{metric}_hi"]:
        return 1
    if t.loc[a, f"{metric}_hi"] < t.loc[b, f"{metric}_lo"]:
        return -1
    return 0


def family_geometry(families: Sequence[str] = FAMILIES) -> pd.DataFrame:
    """Per family: the cosine of its chat vector (chat − base) and its language vector (cp − base), against
    chance (``geometry.grade_cosine``), and each vector's norm relative to the base's."""
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.vector import ChatVector

    rows = []
    for family in families:
        base = toy.path("base", family)
        vectors = {"chat": ChatVector.from_models(base, toy.path("chat", family), hash_files=False),
                   "language": ChatVector.from_models(base, toy.path("cp", family), hash_files=False)}
        stats = geometry.vector_stats(vectors)
        whole = geometry.cosine_by_part(stats, "chat", "language").set_index("part").loc["all"]
        norm = stats.tensors.groupby("vector")["norm"].apply(lambda n: float((n ** 2).sum() ** 0.5))
        row = {"family": family, "cosine": float(whole["cosine"]), "dim": int(whole["dim"]),
               "times_chance": float(whole["times_random"]),
               "grade": geometry.grade_cosine(float(whole["cosine"]), int(whole["dim"])),
               "chat_norm": norm["chat"], "language_norm": norm["language"]}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_families(table: pd.DataFrame, metrics: Sequence[str] = tuple(METRIC_SETS), axes=None):
    """One panel per metric: each family's models as points with their 95% intervals. Returns the Figure."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    else:
        fig = axes[0].figure
    families = list(dict.fromkeys(table["family"]))
    models = list(dict.fromkeys(table["model"]))
    width = 0.8 / max(1, len(families))
    for ax, metric in zip(axes, metrics):
        for j, family in enumerate(families):
            part = table[table["family"] == family].set_index("model").reindex(models)
            x = [i - 0.4 + width * (j + 0.5) for i in range(len(models))]
            y = part[metric]
            err = [y - part[f"{metric}_lo"], part[f"{metric}_hi"] - y]
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=family)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig
