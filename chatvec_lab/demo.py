"""``chatvec demo -o DIR``: the whole lab, headless, on the toy family → a report folder.

DIR/
  index.html, README.md     what is where, and the summary table
  summary.csv               the demonstration: CP + α·CV against CP, chat and base (one row per model)
  replies.csv               every reply with its scores
  figures/*.png             the effect, perplexity, vector geometry
  notebooks/*.html          every notebook, executed
"""
from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import pandas as pd

from chatvec_lab.output import atomic_folder
from chatvec_lab.resources import notebook_dir
from chatvec_lab.toy.evaluate import markdown as evaluate_markdown

NOTEBOOK_DIR = notebook_dir()  # the checkout's notebooks/, or the installed package's copy


def geometry_figures(folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from chatvec_lab import geometry, plots, toy
    from chatvec_lab.vector import ChatVector

    base = toy.path("base")
    vectors = {"chat": ChatVector.from_models(base, toy.path("chat"), hash_files=False),
               "chat-alt": ChatVector.from_models(base, toy.path("chat-alt"), hash_files=False),
               "language (cp − base)": ChatVector.from_models(base, toy.path("cp"), hash_files=False)}
    stats = geometry.vector_stats(vectors, base=base)
    paths = geometry.save_compare_plots(stats, folder)
    fig = plots.plot_relative_norms_heatmap(stats, "chat")
    fig.savefig(folder / "relative_norms_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plots.plot_spectra(geometry.spectra(vectors["chat"]).sort_values("stable_rank").head(8))
    fig.savefig(folder / "spectra_chat.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    geometry.cosine_matrix(stats).to_csv(folder.parent / "cosine.csv")
    return paths + [folder / "relative_norms_chat.png", folder / "spectra_chat.png"]


def execute_notebooks(folder: Path, workdir: Path) -> list[tuple[str, str]]:
    """Run every notebook (in ``workdir``), export HTML; returns ``(name, status)``."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

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
        body, _ = HTMLExporter().from_notebook_node(nb)
        (folder / f"{path.stem}.html").write_text(body, encoding="utf-8")
        results.append((path.stem, status))
        print(f"  {path.name}: {status}", flush=True)
    return results


def run_demo(out="chatvec-report", overwrite: bool = False, notebooks: bool = True, quick: bool = False) -> Path:
    from chatvec_lab.toy import evaluate

    out = Path(out)
    from chatvec_lab import resources, toy

    with atomic_folder(out, overwrite, inputs=[toy.data_dir(), *resources.inputs()]) as tmp:
        figures = tmp / "figures"
        print("measuring the chat-vector effect on the toy family ...", flush=True)
        df = evaluate.run(seeds=1 if quick else 3, progress=False, max_prompts=8 if quick else None,
                          samplings=("family",) if quick else tuple(evaluate.SAMPLINGS))
        df.to_csv(tmp / "replies.csv", index=False)
        summary = evaluate.summary(df)
        summary.to_csv(tmp / "summary.csv", index=False)
        evaluate.figures(df, figures)
        print("vector geometry ...", flush=True)
        geometry_figures(figures)
        nb_results = []
        if notebooks:
            print("executing the notebooks ...", flush=True)
            work = tmp / ".work"
            work.mkdir()
            nb_results = execute_notebooks(tmp / "notebooks", work)
            shutil.rmtree(work, ignore_errors=True)
        write_index(tmp, summary, nb_results, quick)
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(summary.to_string(index=False))
    failed = [n for n, s in nb_results if s.startswith("FAILED")]
    if failed:
        print(f"warning: notebooks failed: {', '.join(failed)} (see their HTML)")
    return out.resolve()


def write_index(folder: Path, summary: pd.DataFrame, nb_results, quick: bool) -> None:
    figures = sorted(p.name for p in (folder / "figures").glob("*.png"))
    md = ["# chatvec_lab report: the toy family", "",
          f"{'Quick run (8 prompts per set, 1 seed).' if quick else 'Full run (all prompts, 3 seeds).'} "
          "Rebuild with `chatvec demo -o DIR`.", "", evaluate_markdown(summary), "", "## Figures", *[f"- figures/{f}" for f in figures], "",
          "## Notebooks", *[f"- notebooks/{n}.html: {s}" for n, s in nb_results]]
    (folder / "README.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    parts = ["<html><head><meta charset='utf-8'><title>chatvec_lab report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:48%;margin:4px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>",
             "<h1>chatvec_lab report: the toy family</h1>", summary.to_html(index=False, float_format="%.3f"),
             "<h2>Figures</h2>", *[f"<img src='figures/{html.escape(f)}' alt='{html.escape(f)}'>" for f in figures],
             "<h2>Notebooks</h2><ul>",
             *[f"<li><a href='notebooks/{html.escape(n)}.html'>{html.escape(n)}</a>: {html.escape(s)}</li>"
               for n, s in nb_results], "</ul></body></html>"]
    (folder / "index.html").write_text("\n".join(parts), encoding="utf-8")
