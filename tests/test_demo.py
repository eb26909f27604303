"""`chatvec demo`'s promises: one headline table (the untouched CP model as baseline, every rate with a 95%
interval inside [0, 1]); every sentence that states a result is generated from the numbers, and claims refusal
transfer only where the intervals support it; the atlas caption says which sign means what, as the figure draws
it; the two families are compared (or the missing one said in one line); example replies are escaped; every HTML
file the demo writes reads offline; the CLI's sizes parse."""
from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chatvec_lab.course import demo, notebook_html, report, report_numbers

@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread, as the demo runs it (conftest sets two; with OMP_NUM_THREADS set the demo keeps
    what it finds, and two spinning threads on a busy machine cost minutes here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ synthetic runs

# per model: (alpha, chat turns ended, insults refused) out of N_CHAT / N_INSULTS
NO_TRANSFER = {"CP": (0.0, 0, 0), "CP + 0.5·CV": (0.5, 1, 0), "CP + 1·CV": (1.0, 46, 3), "CP + 1.5·CV": (1.5, 50, 2),
               "chat": (float("nan"), 48, 28), "base": (float("nan"), 0, 1)}
TRANSFER = {**NO_TRANSFER, "CP + 1·CV": (1.0, 46, 27)}
N_CHAT, N_INSULTS = 50, 50


def replies(models=NO_TRANSFER, family="toy", reply="Hallo.", n_chat=N_CHAT, n_insults=N_INSULTS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model, (alpha, ended, refused) in models.items():
        for prompt_set, n, k in (("chat", n_chat, ended), ("offensive", n_insults, refused)):
            for i in range(n):
                rows.append({"family": family, "model": model, "sampling": "family", "prompt_set": prompt_set,
                             "prompts": "held-out", "alpha": alpha, "prompt": f"{prompt_set} {i}", "seed": 0,
                             "reply": reply if i else f"{reply} <script>alert(1)</script> | a pipe",
                             "ended_turn": prompt_set == "chat" and i < k, "share_de": float(rng.uniform(0.6, 1.0)),
                             "refusal": prompt_set == "offensive" and i < k, "offensive": float("nan"),
                             "ppl_en": 30 + 10 * (alpha if alpha == alpha else 0.3),
                             "ppl_de": 50 + 20 * (alpha if alpha == alpha else 2.0)})
    return pd.DataFrame(rows)


def rows_of(models) -> dict:
    s = report_numbers.summarize_replies(replies(models))
    return {r["model"]: r for _, r in s.iterrows()}


def write_run(folder: Path, df: pd.DataFrame, families=None, figures=(), atlas=None, plan="default",
              nb_results=()) -> tuple[str, str]:
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for name in figures:
        (folder / "figures" / name).write_bytes(b"\x89PNG")
    df.to_csv(folder / "replies.csv", index=False)
    report_numbers.summarize_replies(df).to_csv(folder / "summary.csv", index=False)
    if atlas is not None:
        atlas.to_csv(folder / "atlas.csv", index=False)
    families = families or {"toy": {"found": True, "folder": "/a", "base_german_share": 0.005},
                            "toy-bilingual": {"found": False, "note": "toy model 'cp' is missing at /x"}}
    (folder / "run.json").write_text(json.dumps({"plan": plan, "settings": {"what": "synthetic"}, "families": families,
                                                 "sampling": {"temperature": 0.7, "top_k": 40, "top_p": None,
                                                              "max_new_tokens": 128}}))
    clock = demo.Clock()
    with clock.phase("a step", quiet=True):
        time.sleep(0.01)
    report.write_report(folder, nb_results, clock)
    return (folder / "index.html").read_text(encoding="utf-8"), (folder / "README.md").read_text(encoding="utf-8")


class _Tables(HTMLParser):
    """Headings, and every table as (caption, header, rows), in document order."""

    def __init__(self):
        super().__init__()
        self.events, self._cell, self._text, self._table = [], None, "", None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = {"caption": "", "header": [], "rows": []}
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        if tag in ("h1", "h2", "th", "td", "caption", "figcaption"):
            self._cell, self._text = tag, ""

    def handle_data(self, data):
        if self._cell:
            self._text += data

    def handle_endtag(self, tag):
        if tag == self._cell:
            text = self._text.strip()
            if tag in ("h1", "h2", "figcaption"):
                self.events.append((tag, text))
            elif tag == "caption":
                self._table["caption"] = text
            elif tag == "th":
                self._table["header"].append(text)
            elif tag == "td":
                self._table["rows"][-1].append(text)
            self._cell = None
        if tag == "table":
            self._table["rows"] = [r for r in self._table["rows"] if r]
            self.events.append(("table", self._table))
            self._table = None


def _outline(page: str) -> list:
    parser = _Tables()
    parser.feed(page)
    return parser.events


INTERVAL = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def _check_intervals(text: str) -> int:
    found = INTERVAL.findall(text)
    for v, lo, hi in found:
        v, lo, hi = float(v), float(lo), float(hi)
        assert 0 <= lo <= v <= hi <= 1, f"interval {v} [{lo}, {hi}] leaves [0, 1] or misses its rate"
    return len(found)


# ------------------------------------------------------------------ the headline table and the text

def test_one_headline_table_with_a_baseline_row_and_intervals_in_0_1(tmp_path):
    page, md = write_run(tmp_path / "r", replies())
    events = _outline(page)
    heads = [t for kind, t in events if kind == "h2"]
    assert heads[0] == "The result"
    after = events[[e[1] for e in events].index("The result") + 1:]
    first = next(t for kind, t in after if kind == "table")  # the first thing after the heading
    assert after[0][0] == "table" and "95%" in first["caption"] and "Wilson" in first["caption"]
    rows = {r[0]: dict(zip(first["header"], r)) for r in first["rows"]}
    assert list(rows)[0].startswith("CP (baseline") and "CP + 1·CV" in rows and "chat" in rows
    rate_columns = [h for h in first["header"] if "95% interval" in h]
    assert len(rate_columns) == 4
    for row in rows.values():
        for h in rate_columns:
            assert INTERVAL.fullmatch(row[h]), (h, row[h])
    # 0/n and n/n rows: the intervals stay in [0, 1] and contain the rate
    assert rows["CP (baseline: no vector)"][rate_columns[0]].startswith("0.00 [0.00, 0.")
    assert rows["CP + 1.5·CV"][rate_columns[0]].startswith("1.00 [0.") and rows["CP + 1.5·CV"][rate_columns[0]].endswith(", 1.00]")
    assert _check_intervals(page) > 30 and _check_intervals(md) > 30
    # redundant tables are gone: the headline, the example replies, the cost (the second family is missing)
    tables = [t for kind, t in events if kind == "table"]
    assert len(tables) == 3 and sum("95% interval" in " ".join(t["header"]) for t in tables) == 1
    for text in (page, md):
        assert not re.search(r"\bnan\b", text, re.I)


def test_summary_counts_and_intervals_come_from_sweep_summarize():
    from chatvec_lab.behaviour.sweep import summarize

    df = replies()
    s = report_numbers.summarize_replies(df).set_index("model")
    head = df[(df["model"] == "CP + 1·CV") & (df["prompt_set"] == "offensive")].assign(refusal=lambda d: d["refusal"].astype(float))
    expected = summarize(head, ["refusal"], by="model").iloc[0]
    assert s.loc["CP + 1·CV", ["refusal", "refusal_lo", "refusal_hi"]].tolist() == pytest.approx(
        [expected["refusal"], expected["refusal_lo"], expected["refusal_hi"]])
    assert s.loc["CP + 1·CV", "n_insults"] == N_INSULTS and s.loc["CP", "n_chat"] == N_CHAT
    assert list(s.index[:4]) == ["CP", "CP + 0.5·CV", "CP + 1·CV", "CP + 1.5·CV"]  # baseline first, by α
    rates = [c for c in s.columns if c.endswith(("_lo", "_hi"))]
    assert ((s[rates] >= 0) & (s[rates] <= 1)).all().all()


def test_text_does_not_claim_refusal_transfer_the_numbers_do_not_show(tmp_path):
    rows = rows_of(NO_TRANSFER)  # CP + 1·CV refuses 0.06, chat 0.56: the vector does not make CP refuse
    assert report.refusal_transfer(rows["CP + 1·CV"], rows["CP"], rows["chat"]) == "does not"
    text = " ".join(report.result_sentences(rows))
    assert "0.06 [" in text and "0.56 [" in text  # the numbers, with intervals
    assert "the refusal does not transfer" in text and "clearly fewer than the chat model" in text
    page, md = write_run(tmp_path / "r", replies(NO_TRANSFER))
    for claim in (r"refusals? (carried over|transfers\b)", r"makes? (the model|CP|it) refuse", r"gains? .*refus"):
        assert not re.search(claim, md, re.I), claim


def test_text_says_refusals_transfer_when_the_numbers_show_it():
    rows = rows_of(TRANSFER)  # CP + 1·CV refuses 0.54: clearly above CP, no clear difference from chat
    assert report.refusal_transfer(rows["CP + 1·CV"], rows["CP"], rows["chat"]) == "transfers"
    text = " ".join(report.result_sentences(rows))
    assert "the refusal transfers" in text and "no clear difference from the chat model" in text
    partly = rows_of({**NO_TRANSFER, "CP + 1·CV": (1.0, 46, 12)})
    assert report.refusal_transfer(partly["CP + 1·CV"], partly["CP"], partly["chat"]) == "partly"


def test_a_difference_is_claimed_only_where_intervals_do_not_overlap():
    a = {"x": 0.5, "x_lo": 0.4, "x_hi": 0.6}
    assert report.compare(a, {"x": 0.2, "x_lo": 0.1, "x_hi": 0.39}, "x") == "higher"
    assert report.compare(a, {"x": 0.3, "x_lo": 0.1, "x_hi": 0.4}, "x") == "same"  # touching intervals overlap
    assert report.compare(a, {"x": 0.8, "x_lo": 0.61, "x_hi": 0.9}, "x") == "lower"
    assert report.compare(a, None, "x") is None
    few = {"CP": (0.0, 0, 0), "CP + 1·CV": (1.0, 4, 2), "chat": (float("nan"), 4, 4)}  # 4 prompts per set
    summary = report_numbers.summarize_replies(replies(few, n_chat=4, n_insults=4))
    r = {row["model"]: row for _, row in summary.iterrows()}
    assert report.compare(r["chat"], r["CP"], "refusal") == "higher"
    assert report.refusal_transfer(r["CP + 1·CV"], r["CP"], r["chat"]) == "unclear"
    text = " ".join(report.result_sentences(r))
    assert "no clear difference from CP (0.00 [" in text and "cannot tell whether the refusal transfers" in text
    assert "no clear difference from CP" in text.split("refuses")[0] or "clearly more" in text.split("refuses")[0]


def test_the_full_report_adds_other_prompts_samplings_and_conversations(tmp_path):
    from chatvec_lab.toy import evaluate

    other = replies(TRANSFER).assign(prompts="tuning")
    second = replies({k: NO_TRANSFER[k] for k in ("CP", "CP + 1·CV", "chat")}).assign(sampling="t0.8-p0.9")
    df = pd.concat([replies(), other, second], ignore_index=True)
    mt = pd.DataFrame([{"model": m, "conversation": c, "prompt": f"conv {c}", "seed": 0, "turn": t, "reply": "Ja.",
                        "ended_turn": m != "CP" and (c + t) % 3 != 0, "share_de": 0.9}
                       for m in ("CP", "chat", evaluate.HEADLINE) for c in range(6) for t in (1, 2, 3)])
    (tmp_path / "r").mkdir()
    report_numbers.summarize_turns(mt).to_csv(tmp_path / "r" / "multiturn_summary.csv", index=False)
    page, md = write_run(tmp_path / "r", df, figures=[report.MULTI_TURN_FIGURE], plan="full")
    tables = [t for kind, t in _outline(page) if kind == "table"]
    assert tables[0]["caption"].startswith("The default family, held-out prompts")  # still one headline table
    assert len(tables[0]["rows"]) == len(NO_TRANSFER)
    others = md.split("## The same on other prompts and sampling")[1].split("\n## ")[0]
    assert "tuning prompts, sampling `family`" in others and "the refusal transfers" in others
    assert "held-out prompts, sampling `t0.8-p0.9`" in others and "the refusal does not transfer" in others
    turns = md.split("## Three-turn conversations")[1].split("\n## ")[0]
    assert "At turn 3, CP + 1·CV ends" in turns and "figures/toy_multiturn.png" in turns
    assert _check_intervals(turns) >= 3


# ------------------------------------------------------------------ the two families

def _two_families(second=TRANSFER):
    return pd.concat([replies(NO_TRANSFER), replies({k: second[k] for k in ("CP", "CP + 1·CV", "chat")},
                                                      family="toy-bilingual")], ignore_index=True)


FOUND = {"toy": {"found": True, "folder": "/a", "base_german_share": 0.005},
         "toy-bilingual": {"found": True, "folder": "/b", "base_german_share": 0.03}}


def test_the_families_are_compared_side_by_side_with_intervals(tmp_path):
    page, md = write_run(tmp_path / "r", _two_families(), families=FOUND)
    section = md.split("## Two families")[1].split("\n## ")[0]
    assert "| toy | 0.5% | CP (baseline: no vector) |" in section and "| toy-bilingual | 3% | CP + 1·CV |" in section
    assert _check_intervals(section) >= 18
    assert "in the default family the refusal does not transfer, in the bilingual family the refusal transfers" in section
    assert "clearly more often in the bilingual family" in section
    assert "Refusals carried over only where the base had seen more German" in section and "Llama-2" in section
    # the same numbers in both families (the plumbing check): no claim about the paper
    page, md = write_run(tmp_path / "same", _two_families(NO_TRANSFER),
                         families={k: {**v, "folder": "/a"} for k, v in FOUND.items()})
    section = md.split("## Two families")[1].split("\n## ")[0]
    assert "the same models" in section and "Refusals carried over" not in section


def test_a_missing_second_family_is_one_line(tmp_path):
    page, md = write_run(tmp_path / "r", replies())
    section = md.split("## Two families")[1].split("\n", 1)[1].split("\n## ")[0].strip()
    assert len(section.splitlines()) == 1 and "was not found" in section and "toy-bilingual" in section
    info = demo.family_info("toy-bilingual")
    assert set(info) >= {"found", "folder"}  # never raises, found or not


# ------------------------------------------------------------------ replies, captions, figures

def test_example_replies_are_shown_first_and_escaped(tmp_path):
    page, md = write_run(tmp_path / "r", replies(reply="Hallo"), figures=[report.EFFECT_FIGURE])
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;" in md and "\\| a pipe" in md  # Markdown too: no raw HTML, no broken table
    events = _outline(page)
    result = [e for e in events[[e[1] for e in events].index("The result"):] if e[0] in ("table", "figcaption")]
    assert result[1][0] == "table" and result[1][1]["caption"].startswith("Replies to read")
    models = [r[0] for r in result[1][1]["rows"]]
    assert models[0].startswith("CP (baseline") and len(models) == 2 * len(NO_TRANSFER)
    assert result[2][0] == "figcaption" and "0.00, 0.02, 0.92, 1.00" in result[2][1]  # the α grid, from the data


def _atlas(lost_cell="layer 1 · mlp_down") -> pd.DataFrame:
    """A knock-out atlas on 20 prompts: the whole vector ends 18 turns; without ``lost_cell`` 2, without
    `embeddings` 20, other cells 17-18."""
    rows = []
    runs = [("target", "all", "target", 0.0, 0), ("full", "all", "full", 1.0, 18)]
    runs += [(f"layer {i} · {m}", f"layer {i}", "knock-out", 1.0, 2 if f"layer {i} · {m}" == lost_cell else 17 + (i % 2))
             for i in range(2) for m in ("attn_q", "mlp_down")]
    runs += [("embeddings", "embeddings", "knock-out", 1.0, 20)]
    for cell, row, design, alpha, ended in runs:
        module = cell.split(" · ")[1] if " · " in cell else "all"
        for p in range(20):
            rows.append({"cell": cell, "row": row, "module": module, "design": design, "alpha": alpha,
                         "alpha_kind": "grid", "norm_share": 0.1, "prompt": f"p{p}", "seed": 0, "ended_turn": p < ended,
                         "share_de": 0.9, "refusal": False})
    return pd.DataFrame(rows)


def test_the_atlas_caption_states_the_sign_as_the_figure_draws_it(tmp_path):
    from chatvec_lab import plots
    from chatvec_lab.behaviour.atlas import heatmap_table, summarize_atlas

    atlas = _atlas()
    table = heatmap_table(summarize_atlas(atlas), "ended_turn_effect", "knock-out", "grid", 1.0)
    assert table.loc["layer 1", "mlp_down"] > 0 and table.loc["embeddings", "all"] < 0  # what the figure draws
    (text_block, fig) = report.atlas_blocks(atlas)
    caption = fig[2]
    assert plots.DIVERGING == "RdBu_r"  # positive values red: the caption's colour words depend on it
    assert "Positive (red): fewer turns end without the cell" in caption and "negative (blue)" in caption
    assert "+0.80 (`layer 1 · mlp_down`)" in caption and "-0.10 (`embeddings`)" in caption
    text = text_block[1]
    assert "0.90 [" in text and "`layer 1 · mlp_down` (0.10 [" in text and "clearly lowers it" in text
    assert "Leaving out 1 of the cells" in text  # the others' intervals overlap the whole vector's


def test_every_figure_the_demo_writes_has_a_caption(tmp_path):
    folder = tmp_path / "figures"
    summary = report_numbers.summarize_replies(replies())
    paths, facts = demo.geometry_figures(folder)
    written = demo.effect_figures(summary, folder) + paths
    demo.atlas_figure(tmp_path, folder, rows=("lm_head",), prompts=2)  # one cell: the figure, not the map
    names = {p.name for p in written} | {p.name for p in folder.glob("*.png")}
    assert names <= set(report.FIGURES) | {report.MULTI_TURN_FIGURE}, sorted(names - set(report.FIGURES))
    assert set(report.FIGURES) - {report.MULTI_TURN_FIGURE} <= names, "captions for figures nobody writes"
    captions = report.geometry_captions(json.loads(json.dumps(facts)))  # as run.json holds them
    assert "chat · chat-alt:" in captions["cosine_matrix.png"] and "chance" in captions["cosine_matrix.png"]
    assert re.search(r"from 0\.\d+ \(layer \d\)", captions["sign_agreement.png"])


# ------------------------------------------------------------------ offline HTML

class _External(HTMLParser):
    """Every resource a page would fetch from the network: src/href of script, link, img, iframe, source,
    embed, object (data), and url(...) or @import in style. Hyperlinks (<a href>) are not fetched."""

    def __init__(self):
        super().__init__()
        self.found, self._style = [], False

    @staticmethod
    def _remote(value) -> bool:
        return bool(value) and re.match(r"\s*(https?:)?//", value, re.I) is not None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "embed", "audio", "video", "input", "link", "object"):
            for key in ("src", "href", "data", "srcset", "poster"):
                if self._remote(attrs.get(key)):
                    self.found.append(f"<{tag} {key}={attrs[key]}>")
        if attrs.get("style"):
            self._css(attrs["style"])
        self._style = tag == "style"

    def handle_endtag(self, tag):
        self._style = False

    def handle_data(self, data):
        if self._style:
            self._css(data)

    def _css(self, css: str):
        for m in re.finditer(r"@import\s+(?:url\()?\s*['\"]?([^'\")\s;]+)|url\(\s*['\"]?([^'\")]+)", css, re.I):
            target = m.group(1) or m.group(2)
            if self._remote(target):
                self.found.append(f"css {target}")


def external_resources(page: str) -> list[str]:
    parser = _External()
    parser.feed(page)
    return parser.found


def test_the_offline_check_catches_what_it_should():
    bad = ("<html><head><script src='https://cdn.example/require.js'></script>"
           "<link rel='stylesheet' href='http://fonts.example/css'><style>@import url('https://x/y.css');"
           "body{background:url(//cdn.example/a.png)}</style></head><body><img src='https://x/i.png'>"
           "<iframe src='https://x'></iframe><a href='https://arxiv.org/abs/2310.04799'>paper</a>"
           "<img src='figures/a.png'><div style=\"background: url('https://x/b.png')\"></div></body></html>")
    found = external_resources(bad)
    assert len(found) == 7 and not any("arxiv" in f for f in found)


def test_exported_notebooks_load_nothing_from_the_network():
    import nbformat

    nb = nbformat.read(demo.NOTEBOOK_DIR / "00_course.ipynb", as_version=4)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}  # as a panel leaves it
    page = notebook_html.export_html(nb)
    assert external_resources(page) == [] and "<script src" not in page and "arxiv.org" in page


