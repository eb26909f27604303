"""The teaching notebooks, executed headless and exported to HTML that reads offline (as ``chatvec demo`` does).

The exported page has its CSS inline and no script: a widget view needs a kernel, or JavaScript fetched from a CDN,
so each widget output that carries a static snapshot (the coefficient panel's) shows the snapshot instead.
"""
from __future__ import annotations

import time
from pathlib import Path

from chatvec_lab.io.resources import notebook_dir

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STATIC = ("text/html", "image/png", "image/svg+xml")
# nbconvert's lab template without what it fetches from CDNs: require.js, MathJax (no notebook has LaTeX),
# mermaid and the widget manager. Its CSS is inline already; widgets keep their static snapshots.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def static_widgets(nb) -> int:
    """Outputs that carry a static picture beside a widget view (the coefficient panel's snapshot) keep only
    the picture, so the exported HTML shows it: a widget view needs a kernel, or JavaScript fetched from a
    CDN, and is otherwise an empty box. Returns how many outputs changed."""
    changed = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and any(k in data for k in STATIC):
                del data[WIDGET_VIEW]
                changed += 1
    nb.metadata.pop("widgets", None)  # the widget state is only read by the widget manager, which is left out
    return changed


def export_html(nb) -> str:
    """The notebook as a standalone HTML page that reads offline: inline CSS, no script, widgets as their static
    snapshots."""
    import jinja2
    from nbconvert import HTMLExporter

    static_widgets(nb)
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body


def execute_notebooks(folder: Path, workdir: Path, names=None, source=None) -> list[tuple[str, str]]:
    """Run the notebooks (``names``: their stems, None for all) of ``source`` (default: the package's,
    ``io.resources.notebook_dir()``) in ``workdir`` and export HTML into ``folder``; returns ``(name, status)``."""
    import nbformat
    from nbclient import NotebookClient

    source = notebook_dir() if source is None else Path(source)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted(source.glob("*.ipynb")):
        if names is not None and path.stem not in names:
            continue
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(workdir)}}).execute()
            status = f"ran in {time.time() - start:.0f} s"
        except Exception as e:  # keep the partial notebook: its HTML shows the failing cell
            status = f"FAILED: {str(e).strip().splitlines()[-1][:200]}"
        (folder / f"{path.stem}.html").write_text(export_html(nb), encoding="utf-8")
        results.append((path.stem, status))
        print(f"  {path.name}: {status}", flush=True)
    return results
