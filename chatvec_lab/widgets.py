"""An interactive panel: a slider per chat vector, prompts, replies with their scores, and the sweep plot.

    panel = CoefficientPanel(model, tokenizer, {"chat": cv, "chat-alt": cv_alt}, prompt_sets, sweep_df=df)
    panel.widget   # display it in a notebook

Thin wiring: every step is a method that works without a kernel (``run``, ``table_html``,
``plot_png``), and widget values (``HTML``, ``Image``) are set directly, so tests can drive it.
"""
from __future__ import annotations

import html
import io
from typing import Mapping, Sequence

import pandas as pd

from chatvec_lab.errors import ChatVecError
from chatvec_lab.generation import generate
from chatvec_lab.live import LiveModel
from chatvec_lab.scoring import ScorerUnavailable, make_scorer, score_all
from chatvec_lab.sweep import check_coefficients, plot_scores
from chatvec_lab.vector import ChatVector

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


class CoefficientPanel:
    def __init__(self, model, tokenizer, vectors: Mapping[str, ChatVector], prompt_sets: Mapping[str, Sequence[str]],
                 sweep_df: pd.DataFrame | None = None, scorers: Sequence[str] = ("language", "refusal", "offensive"),
                 language: str = "de", max_new_tokens: int = 48, seed: int = 0, slider_range=(-0.5, 2.0, 0.05),
                 metrics: Sequence[str] = ("ended_turn", "share_de", "refusal", "offensive"), auto_run: bool = True,
                 live: LiveModel | None = None):
        import ipywidgets as W

        if not prompt_sets:
            raise ValueError("no prompt set given")
        self.tokenizer = tokenizer
        self.live = live or LiveModel(model, dict(vectors))
        self.prompt_sets = {k: list(v) for k, v in prompt_sets.items()}
        self.scorers = [make_scorer(s, language=language) for s in scorers]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.sweep_df = sweep_df
        self.metrics = [m for m in metrics if sweep_df is None or m in sweep_df.columns]
        self.last: pd.DataFrame | None = None
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
        self.button.on_click(lambda _: self.update())
        self.auto_run = auto_run
        controls = W.VBox([*self.sliders.values(), self.plot_vector, self.prompt_set, self.prompt_box,
                           W.HBox([self.button]), self.message])
        self.widget = W.VBox([W.HBox([controls, self.plot]), self.table])
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
        alphas = check_coefficients([dict(alphas or self.alphas())], self.live.names)[0]
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
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    # ------------------------------------------------------------ wiring
    def refresh_plot(self) -> None:
        self.plot.value = self.plot_png()

    def update(self) -> None:
        try:
            df = self.run()
        except (ChatVecError, ValueError, KeyError, ScorerUnavailable) as e:
            self.message.value = f"<span style='color:#b00020'><b>error:</b> {html.escape(str(e))}</span>"
            return
        self.last = df
        self.message.value = (f"<span style='color:#555'>{len(df)} replies at "
                              + ", ".join(f"α {k} = {v:g}" for k, v in self.alphas().items()) + "</span>")
        self.table.value = self.table_html(df)
        self.refresh_plot()

    def _on_change(self, _change) -> None:
        if self.auto_run:
            self.update()
        else:
            self.refresh_plot()
