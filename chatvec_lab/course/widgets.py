"""An interactive panel: a slider per chat vector, prompts, replies with their scores, and the sweep plot.

    panel = CoefficientPanel(model, tokenizer, {"chat": cv, "chat-alt": cv_alt}, prompt_sets, sweep_df=df)
    panel.widget   # display it in a notebook
    CoefficientPanel("path/or/hub-id", None, {"chat": cv}, prompt_sets, device="cuda", dtype="bfloat16")

The model is one in memory (it runs where it is), or a folder / hub id that the panel loads with its tokenizer
(``load_target``: on ``device`` in ``dtype``, ``auto`` when left out: the GPU if there is one, the checkpoint's own
dtype). With a model in memory, ``device`` / ``dtype`` say where it should be: a model elsewhere is a one-line
UsageError (the panel does not move a model it was given).

Thin wiring: every step is a method that works without a kernel (``run``, ``table_html``,
``plot_png``, ``snapshot_html``), and widget values (``HTML``, ``Image``) are set directly, so tests can drive it.

A static snapshot travels with the display. ``panel.widget`` (and ``panel`` itself) displays as the live
widget *and* a ``text/html`` picture of the panel as it is at that moment (the coefficients, the plot as
an inline PNG, the replies table). A live front end (JupyterLab) draws the widget; a notebook exported
without a kernel (``chatvec demo``, nbconvert) can show the snapshot instead of an empty widget area.
"""
from __future__ import annotations

import base64
import functools
import html
import io
from typing import Mapping, Sequence

import pandas as pd

from chatvec_lab.errors import ChatVecError, UsageError
from chatvec_lab.behaviour.generation import generate
from chatvec_lab.core.live import LiveModel
from chatvec_lab.behaviour.scoring import ScorerUnavailable, make_scorer, score_all
from chatvec_lab.plots import plot_scores
from chatvec_lab.behaviour.sweep import check_alphas
from chatvec_lab.core.vector import ChatVector

COLOURED = {"ended_turn": "Greens", "share_de": "Blues", "refusal": "Purples", "offensive": "Reds"}


def style_scores(df: pd.DataFrame):
    """Replies with their scores, colour-coded (needs jinja2)."""
    cols = [c for c in COLOURED if c in df.columns]
    import matplotlib

    styler = df.style.format(precision=2, na_rep="–")
    for c in cols:
        # a score left empty (NaN, e.g. an empty reply) gets a white cell, not the colour map's black "bad" colour
        cmap = matplotlib.colormaps[COLOURED[c]].with_extremes(bad="white")
        styler = styler.background_gradient(cmap=cmap, subset=[c], vmin=0, vmax=1)
    return styler.set_properties(subset=["reply"], **{"text-align": "left", "white-space": "pre-wrap"}) \
        if "reply" in df.columns else styler


@functools.lru_cache(maxsize=None)
def _snapshot_box_class():
    """A ``VBox`` whose display also carries ``text/html``: a static snapshot of the panel (made lazily:
    ipywidgets is an optional dependency)."""
    import ipywidgets as W

    class PanelBox(W.VBox):
        snapshot = None  # set by the panel: a callable returning the snapshot's HTML

        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs)
            if data is not None and self.snapshot is not None:
                data["text/html"] = self.snapshot()
            return data

    return PanelBox


def panel_model(model, tokenizer, live: LiveModel | None = None, device=None, dtype=None):
    """``(model, tokenizer)`` the panel runs: a folder or hub id loaded by ``load_target`` on ``device`` in ``dtype``
    (None: ``auto``), with its own tokenizer unless one is given; a model in memory (or ``live``'s) as it is, after
    checking that it is on ``device`` in ``dtype`` where those are given (``auto`` dtype: the model's own)."""
    import os

    from chatvec_lab.io.devices import dtype_name, resolve_device, resolve_dtype

    if live is None and isinstance(model, (str, os.PathLike)):
        from chatvec_lab.behaviour.engines import load_target

        loaded, own = load_target(model, device="auto" if device is None else device,
                                  dtype="auto" if dtype is None else dtype)
        return loaded, own if tokenizer is None else tokenizer
    held = live.model if live is not None else model
    param = next(held.parameters())
    if device is not None and param.device != resolve_device(device):
        raise UsageError(f"device={device!r}, but the model given to the panel is on {param.device}: load it there "
                         "(load_target(..., device=...)) or give the panel its folder")
    if dtype is not None and param.dtype != resolve_dtype(dtype, held):
        raise UsageError(f"dtype={dtype!r}, but the model given to the panel is in {dtype_name(param.dtype)}: load it "
                         "so (load_target(..., dtype=...)) or give the panel its folder")
    return model, tokenizer