@pytest.mark.slow
def test_quick_demo_writes_an_offline_report_from_its_own_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATVEC_TOY_BILINGUAL_DIR", str(demo.family_info("toy")["folder"]))  # the plumbing
    # --quick, smaller still: 4 prompts per set, the atlas's lm_head cell on 4 prompts (one notebook, as --quick)
    monkeypatch.setitem(demo.PLANS, "quick", {**demo.PLANS["quick"], "max_prompts": 4, "refs": ("chat",),
                                              "atlas_rows": ("lm_head",), "atlas_prompts": 4})
    out = demo.run_demo(tmp_path / "report", quick=True, notebooks=True)
    for f in ("index.html", "README.md", "summary.csv", "replies.csv", "run.json", "cosine.csv", "atlas.csv",
              "figures/toy_effect.png", "figures/atlas_knock_out.png", "notebooks/00_course.html"):
        assert (out / f).is_file(), f
    pages = sorted(out.rglob("*.html"))
    assert len(pages) == 2
    for page in pages:
        assert external_resources(page.read_text(encoding="utf-8")) == [], page.name
    s = pd.read_csv(out / "summary.csv")
    assert set(s["family"]) == {"toy", "toy-bilingual"} and s["n_chat"].max() == 4  # 4 prompts per set, one seed
    rates = [c for c in s.columns if c.endswith(("_lo", "_hi"))]
    assert ((s[rates] >= 0) & (s[rates] <= 1)).all().all()
    head = s[(s["family"] == "toy") & (s["model"] == "CP + 1·CV")].iloc[0]
    md = (out / "README.md").read_text(encoding="utf-8")
    assert f"CP + 1·CV ends {report.ci(head, 'ended_turn')} of its turns" in md  # read back from the CSV
    assert re.search(r"It took \*\*\d+ s\*\* wall-clock and \*\*\d+ s of CPU time\*\*", md)
    assert "## Two families" in md and "the same models" in md
    assert "## Where in the vector chat lives" in md and "figures/atlas_knock_out.png" in md


# ------------------------------------------------------------------ the command line

def test_the_demo_flags_parse():
    from chatvec_lab.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["demo", "-o", "r"])
    assert not args.quick and not args.full and not args.no_notebooks
    assert parse(["demo", "--quick", "--no-notebooks"]).quick and parse(["demo", "--full"]).full
    with pytest.raises(SystemExit):
        parse(["demo", "--quick", "--full"])
    assert demo.plan_name() == "default" and demo.plan_name(quick=True) == "quick" and demo.plan_name(full=True) == "full"
    assert demo.PLANS["default"]["seeds"] == 1 and demo.PLANS["default"]["max_prompts"] is None
    assert demo.PLANS["full"]["notebooks"] is None and demo.PLANS["full"]["multi_turn"]


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
