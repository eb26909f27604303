"""The coefficient panel, driven from pytest: callbacks update the table and the plot."""
from __future__ import annotations

import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.course.widgets import CoefficientPanel

PROMPTS = {"German chat": ["Erzähl mir etwas über die Liebe.", "Was weißt du über Geld?"],
           "German insults": ["Du bist ein Idiot."]}


@pytest.fixture(scope="module")
def panel():
    model, tok = toy.load("cp")
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).materialize()
    alt = ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False).materialize()
    df = sweep(model, {"chat": cv, "chat-alt": alt}, [{"chat": a} for a in (0, 0.5, 1.0)], PROMPTS["German chat"],
               tokenizer=tok, max_new_tokens=12, progress=False)
    return CoefficientPanel(model, tok, {"chat": cv, "chat-alt": alt}, PROMPTS, sweep_df=df, max_new_tokens=12)


def test_slider_updates_table_and_plot(panel):
    assert set(panel.sliders) == {"chat", "chat-alt"}
    plot_before = panel.plot.value
    panel.sliders["chat"].value = 1.0  # the observer runs synchronously outside a kernel
    assert "Erzähl mir etwas" in panel.table.value and "<table" in panel.table.value
    assert panel.plot.value != plot_before
    assert panel.last is not None and len(panel.last) == 2
    assert {"reply", "ended_turn", "share_de", "refusal", "offensive"} <= set(panel.last.columns)
    assert "α chat = 1" in panel.message.value
    table_at_1 = panel.table.value
    panel.sliders["chat-alt"].value = 0.5
    assert panel.live.alphas == {"chat": 1.0, "chat-alt": 0.5}
    panel.prompt_set.value = "German insults"
    panel.button.click()
    assert "Du bist ein Idiot" in panel.table.value and panel.table.value != table_at_1


def test_errors_show_in_the_panel_and_leave_the_model(panel):
    before = {k: v.clone() for k, v in panel.live.model.state_dict().items()}
    panel.prompt_set.value = "(typed below)"
    panel.prompt_box.value = "   "
    panel.button.click()
    assert "error" in panel.message.value and "no prompt" in panel.message.value
    with pytest.raises(ValueError, match="not a number"):
        panel.run({"chat": "much"})
    after = panel.live.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    panel.prompt_box.value = "Sag etwas über Katzen."
    panel.button.click()
    assert "Katzen" in panel.table.value


def test_plot_follows_the_chosen_vector(panel):
    panel.plot_vector.value = "chat-alt"
    png = panel.plot_png()
    assert png[:4] == b"\x89PNG"


def test_prompt_set_dropdown_updates_table_and_plot(panel):
    panel.plot_vector.value = "chat"
    panel.prompt_set.value = "German chat"
    panel.update()
    table, plot = panel.table.value, panel.plot.value
    assert "Erzähl mir etwas" in table and "Du bist ein Idiot" not in table
    panel.prompt_set.value = "German insults"  # the dropdown alone regenerates (auto_run)
    assert "Du bist ein Idiot" in panel.table.value and "Erzähl mir etwas" not in panel.table.value
    assert len(panel.last) == 1 and panel.last_alphas == panel.alphas()
    assert panel.plot.value != plot  # the plot marks the replies in the table, at their α
    panel.prompt_box.value = ""
    panel.prompt_set.value = "(typed below)"
    assert "type one prompt a line" in panel.message.value  # a hint, not an error, and the table stays
    assert "Du bist ein Idiot" in panel.table.value


def test_display_carries_a_static_snapshot(panel):
    import base64

    bundle = panel.widget._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    snapshot = bundle["text/html"]
    assert "chatvec-panel-snapshot" in snapshot and panel.table.value in snapshot
    assert base64.b64encode(panel.plot.value).decode() in snapshot
    assert "α chat = " in snapshot and "α chat-alt = " in snapshot
    assert panel._repr_mimebundle_()["text/html"] == snapshot  # displaying the panel itself works too


PANEL_CELL = """
from chatvec_lab import ChatVector, toy
from chatvec_lab.course.widgets import CoefficientPanel
model, tok = toy.load("cp")
cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).materialize()
panel = CoefficientPanel(model, tok, {"chat": cv}, {"Liebe": ["Erzähl mir etwas über die Liebe."]},
                         max_new_tokens=8)
panel.sliders["chat"].value = 1.0
panel.widget
"""


@pytest.mark.slow
def test_exported_notebook_shows_the_panel_snapshot(tmp_path):
    """Executed headless and exported to HTML (as `chatvec demo` does), a notebook that displays a panel
    shows its snapshot: the coefficients, the plot and the replies, not an empty widget area."""
    import copy

    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    from chatvec_lab.course import notebook_html

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PANEL_CELL)]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    (out,) = [o for o in nb.cells[0].outputs if o.output_type == "execute_result"]
    assert {"application/vnd.jupyter.widget-view+json", "text/html"} <= set(out["data"])

    plain, _ = HTMLExporter().from_notebook_node(copy.deepcopy(nb))  # nbconvert as is: a widget placeholder
    assert "chatvec-panel-snapshot" not in plain.split("application/vnd.jupyter.widget-state+json")[0]

    page = notebook_html.export_html(nb)
    assert page.count("chatvec-panel-snapshot") == 1
    snapshot = page[page.index("chatvec-panel-snapshot"):]
    assert "α chat = 1.00" in snapshot and "data:image/png;base64," in snapshot
    assert "Erzähl mir etwas über die Liebe." in snapshot and "<table" in snapshot
