"""``chatvec merge CONFIG.yml -o OUT``: run a mergekit config (``core/model_merge.py``), optionally with the
report of what the merge did (``--report``: ``merge_report.csv`` and ``merge_report.png`` in OUT, and a summary
printed), and of the merged model's vector (``--vector-out``: merged − base, a saved vector for ``chatvec compare``,
``atlas``, ``sweep`` and ``apply``). ``COMMANDS`` lists the command for ``chatvec_lab.cli``."""
from __future__ import annotations

import argparse

from chatvec_lab.cli.arguments import Command, add_quiet, add_write_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a mergekit YAML config (models, base_model, merge_method, parameters, dtype …)")
    p.add_argument("-o", "--out", required=True, help="folder to write the merged model to")
    p.add_argument("--report", action="store_true",
                   help="also write what the merge did per layer and source (merge_report.csv, merge_report.png)")
    p.add_argument("--vector-out", metavar="DIR",
                   help="also save the merged model's vector (merged − base_model) to this new folder, for chatvec "
                        "compare, atlas, sweep and apply (chatvec compare also takes OUT itself)")
    p.add_argument("--seed", type=int, default=0, help="the random masks of dare_* and della* (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tensors merged at once, on N cores (default: the cores this process may use); the output "
                        "is the same to the bit, and memory stays about that of one tensor at a time")
    add_write_options(p)
    add_quiet(p)


def run(args) -> None:
    from chatvec_lab.core.merge_config import read_config
    from chatvec_lab.core.model_merge import merge_from_config
    from chatvec_lab.core.threads import one_torch_thread

    _keep_freed_memory()  # first: before the merge starts any thread
    config = read_config(args.config)
    _check_outputs(config, args.out, args.vector_out, args.overwrite)
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
                          progress=not args.quiet, workers=args.workers)
    print(f"wrote {args.out} ({config.method.name} of {len(config.inputs)} models)")
    if args.vector_out is not None:
        from chatvec_lab.core.model_merge import merged_vector

        with one_torch_thread():
            merged_vector(args.out, allow_pickle=args.allow_pickle).save(
                args.vector_out, overwrite=args.overwrite, progress=not args.quiet,
                max_shard_bytes=int(args.max_shard_gb * 1024**3))
        print(f"wrote {args.vector_out} (the merged model's vector: merged − base)")
    if observer is not None:
        from chatvec_lab.analysis.merge_report import summary

        print(summary(observer.table()))


def _keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next tensor instead of handing each large one fresh pages from the
    kernel (mapped, faulted and zeroed anew: a merge allocates the same few sizes tensor after tensor). Measured on
    a 4 × 2.5 GB task_arithmetic merge: 23 s of system time → 8 s, the same peak RSS. No new arena for the merge's
    worker threads (a thread's own arena takes blocks over 64 MB from mmap whatever the settings); one created while
    the package was imported (pyarrow's allocator thread, by pandas) can still be handed to one of them. Not glibc:
    nothing."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    mallopt(m_arena_max, 1)  # threads started from now share the arenas there are
    mallopt(m_mmap_max, 0)  # large blocks from the heap, not one mmap each
    mallopt(m_trim_threshold, 2**31 - 1)  # and freed ones stay there (up to 2 GB at its top)


def _check_outputs(config, out, vector_out, overwrite: bool) -> None:
    """Before any work: OUT (with --report's files in it) and --vector-out may not be, contain or sit inside any
    input (every model, the base, the config file, the tokenizer source; links and ``..`` resolved), nor overlap
    each other, with or without --overwrite; --vector-out needs a base."""
    from chatvec_lab.core.model_merge import input_paths
    from chatvec_lab.errors import UsageError
    from chatvec_lab.io.output import check_output_path, check_separate_outputs

    inputs = input_paths(config)
    check_output_path(out, overwrite, inputs)
    if vector_out is None:
        return
    if config.base is None:
        raise UsageError(f"--vector-out writes merged − base: {config.method.name} has no base here (give base_model, "
                         "with a method that uses it; or chatvec extract --base BASE --chat OUT)")
    check_output_path(vector_out, overwrite, inputs)
    check_separate_outputs([(out, "--out"), (vector_out, "--vector-out")])


def _plot(table, folder) -> None:
    import matplotlib.pyplot as plt

    from chatvec_lab.plots.merges import plot_merge_report

    fig = plot_merge_report(table)
    fig.savefig(folder / "merge_report.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


COMMANDS = {"merge": Command("merge models as a mergekit YAML config says (chatvec merge CONFIG.yml -o OUT)",
                             add_arguments, run)}