class CoefficientPanel:
    def __init__(self, model, tokenizer, vectors: Mapping[str, ChatVector], prompt_sets: Mapping[str, Sequence[str]],
                 sweep_df: pd.DataFrame | None = None, scorers: Sequence[str] = ("language", "refusal", "offensive"),
                 language: str = "de", max_new_tokens: int = 48, seed: int = 0, slider_range=(-0.5, 2.0, 0.05),
                 metrics: Sequence[str] = ("ended_turn", "share_de", "refusal", "offensive"), auto_run: bool = True,
                 live: LiveModel | None = None, device=None, dtype=None):
        import ipywidgets as W

        if not prompt_sets:
            raise ValueError("no prompt set given")
        model, tokenizer = panel_model(model, tokenizer, live, device, dtype)
        self.tokenizer = tokenizer
        self.live = live or LiveModel(model, dict(vectors))
        self.prompt_sets = {k: list(v) for k, v in prompt_sets.items()}
        self.scorers = [make_scorer(s, language=language) for s in scorers]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.sweep_df = sweep_df
        self.metrics = [m for m in metrics if sweep_df is None or m in sweep_df.columns]
        self.last: pd.DataFrame | None = None
        self.last_alphas: dict[str, float] | None = None  # the coefficients the replies in ``last`` came from
        lo, hi, step = slider_range
        self.sliders = {name: W.FloatSlider(value=0.0, min=lo, max=hi, step=step, description=f"α {name}",
                                            continuous_update=False, readout_format=".2f",
                                            style={"description_width": "90px"}, layout=W.Layout(width="420px"))
                        for name in self.live.names}
        self.plot_vector = W.Dropdown(options=self.live.names, value=self.swept_vectors()[0], description="plot α of",
                                      layout=W.Layout(width="260px"))
        self.prompt_set = W.Dropdown(options=list(self.prompt_sets) + ["(typed below)"],
                                     value=next(iter(self.prompt_sets)), description="prompts")
        self.prompt_box = W.Textarea(placeholder="one prompt a line (used with '(typed below)')",
                                     layout=W.Layout(width="420px", height="70px"))
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.message = W.HTML()
        self.table = W.HTML()
        self.plot = W.Image(format="png", layout=W.Layout(width="560px"))
        for s in self.sliders.values():
            s.observe(self._on_change, names="value")
        self.plot_vector.observe(lambda _: self.refresh_plot(), names="value")
        self.prompt_set.observe(self._on_prompt_set, names="value")
        self.button.on_click(lambda _: self.update())
        self.auto_run = auto_run
        controls = W.VBox([*self.sliders.values(), self.plot_vector, self.prompt_set, self.prompt_box,
                           W.HBox([self.button]), self.message])
        self.widget = _snapshot_box_class()([W.HBox([controls, self.plot]), self.table])
        self.widget.snapshot = self.snapshot_html
        self.refresh_plot()

    # ------------------------------------------------------------ pure steps
    def swept_vectors(self) -> list[str]:
        """The vectors whose α the sweep varied (only those can be plotted against their α); all without a sweep."""
        names = list(self.live.names)
        if self.sweep_df is None or not len(self.sweep_df):
            return names
        varied = [n for n in names if f"alpha_{n}" in self.sweep_df.columns
                  and self.sweep_df[f"alpha_{n}"].nunique() > 1]
        return varied or names[:1]

    def alphas(self) -> dict[str, float]:
        return {name: s.value for name, s in self.sliders.items()}

    def prompts(self) -> list[str]:
        if self.prompt_set.value == "(typed below)":
            prompts = [p.strip() for p in self.prompt_box.value.splitlines() if p.strip()]
        else:
            prompts = self.prompt_sets[self.prompt_set.value]
        if not prompts:
            raise ValueError("no prompt: type one per line, or pick a prompt set")
        return prompts

    def run(self, alphas: Mapping[str, float] | None = None) -> pd.DataFrame:
        """Set the coefficients, generate for the current prompts, score. Raises on bad input, model untouched."""
        alphas = check_alphas([dict(alphas or self.alphas())], self.live.names)[0]
        prompts = self.prompts()
        self.live.set(alphas)
        df = generate(self.live.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, seed=self.seed)
        scores = score_all(df["reply"].tolist(), self.scorers)
        return pd.concat([df[["prompt", "reply", "ended_turn"]], scores.drop(columns=["language"], errors="ignore")],
                         axis=1)

    def table_html(self, df: pd.DataFrame) -> str:
        try:
            return style_scores(df).to_html()
        except ImportError:  # pragma: no cover - jinja2 missing
            return df.to_html(index=False)

    def plot_png(self) -> bytes:
        import matplotlib.pyplot as plt

        if self.sweep_df is None or not len(self.sweep_df) or self.plot_vector.value not in self.swept_vectors():
            fig, ax = plt.subplots(figsize=(6, 3.5))
            text = ("no sweep yet: pass sweep_df=sweep(...)" if self.sweep_df is None or not len(self.sweep_df) else
                    f"the sweep did not vary α of {self.plot_vector.value}: sweep it to plot it")
            ax.text(0.5, 0.5, text, ha="center", va="center")
            ax.set_axis_off()
        else:
            current = self.sliders[self.plot_vector.value].value
            df = self.sweep_df
            col = f"alpha_{self.plot_vector.value}"
            if col in df.columns:
                df = df.assign(alpha=df[col])
            fig = plot_scores(df, self.metrics, current=current,
                              title=f"Scores against α ({self.plot_vector.value}); dashed: the slider")
            self._mark_replies(fig.axes[0])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    def _mark_replies(self, ax) -> None:
        """The replies in the table as stars on the sweep's lines: their mean score, at the α they came from."""
        if self.last is None or self.last_alphas is None or not len(self.last):
            return
        from chatvec_lab.behaviour.sweep import METRIC_LABELS

        at = self.last_alphas.get(self.plot_vector.value)
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
        marked = False
        for m in self.metrics:
            if m not in self.last.columns:
                continue
            mean = pd.to_numeric(self.last[m], errors="coerce").mean()
            if at is None or pd.isna(mean):
                continue
            ax.plot([at], [mean], marker="*", markersize=14, linestyle="none", markeredgecolor="black",
                    color=colours.get(METRIC_LABELS.get(m, m), "black"))
            marked = True
        if marked:
            ax.plot([], [], marker="*", markersize=10, linestyle="none", color="0.5", markeredgecolor="black",
                    label=f"the {len(self.last)} replies in the table ({self.prompt_set.value})")
            ax.legend(fontsize=8, loc="best")

    def snapshot_html(self) -> str:
        """The panel as it is now, as static HTML: coefficients, prompts, the plot (inline PNG), the replies."""
        alphas = ", ".join(f"α {html.escape(k)} = {v:.2f}" for k, v in self.alphas().items())
        png = base64.b64encode(self.plot.value or self.plot_png()).decode("ascii")
        table = self.table.value or "<p><i>No replies yet: move a slider or press Generate.</i></p>"
        message = f"<div>{self.message.value}</div>" if self.message.value else ""
        return ("<div class='chatvec-panel-snapshot' style='border:1px solid #ccc;padding:8px'>"
                "<p style='margin:0 0 6px 0'><b>Coefficient panel: static snapshot</b> "
                "<span style='color:#555'>(the live panel needs a running kernel; this is how it stood when "
                f"displayed)</span><br>{alphas}; prompts: {html.escape(str(self.prompt_set.value))}; "
                f"plot: α of {html.escape(str(self.plot_vector.value))}</p>{message}"
                f"<img alt='scores against α' style='max-width:560px' src='data:image/png;base64,{png}'>"
                f"{table}</div>")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------ wiring
    def refresh_plot(self) -> None:
        self.plot.value = self.plot_png()

    def update(self) -> None:
        try:
            df = self.run()
        except (ChatVecError, ValueError, KeyError, ScorerUnavailable) as e:
            self.message.value = f"<span style='color:#b00020'><b>error:</b> {html.escape(str(e))}</span>"
            return
        self.last, self.last_alphas = df, self.alphas()
        self.message.value = (f"<span style='color:#555'>{len(df)} replies at "
                              + ", ".join(f"α {k} = {v:g}" for k, v in self.alphas().items()) + "</span>")
        self.table.value = self.table_html(df)
        self.refresh_plot()

    def _on_prompt_set(self, change) -> None:
        """Another prompt set: new replies (with ``auto_run``); an empty '(typed below)' box asks for prompts."""
        if change["new"] == "(typed below)" and not self.prompt_box.value.strip():
            self.message.value = "<span style='color:#555'>type one prompt a line, then press Generate</span>"
        elif self.auto_run:
            self.update()

    def _on_change(self, _change) -> None:
        if self.auto_run:
            self.update()
        else:
            self.refresh_plot()
