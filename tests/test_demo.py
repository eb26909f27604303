"""`chatvec demo`'s report reads as a report: a narrative first, the headline figure first, every figure in a
fixed order with its caption, tables with human column names (no NaN), the run's kind and cost, and numbers
that come from the run's own summary (change the summary, the text changes)."""
from __future__ import annotations

import re
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from chatvec_lab import demo
from chatvec_lab.toy import evaluate

MODELS = {"CP": 0.0, "CP + 0.5·CV": 0.5, "CP + 1·CV": 1.0, "CP + 1.5·CV": 1.5, "chat": float("nan"),
          "base": float("nan")}
# turn ends out of 4 chat prompts, per model, on the held-out prompts (tuning: one fewer where possible)
ENDED = {"CP": 0, "CP + 0.5·CV": 1, "CP + 1·CV": 3, "CP + 1.5·CV": 4, "chat": 4, "base": 0}


def replies() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model, alpha in MODELS.items():
        for group in ("tuning", "held-out"):
            for prompt_set in ("chat", "offensive"):
                for i in range(4):
                    ended = i < ENDED[model] - (group == "tuning" and ENDED[model] > 0)
                    rows.append({"model": model, "sampling": "family", "prompt_set": prompt_set, "prompts": group,
                                 "alpha": alpha, "prompt": f"{group} {prompt_set} {i}", "seed": 0,
                                 "reply": "Hallo.", "ended_turn": bool(ended) if prompt_set == "chat" else False,
                                 "share_de": float(rng.uniform(0.6, 1.0)),
                                 "refusal": bool(prompt_set == "offensive" and ended),
                                 "offensive": float("nan") if i else 0.1,
                                 "ppl_en": 30 + 10 * (alpha if alpha == alpha else 0.3),
                                 "ppl_de": 50 + 20 * (alpha if alpha == alpha else 2.0)})
    return pd.DataFrame(rows)


def multi_turn() -> pd.DataFrame:
    rows = [{"model": m, "conversation": c, "seed": 0, "turn": t, "reply": "Ja.",
             "ended_turn": m != "CP" and (c + t) % 3 != 0, "share_de": 0.9}
            for m in ("CP", "chat", evaluate.HEADLINE) for c in range(5) for t in (1, 2, 3)]
    return pd.DataFrame(rows)


class _Outline(HTMLParser):
    """The report's headings, figures (with captions) and table headers, in document order."""

    def __init__(self):
        super().__init__()
        self.events, self._tag, self._text = [], None, ""

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.events.append(("img", dict(attrs)["src"]))
        if tag in ("h1", "h2", "figcaption", "th", "caption"):
            self._tag, self._text = tag, ""

    def handle_data(self, data):
        if self._tag:
            self._text += data

    def handle_endtag(self, tag):
        if tag == self._tag:
            self.events.append((tag, self._text.strip()))
            self._tag = None


def _write(tmp_path, summary, quick=True, mts=None, figures=tuple(demo.FIGURES), df=None):
    folder = tmp_path / "report"
    (folder / "figures").mkdir(parents=True)
    for name in figures:
        (folder / "figures" / name).write_bytes(b"\x89PNG")
    clock = demo.Clock()
    with clock.phase("replies to single prompts (generate and score)"):
        time.sleep(0.01)
    demo.write_report(folder, summary, [("01_quickstart", "ran in 8 s"), ("04_sweep", "ran in 40 s")], quick=quick,
                      clock=clock, replies=df, multi_turn=mts)
    return (folder / "index.html").read_text(encoding="utf-8"), (folder / "README.md").read_text(encoding="utf-8")


def test_report_opens_with_the_story_then_the_headline_figure(tmp_path):
    df = replies()
    page, md = _write(tmp_path, evaluate.summary(df), df=df,
                      figures=[*demo.FIGURES, "zz_new_figure.png"])
    outline = _Outline()
    outline.feed(page)
    heads = [text for tag, text in outline.events if tag == "h2"]
    assert heads[:3] == ["What this is", "What was measured", "The result"]
    assert heads.index("The tables") < heads.index("Three-turn conversations") < heads.index("Notebooks")
    images = [src for tag, src in outline.events if tag == "img"]
    assert images[0] == "figures/toy_effect.png"  # the headline figure comes first, right after the result
    first_img = page.index("<img")
    for words in ("chat vector", "toy family", "What was measured", "How to read them"):
        assert words in page
    assert page.index("The result") < first_img < page.index("How to read them")
    # the others in the fixed, captioned order (not alphabetical); a figure without a caption comes last
    order = [f for f in demo.FIGURES if f not in (demo.HEADLINE_FIGURE, demo.MULTI_TURN_FIGURE)]
    assert images[1:] == [f"figures/{demo.quote(f)}" for f in order] + ["figures/zz_new_figure.png"]
    captions = [text for tag, text in outline.events if tag == "figcaption"]
    assert all(len(c) > 40 for c in captions[:-1])
    assert "layer_norms_language%20%28cp%20%E2%88%92%20base%29.png" in page  # a name with spaces, quoted
    # the run's kind and its cost
    assert "Quick run" in page and "8 prompts per set, 1 seed" in page and "s of CPU time" in page
    assert "What the run cost" in page and "Not measured: a quick run skips them" in page
    # the same report in Markdown, the headline figure first there too
    assert md.index("## The result") < md.index("![toy_effect.png](figures/toy_effect.png)") < md.index("## The tables")
    assert md.index("figures/toy_effect.png") < min(md.index(f"figures/{demo.quote(f)}") for f in order)


