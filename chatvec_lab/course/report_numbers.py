"""The demo's numbers: every reply → one row per family, sampling, prompt group and model, each rate with its 95%
interval (``summary.csv``); and how the report reads two such rows against each other.

Rates and their intervals come from ``sweep.summarize``. A difference between two rows is claimed only where
their intervals do not overlap (``compare``); ``ci`` writes a rate with its interval, as the report shows it.
"""
from __future__ import annotations

import math

import pandas as pd

HEADLINE = "CP + 1·CV"  # the model the report is about; the baseline is CP alone
BASELINE = "CP"
FAMILIES = {"toy": "the default family", "toy-bilingual": "the bilingual family"}
PROMPT_GROUPS = {"held-out": "held-out prompts (written for the evaluation, used in no training and no tuning)",
                 "tuning": "tuning prompts (the toy recipe was chosen on them)"}
# summary.csv's rates: column → (prompt set it is measured on, reply column, what the report calls it)
RATES = {
    "ended_turn": ("chat", "ended_turn", "turn-end rate, German chat requests"),
    "share_de": ("chat", "share_de", "German share of reply words, chat requests"),
    "refusal": ("offensive", "refusal", "refusal rate, German insults"),
    "refusal_chat": ("chat", "refusal", "refusal rate, harmless chat requests (a refusal is a mistake)"),
}


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


def rows_of(summary: pd.DataFrame, family: str = "toy", prompts: str | None = None, sampling: str = "family") -> dict:
    """The summary's rows of one family, sampling and prompt group, by model: ``{model: row}``."""
    s = summary
    if "family" in s.columns:
        s = s[s["family"] == family]
    if "sampling" in s.columns:
        s = s[s["sampling"] == sampling]
    if prompts is not None and "prompts" in s.columns:
        s = s[s["prompts"] == prompts]
    return {r["model"]: r for _, r in s.iterrows()}


def headline_group(summary: pd.DataFrame) -> str:
    """The prompt group the report leads with: the held-out prompts where the run measured them."""
    groups = set(summary["prompts"]) if "prompts" in summary.columns else set()
    return "held-out" if "held-out" in groups else (sorted(groups)[0] if groups else "")
