"""Rate intervals stay inside [0, 1] and match Wilson's closed form; every table that shows a rate uses them."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from chatvec_lab.analysis import intervals
from chatvec_lab.analysis.intervals import (design_effect, estimate, mean_interval, metric_kind, rate_interval, t_quantile,
                                   wilson_interval)

Z = 1.96


def wilson_by_hand(k: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson's interval written out independently: the roots p of (p̂ − p)² = z²·p(1 − p)/n."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


# (successes, n, low, high) at z = 1.96, computed by hand from the closed form (0/n: high = z²/(n + z²);
# n/n: low = n/(n + z²)) and cross-checked with scipy's binomtest(...).proportion_ci(method="wilson")
KNOWN = [
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 8, 0.0224, 0.4709),
    (7, 8, 0.5291, 0.9776),
    (5, 10, 0.2366, 0.7634),
    (0, 1, 0.0, 0.7935),
    (1, 1, 0.2065, 1.0),
    (24, 32, 0.5789, 0.8675),
]


@pytest.mark.parametrize("k,n,lo,hi", KNOWN)
def test_wilson_matches_known_values(k, n, lo, hi):
    got = wilson_interval(k, n, z=Z)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert got == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_wilson_zero_and_all_have_width_and_exact_ends():
    assert wilson_interval(0, 10, Z)[1] == pytest.approx(Z * Z / (10 + Z * Z), abs=1e-12)
    assert wilson_interval(10, 10, Z)[0] == pytest.approx(10 / (10 + Z * Z), abs=1e-12)
    for n in (1, 2, 8, 30, 1000):
        lo, hi = wilson_interval(0, n)
        assert lo == 0.0 and hi > 0.0  # 0/n is not "exactly 0"
        lo, hi = wilson_interval(n, n)
        assert hi == 1.0 and lo < 1.0


def test_wilson_one_and_seven_of_eight_stay_inside():
    lo, hi = wilson_interval(1, 8)
    assert 0.0 < lo < 1 / 8 < hi < 1.0
    lo, hi = wilson_interval(7, 8)
    assert 0.0 < lo < 7 / 8 < hi < 1.0
    # the normal approximation that summarize used to compute leaves [0, 1] on exactly these cases
    values = np.array([1] * 7 + [0])
    assert values.mean() + 1.96 * values.std(ddof=1) / math.sqrt(8) > 1.0
    assert (1 - values).mean() - 1.96 * values.std(ddof=1) / math.sqrt(8) < 0.0


def test_wilson_n_one_and_n_zero():
    assert wilson_interval(1, 1, Z) == pytest.approx((1 / (1 + Z * Z), 1.0))
    assert wilson_interval(0, 1, Z) == pytest.approx((0.0, Z * Z / (1 + Z * Z)))
    lo, hi = wilson_interval(0, 0)  # nothing observed: no interval, not an error (a group may have no scores)
    assert math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in rate_interval([]))
    assert all(math.isnan(v) for v in rate_interval([math.nan, None]))


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (1, -2), (math.nan, 5), (1, math.inf)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_wilson_contains_the_estimate_and_stays_in_the_unit_interval():
    for z in (1.0, 1.96, 2.576, 4.0):
        for n in [1, 2, 3, 5, 8, 13, 30, 100, 2.5, 7.3]:
            for k in np.linspace(0, n, 11):
                lo, hi = wilson_interval(k, n, z)
                assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, z, lo, hi)
                assert hi - lo > 0


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 4, 8, 17, 50):
        for k in range(n + 1):
            ci = stats.binomtest(k, n).proportion_ci(method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-10)
    for df in (1, 2, 3, 4, 7, 15, 31, 100, 1000):
        for level in (0.9, 0.95, 0.99):
            assert t_quantile(level, df) == pytest.approx(stats.t.ppf(0.5 + level / 2, df), rel=2e-5)


def test_t_quantile_table_values():
    assert t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.95, 10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile(0.95, 30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(0.95, math.inf) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_design_effect_between_independent_and_one_per_prompt():
    prompts = [p for p in "abcd" for _ in range(3)]
    same = [1] * 3 + [0] * 3 + [1] * 6  # every seed of a prompt agrees: each prompt counts once
    assert design_effect(same, prompts) == pytest.approx(3.0)
    assert rate_interval(same, prompts)[1:] == pytest.approx(wilson_interval(3, 4, intervals.Z95))
    assert rate_interval(same)[1:] == pytest.approx(wilson_interval(9, 12, intervals.Z95))
    spread = [1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]  # one in three per prompt: less spread than chance, deff 1
    assert design_effect(spread, prompts) == 1.0
    assert design_effect([0] * 12, prompts) == 1.0 and design_effect([1] * 12, prompts) == 1.0
    assert design_effect(same, list(range(12))) == 1.0  # one reply per prompt
    assert design_effect(same, ["x"] * 12) == 1.0  # one prompt: nothing to estimate it from
    # clustering only widens: the clustered interval holds the independent one
    lo_c, hi_c = rate_interval(same, prompts)[1:]
    lo_i, hi_i = rate_interval(same)[1:]
    assert lo_c <= lo_i and hi_i <= hi_c


def test_rate_interval_refuses_non_binary_values():
    with pytest.raises(ValueError, match="0/1"):
        rate_interval([0.2, 0.9])


def test_mean_interval_t_over_prompts_and_clipped_for_shares():
    x = np.array([0.2, 0.4, 0.6, 0.9, 0.5])
    mean, lo, hi = mean_interval(x)
    half = t_quantile(0.95, 4) * x.std(ddof=1) / math.sqrt(5)
    assert (mean, lo, hi) == pytest.approx((x.mean(), x.mean() - half, x.mean() + half))
    share = [1.0, 1.0, 1.0, 0.7]  # an unclipped t interval reaches past 1
    assert np.mean(share) + t_quantile(0.95, 3) * np.std(share, ddof=1) / 2 > 1
    mean, lo, hi = mean_interval(share, bounds=(0, 1))
    assert 0 <= lo <= mean <= hi == 1.0
    # clustered: two seeds per prompt equal to each other → the prompts' means, t on k − 1
    per_prompt = [0.1, 0.5, 0.3]
    mean, lo, hi = mean_interval([v for v in per_prompt for _ in range(2)], [p for p in "abc" for _ in range(2)])
    assert (lo, hi) == pytest.approx(mean_interval(per_prompt)[1:])
    assert all(math.isnan(v) for v in mean_interval([0.5])[1:])  # one value: no spread to estimate
    assert all(math.isnan(v) for v in mean_interval([]))


def test_metric_kinds():
    assert metric_kind("ended_turn", [True, False]) == "rate"
    assert metric_kind("refusal", pd.Series([True, None, False], dtype=object)) == "rate"
    assert metric_kind("ended_turn", [0.5, 0.25]) == "unit"  # already averaged: a number in [0, 1]
    assert metric_kind("share_de", [1.0, 1.0, 0.0]) == "unit"  # a share stays a share, even when 0/1
    assert metric_kind("offensive", [0.1, 0.9]) == "unit"
    assert metric_kind("my_flag", [1, 0, 0]) == "rate"  # an unknown 0/1 column is a rate
    assert metric_kind("reply_tokens", [3, 40]) == "mean" and metric_kind("ppl_de", [65.0]) == "mean"
    with pytest.raises(ValueError):
        estimate([1, 0], "odd")


def _replies(rates: dict[float, tuple[int, int]], seeds: int = 1) -> pd.DataFrame:
    """A sweep-like table: per α, ``k`` of ``n`` prompts end their turn (the same under every seed)."""
    rows = []
    for alpha, (k, n) in rates.items():
        for i in range(n):
            for s in range(seeds):
                rows.append({"alpha": alpha, "prompt": f"p{i}", "seed": s, "ended_turn": i < k, "refusal": i >= k,
                             "share_de": 1.0 if i % 2 else 0.96, "reply_tokens": 10 + i, "ppl_de": 60.0 + alpha,
                             "flag": int(i < k)})
    return pd.DataFrame(rows)


def test_summarize_keeps_rates_inside_the_unit_interval():
    from chatvec_lab.behaviour.sweep import summarize

    df = _replies({0.0: (0, 8), 0.5: (1, 8), 1.0: (7, 8), 1.5: (8, 8)})
    s = summarize(df, ["ended_turn", "refusal", "share_de", "reply_tokens", "ppl_de", "flag"]).set_index("alpha")
    for m in ("ended_turn", "refusal", "share_de", "flag"):
        assert (s[f"{m}_lo"] >= 0).all() and (s[f"{m}_hi"] <= 1).all(), s[[m, f"{m}_lo", f"{m}_hi"]]
        assert (s[f"{m}_lo"] <= s[m]).all() and (s[m] <= s[f"{m}_hi"]).all()
    assert s.loc[1.0, "ended_turn_hi"] <= 1.0 and s.loc[1.0, "ended_turn_hi"] < 1.0  # 7/8
    assert s.loc[0.5, "ended_turn_lo"] >= 0.0 and s.loc[0.5, "ended_turn_lo"] > 0.0  # 1/8
    assert (s.loc[1.0, "ended_turn_lo"], s.loc[1.0, "ended_turn_hi"]) == pytest.approx(wilson_interval(7, 8, intervals.Z95))
    assert s.loc[0.0, "ended_turn_lo"] == 0.0 and s.loc[0.0, "ended_turn_hi"] > 0.2  # 0/8 has a width
    assert s.loc[1.5, "ended_turn_hi"] == 1.0 and s.loc[1.5, "ended_turn_lo"] < 0.8  # 8/8 too
    assert (s["flag_lo"] == s["ended_turn_lo"]).all()  # an unknown 0/1 column is treated as a rate
    assert s.loc[0.0, "share_de_hi"] <= 1.0 and s.loc[0.0, "share_de_lo"] < s.loc[0.0, "share_de"]
    assert s.loc[1.0, "ppl_de_lo"] == s.loc[1.0, "ppl_de_hi"] == 61.0
    assert list(s.reset_index().columns[:5]) == ["alpha", "n", "ended_turn", "ended_turn_lo", "ended_turn_hi"]


def test_summarize_counts_seeds_of_one_prompt_as_clustered():
    from chatvec_lab.behaviour.sweep import summarize

    one = summarize(_replies({1.0: (7, 8)}, seeds=1), ["ended_turn"]).iloc[0]
    three = summarize(_replies({1.0: (7, 8)}, seeds=3), ["ended_turn"]).iloc[0]
    naive = summarize(_replies({1.0: (7, 8)}, seeds=3), ["ended_turn"], cluster=None).iloc[0]
    # seeds that always agree add no information: the same interval as one seed, not a narrower one
    assert (three["ended_turn_lo"], three["ended_turn_hi"]) == pytest.approx((one["ended_turn_lo"], one["ended_turn_hi"]))
    assert naive["ended_turn_hi"] - naive["ended_turn_lo"] < three["ended_turn_hi"] - three["ended_turn_lo"]
    assert three["n"] == 24


def test_atlas_and_evaluate_tables_use_the_same_intervals():
    from chatvec_lab.behaviour.atlas import summarize_atlas
    from chatvec_lab.toy.evaluate import intervals as interval_lines, multi_turn_summary, summary

    df = _replies({1.0: (7, 8)}, seeds=2)
    atlas_rows = df.assign(cell="full", row="all", module="all", design="full", alpha_kind="grid", norm_share=1.0)
    a = summarize_atlas(atlas_rows).iloc[0]
    expected = rate_interval(df["ended_turn"], df["prompt"])
    assert (a["ended_turn"], a["ended_turn_lo"], a["ended_turn_hi"]) == pytest.approx(expected)
    assert 0 <= a["refusal_lo"] and a["ended_turn_hi"] <= 1

    ev = pd.concat([df.assign(prompt_set="chat"), df.assign(prompt_set="offensive", prompt=df["prompt"] + "x")])
    ev = ev.assign(model="CP + 1·CV", offensive=0.1, ppl_en=30.0)
    row = summary(ev).iloc[0]
    assert (row["ended_turn"], row["ended_turn_lo"], row["ended_turn_hi"]) == pytest.approx(expected)
    assert row["refusal_lo"] >= 0 and row["refusal_hi"] <= 1 and row["refusal"] == pytest.approx(1 / 8)
    assert row["share_de_hi"] <= 1
    assert "Wilson" in interval_lines(ev)

    mt = pd.DataFrame([{"model": "CP", "conversation": c, "seed": s, "turn": 1, "ended_turn": c < 7, "share_de": 1.0}
                       for c in range(8) for s in range(2)])
    m = multi_turn_summary(mt).iloc[0]
    assert (m["ended_turn_lo"], m["ended_turn_hi"]) == pytest.approx(wilson_interval(7, 8, intervals.Z95))