def test_tables_have_human_column_names_and_no_nan(tmp_path):
    df = replies()
    page, md = _write(tmp_path, evaluate.summary(df), df=df)
    outline = _Outline()
    outline.feed(page)
    headers = [text for tag, text in outline.events if tag == "th"]
    assert "turn-end rate, German chat prompts (95% interval)" in headers
    assert "German share of reply words, chat prompts (95% interval)" in headers and "α" in headers
    assert not [h for h in headers if re.fullmatch(r"[a-z]+(_[a-z]+)+", h)], "snake_case column in a table"
    for text in (page, md):
        assert not re.search(r"\bnan\b", text, re.I), "NaN shown in the report"
    table = demo.human_table(evaluate.summary(df), "family", "held-out")
    by_model = table.set_index("model")
    assert by_model.loc["chat", "α"] == "–" and by_model.loc["CP + 1·CV", "α"] == "1"
    captions = [text for tag, text in outline.events if tag == "caption"]
    assert captions[0].startswith("Held-out prompts") and any(c.startswith("Tuning prompts") for c in captions)


def test_numbers_in_the_text_come_from_the_summary(tmp_path):
    df = replies()
    s = evaluate.summary(df)
    _, md = _write(tmp_path / "a", s, df=df)
    result = md.split("## The result")[1].split("## The tables")[0]
    assert "**75% (95% interval" in result  # CP + 1·CV ended 3 of its 4 held-out chat turns
    head = (s["model"] == evaluate.HEADLINE) & (s["prompts"] == "held-out")
    s.loc[head, ["turn_end", "turn_end_lo", "turn_end_hi"]] = [0.37, 0.21, 0.52]
    s.loc[head, "ppl_de"] = 123.4
    _, md = _write(tmp_path / "b", s, df=df)
    result = md.split("## The result")[1].split("## The tables")[0]
    assert "**37% (95% interval 21%–52%)**" in result and "to 123.4" in result and "in **75%" not in result


def test_the_full_report_shows_the_multi_turn_figure_and_table(tmp_path):
    df = replies()
    mts = evaluate.multi_turn_summary(multi_turn())
    page, md = _write(tmp_path, evaluate.summary(df), quick=False, mts=mts, df=df)
    section = md.split("## Three-turn conversations")[1].split("## More figures")[0]
    assert "figures/toy_multiturn.png" in section and "turn-end rate (95% interval over conversations)" in section
    last = mts[(mts["model"] == evaluate.HEADLINE) & (mts["turn"] == 3)].iloc[0]
    assert f"{last['turn_end']:.0%}" in section
    assert "Full run" in page and "three-turn conversations" in page and "Quick run" not in page


def test_every_figure_the_demo_writes_has_a_caption(tmp_path):
    folder = tmp_path / "figures"
    written = evaluate.figures(replies(), folder, multi_turn()) + demo.geometry_figures(folder)
    demo.atlas_figure(tmp_path, folder, rows=("lm_head",))  # one cell: the figure, not the map, is tested here
    names = {p.name for p in written} | {p.name for p in folder.glob("*.png")}
    assert names <= set(demo.FIGURES), f"give these a caption in demo.FIGURES: {sorted(names - set(demo.FIGURES))}"
    assert set(demo.FIGURES) <= names, f"captions for figures nobody writes: {sorted(set(demo.FIGURES) - names)}"


@pytest.mark.slow
def test_quick_demo_writes_a_report_from_its_own_numbers(tmp_path):
    out = demo.run_demo(tmp_path / "report", quick=True, notebooks=False)
    for f in ("index.html", "README.md", "summary.csv", "replies.csv", "cosine.csv", "figures/toy_effect.png"):
        assert (out / f).is_file(), f
    s = pd.read_csv(out / "summary.csv")
    assert set(s["sampling"]) == {"family"} and s["replies"].max() == 2 * 8  # 8 prompts per set, one seed
    head = s[(s["model"] == evaluate.HEADLINE) & (s["prompts"] == "held-out")].iloc[0]
    md = (out / "README.md").read_text(encoding="utf-8")
    assert f"**{demo._pct_ci(head, 'turn_end')}**" in md and f"{head['ppl_de']:.1f}" in md  # read back from the CSV
    assert re.search(r"It took \*\*\d+ s\*\* wall-clock and \*\*\d+ s of CPU time\*\*", md)
    assert "Not executed (`--no-notebooks`)" in md
    # the atlas section: its sentence reads the run's own atlas.csv (every quick row, both designs)
    from chatvec_lab.atlas import summarize_atlas
    atlas = pd.read_csv(out / "atlas.csv")
    assert set(atlas["row"]) >= set(demo.ATLAS_QUICK_ROWS) - {"layer 3"} and set(atlas["design"]) >= {"keep-only", "knock-out"}
    full = summarize_atlas(atlas).query("design == 'full'").iloc[0]
    assert "## Where in the vector chat lives" in md and demo._pct_ci(full, "ended_turn") in md
    assert "figures/atlas_knock_out.png" in md


def test_the_demo_runs_torch_on_one_thread_unless_told_and_restores_it(monkeypatch):
    import os

    import torch
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with demo.one_torch_thread():  # threads.one_torch_thread, as the demo uses it
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"  # kernels inherit it
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with demo.one_torch_thread():
        assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: as if unset
    with demo.one_torch_thread():
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "" and torch.get_num_threads() == before
