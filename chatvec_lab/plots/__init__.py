"""Pictures of what the lab computes. Each ``plot_*(data, ax=None, ...) -> Figure``, titled and labelled, one style.

``plots.geometry`` draws vectors (norms, cosines, spectra, interference), ``plots.behaviour`` draws what models
do (sweeps, the atlas, rank curves, merges, benchmark scores); both are re-exported here so
``from chatvec_lab import plots`` is the one place a notebook needs.
"""
from chatvec_lab.plots.style import CMAP, DIVERGING, RATES, new_axes, style_axes
from chatvec_lab.plots.geometry import (plot_cosine_matrix, plot_interference, plot_layer_cosine, plot_layer_norms,
                                        plot_relative_norms_heatmap, plot_sign_agreement, plot_spectra,
                                        save_compare_plots)
from chatvec_lab.plots.behaviour import plot_atlas, plot_eval, plot_merges, plot_rank_curve, plot_scores
from chatvec_lab.plots.merges import plot_merge_report
from chatvec_lab.plots.interpolation import plot_interpolation, plot_slerp_norms
