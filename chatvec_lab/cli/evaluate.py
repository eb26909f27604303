"""The ``chatvec eval`` command: benchmark ``target + α·vector`` at each α with EleutherAI's lm-evaluation-harness,
the live model rewritten in place (no checkpoint written); a tidy table printed, optionally saved and plotted.

    chatvec eval --target cp --vector cv --alphas 0,0.5,1 --tasks chatvec_toy_de_en --csv eval.csv --plot eval.png

``eval_arguments`` adds its flags, ``run_eval`` calls ``behaviour.harness.evaluate_harness`` with them.
``COMMANDS`` lists it for ``chatvec_lab.cli``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from chatvec_lab.cli.arguments import Command, add_device_options, add_quiet, alpha_list, positive_int
from chatvec_lab.errors import UsageError


def item_limit(text: str) -> float:
    """``--limit``: a whole number of items per task, or a fraction below 1 (that share of each task); the rule is
    ``evaluate_harness``'s own (``behaviour.harness.check_limit``)."""
    from chatvec_lab.behaviour.harness import check_limit

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    try:
        return check_limit(value, "--limit")
    except UsageError:
        raise argparse.ArgumentTypeError(f"--limit is a number of items per task (e.g. 50) or a fraction below 1 "
                                         f"(e.g. 0.1), not {text!r}") from None


def check_outputs(args, inputs) -> None:
    """``--csv`` and ``--plot``, before any work: each names a file (not a path ending in a separator), the two are
    not one file however spelled (``..``, a linked folder), and each is new (or ``--overwrite``) and clear of the
    inputs."""
    from chatvec_lab.io.output import check_output_path, check_separate_outputs

    given = [(path, flag) for path, flag in ((args.csv, "--csv"), (args.plot, "--plot")) if path is not None]
    check_separate_outputs(given)
    for path, flag in given:
        check_output_path(path, args.overwrite, inputs, folder=False, flag=flag)


def fewshot_count(text: str) -> int:
    """``--num-fewshot``: a whole number ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--num-fewshot is a whole number of examples ≥ 0, not {text!r}")
    return value


def eval_arguments(e) -> None:
    e.add_argument("--target", required=True, help="the model the vectors are added to (folder or hub id)")
    e.add_argument("--vector", action="append", required=True, help="a saved vector (chatvec extract); repeatable")
    e.add_argument("--alphas", type=alpha_list, default=[0.0, 0.5, 1.0], help="coefficients, e.g. 0,0.5,1")
    e.add_argument("--tasks", required=True,
                   help="comma-separated lm-evaluation-harness tasks: chatvec_toy_de_en (shipped, offline) or any "
                        "task the harness knows (hellaswag, arc_easy …; their data comes from the hub)")
    e.add_argument("--include-path", action="append", metavar="DIR", help="a folder of your own task YAML files")
    e.add_argument("--limit", type=item_limit, help="items per task (or a fraction below 1): for a quick look")
    e.add_argument("--num-fewshot", type=fewshot_count, help="few-shot examples per item (default: the task's)")
    e.add_argument("--csv", help="also write the table here (a new file)")
    e.add_argument("--plot", metavar="PNG", help="also draw the scores against α here (a new file)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --csv / --plot file")
    e.add_argument("--embeddings", choices=["error", "skip", "shared"], default="error",
                   help="when the target's vocabulary differs from the vector's: refuse (error), leave embeddings and "
                        "lm_head as they are (skip), or add by row index to the rows both have (shared)")
    add_device_options(e, batch=False)
    e.add_argument("--batch-size", type=positive_int, default=None,
                   help="the harness's batch size (default: 'auto' on a GPU, 8 on a CPU)")
    add_quiet(e)


def run_eval(args) -> None:
    import pandas as pd

    from chatvec_lab.behaviour.harness import check_tasks, evaluate_harness, harness
    from chatvec_lab.core.vector import ChatVector, named_vectors
    from chatvec_lab.io.output import atomic_file, source_paths
    from chatvec_lab.io.resources import harness_task_dir
    from chatvec_lab.io.sources import open_weights

    harness()  # missing: say how to install it before anything else
    tasks = check_tasks(args.tasks)
    inputs = [*source_paths(open_weights(args.target)), harness_task_dir(), *map(Path, args.include_path or []),
              *(p for v in args.vector for p in ChatVector.load(v).input_paths())]
    check_outputs(args, inputs)  # before the evaluation's work, not after
    df = evaluate_harness(args.target, named_vectors(args.vector), args.alphas, tasks, limit=args.limit,
                          num_fewshot=args.num_fewshot, include_path=args.include_path, device=args.device,
                          dtype=args.dtype, batch_size=args.batch_size, embeddings=args.embeddings,
                          progress=not args.quiet)
    if args.csv:
        with atomic_file(Path(args.csv), args.overwrite, inputs) as tmp:
            df.to_csv(tmp, index=False)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from chatvec_lab.plots import plot_eval

        fig = plot_eval(df)
        with atomic_file(Path(args.plot), args.overwrite, inputs) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    shown = {c: "{:g}".format if c.startswith("alpha") else "{:.4f}".format for c in df.columns
             if c.startswith("alpha") or c in ("value", "stderr")}
    with pd.option_context("display.width", 160, "display.max_rows", None):
        print(df.to_string(index=False, formatters=shown))
    for out, what in ((args.csv, f"{len(df)} rows"), (args.plot, "figure")):
        if out:
            print(f"wrote {out} ({what})")


COMMANDS = {
    "eval": Command("benchmark target + α·vector with lm-evaluation-harness at each α (no checkpoint written)",
                    eval_arguments, run_eval),
}
