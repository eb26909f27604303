"""95% intervals for the lab's tables, in one place: rates get an interval made for proportions.

Every table that shows a metric with ``_lo``/``_hi`` columns (``sweep.summarize``, ``ablations.summarize``,
``atlas.summarize_atlas``, ``toy.evaluate.summary``) computes them here, with ``estimate``:

* **Rates** — one 0/1 outcome per reply (``ended_turn``, ``refusal``, or any column whose values are all 0/1
  or booleans): the **Wilson score interval** (``wilson_interval``). Unlike the normal approximation
  p ± 1.96·√(p(1−p)/n) it never leaves [0, 1], and at 0/n or n/n it still has a width (0/10 → 0–0.28),
  where the normal approximation (and a bootstrap) give a zero-width interval, as if a rate seen at 0 in
  ten replies were known to be exactly 0. Its coverage is close to 95% even for small n (Brown, Cai &
  DasGupta 2001, "Interval estimation for a binomial proportion"); Clopper–Pearson would be wider than
  needed.
* **Replies are clustered by prompt.** Several seeds per prompt are not independent replies: a prompt the
  model handles well ends its turn under every seed. ``rate_interval`` therefore runs Wilson on the
  *effective* number of replies n/deff, where deff, the design effect, is the variance of the rate under
  resampling of prompts (the cluster-robust, "sandwich" variance) over the variance that independent replies
  would give. deff is kept within [1, n/k] (k prompts): at 1 the replies count as independent, at n/k
  (seeds perfectly correlated) each prompt counts once. When the rate is 0 or 1 the data say nothing about
  the correlation, and deff = 1 (the convention of Korn & Graubard 1998 and of the NCHS standards for
  proportions). With a single prompt deff cannot be estimated either, and is 1 too: the interval is then
  about that prompt's replies, not about prompts in general. This is an approximation: with few prompts
  deff is itself noisy.
* **Other means** — shares in [0, 1] (``share_de``, classifier probabilities such as ``offensive`` and
  Detoxify's columns), token counts, perplexities: mean ± t·SE, SE cluster-robust over prompts when there are
  several replies per prompt (t with k−1 degrees of freedom), else s/√n (t with n−1). A metric bounded to
  [0, 1] has its interval clipped to [0, 1] (the clip only ever shortens the interval on the side where it
  left the range). From a single value no spread can be estimated: the interval is NaN.
* **No values** (every reply's score missing, or n = 0): mean and interval are NaN. ``wilson_interval``
  itself returns (NaN, NaN) for n = 0 and raises ``ValueError`` for impossible counts (negative, more
  successes than trials, not finite).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95
Z95 = NormalDist().inv_cdf(0.975)  # 1.959964…

# which metrics are rates (one 0/1 outcome per reply) and which are means of a number bounded to [0, 1]
RATE_METRICS = ("ended_turn", "refusal")
UNIT_METRICS = ("offensive", "toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack",
                "sexual_explicit", "identity_hate", "severe_toxic", "toxic")
UNIT_PREFIXES = ("share_",)  # share_de, share_en …: the share of a reply's words in a language


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level {level!r} must lie strictly between 0 and 1")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion: ``successes`` out of ``n`` (floats allowed, for an effective
    n), at ``z`` standard normal quantiles (1.96 for 95%). Always inside [0, 1] and always containing
    successes/n; exactly 0 (1) at the lower (upper) end when successes is 0 (n).

        center = (p + z²/2n) / (1 + z²/n),   half = z/(1 + z²/n) · √(p(1−p)/n + z²/4n²)

    n = 0: (NaN, NaN), nothing was observed. Negative or non-finite counts, more successes than n, or z ≤ 0
    raise ``ValueError``."""
    successes, n, z = float(successes), float(n), float(z)
    if not (math.isfinite(successes) and math.isfinite(n) and math.isfinite(z)):
        raise ValueError(f"wilson_interval needs finite numbers, got successes={successes}, n={n}, z={z}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n < 0 or successes < 0 or successes > n * (1 + 1e-12):
        raise ValueError(f"{successes} successes out of {n} is not a count of successes (0 ≤ successes ≤ n)")
    if n == 0:
        return math.nan, math.nan
    p = min(successes / n, 1.0)
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if p == 0 else min(max(center - half, 0.0), p)  # rounding must not push it past p or 0
    hi = 1.0 if p == 1 else max(min(center + half, 1.0), p)
    return lo, hi


def t_quantile(level: float, df: float) -> float:
    """The two-sided Student t quantile: P(|T| ≤ t) = ``level`` with ``df`` degrees of freedom (df ≥ 1).
    Hill's algorithm (CACM 396, 1970), accurate to about 1e-6 relative; the normal quantile for df = inf."""
    if df < 1 or math.isnan(df):
        raise ValueError(f"t_quantile needs df ≥ 1, got {df}")
    p = 1 - level  # the two tails together
    if not 0 < p < 1:
        raise ValueError(f"level {level!r} must lie strictly between 0 and 1")
    if math.isinf(df):
        return NormalDist().inv_cdf(1 - p / 2)
    n = df
    if n == 1:
        return math.cos(p * math.pi / 2) / math.sin(p * math.pi / 2)
    if n == 2:
        return math.sqrt(2 / (p * (2 - p)) - 2)
    a = 1 / (n - 0.5)
    b = 48 / (a * a)
    c = ((20700 * a / b - 98) * a - 16) * a + 96.36
    d = ((94.5 / (b + c) - 3) / b + 1) * math.sqrt(a * math.pi / 2) * n
    x = d * p
    y = x ** (2 / n)
    if y > 0.05 + a:
        x = NormalDist().inv_cdf(p / 2)
        y = x * x
        if n < 5:
            c += 0.3 * (n - 4.5) * (x + 0.6)
        c = (((0.05 * d * x - 5) * x - 7) * x - 2) * x + b + c
        y = (((((0.4 * y + 6.3) * y + 36) * y + 94.5) / c - y - 3) / b + 1) * x
        y = a * y * y
        y = math.expm1(y) if y > 0.002 else 0.5 * y * y + y
    else:
        y = ((1 / (((n + 6) / (n * y) - 0.089 * d - 0.822) * (n + 2) * 3) + 0.5 / (n + 4)) * y - 1) \
            * (n + 1) / (n + 2) + 1 / y
    return math.sqrt(n * y)


def _clean(values, clusters) -> tuple[np.ndarray, np.ndarray | None]:
    x = pd.to_numeric(pd.Series(values).reset_index(drop=True).astype(object), errors="coerce").astype(float)
    keep = x.notna().to_numpy()
    if clusters is None:
        return x.to_numpy()[keep], None
    c = pd.Series(clusters).reset_index(drop=True)
    if len(c) != len(x):
        raise ValueError(f"{len(c)} cluster labels for {len(x)} values")
    return x.to_numpy()[keep], pd.factorize(c[keep])[0]


def _cluster_variance(x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """The cluster-robust variance of the mean of ``x`` and the number of clusters k:
    k/(k−1) · Σ_clusters (Σ_in cluster (x − x̄))² / n². With one value per cluster it is s²/n."""
    n = len(x)
    resid = np.bincount(labels, weights=x - x.mean())
    k = len(resid)
    if k < 2:
        return math.nan, k
    return float(k / (k - 1) * (resid ** 2).sum() / (n * n)), k


def design_effect(values, clusters) -> float:
    """How much clustering inflates the variance of a rate: the cluster-robust variance over the variance of
    n independent replies, s²/n (so 1 when every cluster holds one reply), kept within [1, n/k]. 1 where it
    cannot be estimated: a rate of 0 or 1, fewer than two clusters, or no clusters given."""
    x, labels = _clean(values, clusters)
    n = len(x)
    if labels is None or n < 2:
        return 1.0
    k = int(labels.max()) + 1
    p = x.mean()
    if k < 2 or k == n or p <= 0 or p >= 1:
        return 1.0
    v_cluster, _ = _cluster_variance(x, labels)
    v_srs = p * (1 - p) / (n - 1)  # s²/n of 0/1 values
    return float(min(max(v_cluster / v_srs, 1.0), n / k))


def is_binary(values) -> bool:
    """Whether every non-missing value is 0 or 1 (booleans included), and there is at least one."""
    x, _ = _clean(values, None)
    return len(x) > 0 and bool(np.isin(x, (0.0, 1.0)).all())


def rate_interval(values, clusters: Sequence | None = None, level: float = LEVEL) -> tuple[float, float, float]:
    """A rate (0/1 or bool per reply; missing values left out) and its Wilson interval on the effective n
    (n / ``design_effect``, see the module's docstring). ``clusters``: one label per value, e.g. the prompt,
    when one prompt gave several replies. Returns (rate, low, high); all NaN when no value is left."""
    x, labels = _clean(values, clusters)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("rate_interval needs 0/1 (or boolean) values; use mean_interval for other numbers")
    p = float(x.mean())
    n_eff = len(x) / design_effect(x, labels) if labels is not None else len(x)
    lo, hi = wilson_interval(p * n_eff, n_eff, _z(level))
    return p, lo, hi


def mean_interval(values, clusters: Sequence | None = None, level: float = LEVEL,
                  bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """A mean with its t interval: mean ± t·SE, SE cluster-robust over ``clusters`` when some hold several
    values (t with k−1 degrees of freedom, k clusters), else s/√n (t with n−1). ``bounds``: the range the
    values live in, e.g. (0, 1) for a share; the interval is clipped to it. Returns (mean, low, high): NaN
    interval from fewer than two values (or clusters), all NaN from none."""
    x, labels = _clean(values, clusters)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if labels is None:
        labels = np.arange(n)
    var, k = _cluster_variance(x, labels)
    if k < 2:
        return mean, math.nan, math.nan
    half = t_quantile(level, k - 1) * math.sqrt(max(var, 0.0))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


def metric_kind(name: str, values=None) -> str:
    """``"rate"`` (a 0/1 outcome per reply: Wilson), ``"unit"`` (a number in [0, 1], e.g. a share or a
    probability: t interval clipped to [0, 1]) or ``"mean"`` (anything else: t interval). Known metrics by
    name (``RATE_METRICS``, ``UNIT_METRICS``, ``share_*``); a declared rate whose values are not 0/1 (say,
    already averaged) counts as ``"unit"``; an unknown column is a rate when all its values are 0/1 or
    booleans. Decide on the whole column, not per group: a share that is 1.0 in one group stays a share."""
    binary = values is not None and is_binary(values)
    if name in RATE_METRICS:
        return "rate" if values is None or binary else "unit"
    if name in UNIT_METRICS or name.startswith(UNIT_PREFIXES):
        return "unit"
    return "rate" if binary else "mean"


def estimate(values, kind: str, clusters: Sequence | None = None, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` by ``kind`` (``metric_kind``): the one interval every table uses."""
    if kind == "rate":
        return rate_interval(values, clusters, level)
    if kind == "unit":
        return mean_interval(values, clusters, level, bounds=(0.0, 1.0))
    if kind == "mean":
        return mean_interval(values, clusters, level)
    raise ValueError(f"unknown kind of metric {kind!r}: rate, unit or mean")
