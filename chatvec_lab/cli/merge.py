"""``chatvec merge CONFIG.yml -o OUT``: run a mergekit config (``core/model_merge.py``), optionally with the
report of what the merge did (``--report``: ``merge_report.csv`` and ``merge_report.png`` in OUT, and a summary
printed). ``COMMANDS`` lists the command for ``chatvec_lab.cli``."""
from __future__ import annotations

import argparse

from chatvec_lab.cli.arguments import Command, add_quiet, add_write_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a mergekit YAML config (models, base_model, merge_method, parameters, dtype …)")
    p.add_argument("-o", "--out", required=True, help="folder to write the merged model to")
    p.add_argument("--report", action="store_true",
                   help="also write what the merge did per layer and source (merge_report.csv, merge_report.png)")
    p.add_argument("--seed", type=int, default=0, help="the random masks of dare_* and della* (default 0)")
    add_write_options(p)
    add_quiet(p)


def run(args) -> None:
    from chatvec_lab.core.merge_config import read_config
    from chatvec_lab.core.model_merge import merge_from_config
    from chatvec_lab.core.threads import one_torch_thread

    config = read_config(args.config)
    observer = None
    if args.report:
        from chatvec_lab.analysis.merge_report import MergeReport
        from chatvec_lab.errors import UsageError

        if config.base is None:
            raise UsageError(f"--report measures deltas from the base model: {config.method.name} has none here "
                             "(give base_model, with a method that uses it)")
        names = [config.inputs[i] for i in config.sources]
        short = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
        observer = MergeReport(short if len(set(short)) == len(short) else names, on_finish=_plot)
    with one_torch_thread():
        merge_from_config(config, args.out, overwrite=args.overwrite, seed=args.seed, observer=observer,
                          max_shard_bytes=int(args.max_shard_gb * 1024**3), allow_pickle=args.allow_pickle,
                          progress=not args.quiet)
    print(f"wrote {args.out} ({config.method.name} of {len(config.inputs)} models)")
    if observer is not None:
        from chatvec_lab.analysis.merge_report import summary

        print(summary(observer.table()))


def _plot(table, folder) -> None:
    import matplotlib.pyplot as plt

    from chatvec_lab.plots.merges import plot_merge_report

    fig = plot_merge_report(table)
    fig.savefig(folder / "merge_report.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


COMMANDS = {"merge": Command("merge models as a mergekit YAML config says (chatvec merge CONFIG.yml -o OUT)",
                             add_arguments, run)}
