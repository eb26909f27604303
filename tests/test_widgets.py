"""The coefficient panel, driven from pytest: callbacks update the table and the plot."""
from __future__ import annotations

import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.sweep import sweep
from chatvec_lab.widgets import CoefficientPanel

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
    assert panel.live.coefficients == {"chat": 1.0, "chat-alt": 0.5}
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
