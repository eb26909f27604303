"""The ``chatvec`` command line: extract | apply | info | compare | sweep | atlas | demo | notebooks."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path

from chatvec_lab.errors import ChatVecError, OneLineParser, one_line


def _alphas(text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"coefficients must be numbers separated by commas, not {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"coefficients must be finite numbers, not {text!r}")
    return values


def _number(text: str) -> float:
    values = _alphas(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one number expected, not {text!r}")
    return values[0]


def _layers(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if a > b:
                    raise argparse.ArgumentTypeError(f"layer range {part!r} runs backwards: write {b}-{a}")
                if b - a >= 100_000:
                    raise argparse.ArgumentTypeError(f"layer range {part!r} is far larger than any model")
                out.extend(range(a, b + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers look like 0-15 or 0,2,4, not {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no layer in {text!r}")
    return out


def _positive(text: str, what: str = "expected a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def _rank(text: str) -> int:
    from chatvec_lab.core.transforms import MAX_RANK

    value = _positive(text, "rank must be a positive integer")
    if value > MAX_RANK:
        raise argparse.ArgumentTypeError(f"rank {text} is far larger than any matrix (at most {MAX_RANK}; a rank "
                                         "above a matrix's own keeps it whole)")
    return value


def _ranks(text: str) -> list[int]:
    return [_rank(part) for part in text.split(",") if part.strip()] or [_rank(text)]


def _seed_count(text: str) -> int:
    from chatvec_lab.behaviour.grid import MAX_SEEDS

    value = _positive(text, "--seeds is a number of sampling seeds (seeds 0, 1, … N-1): a positive integer")
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"--seeds {text} is more than {MAX_SEEDS:,} seeds")
    return value


def _shard_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * 1024**3 < 1 or value > 1024**2:
        raise argparse.ArgumentTypeError(f"--max-shard-gb is the largest shard in GB: a finite number above 0 and "
                                         f"at most 1048576 (e.g. 4, or 1000 for one file), not {text!r}")
    return value


NUMBER_OPTIONS = ("--alpha", "--alphas")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--alpha -1e-3`` as ``--alpha=-1e-3``: argparse takes a value in exponent notation that starts with a
    minus for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in NUMBER_OPTIONS and arg.startswith("-"):
            try:
                _alphas(arg)
            except argparse.ArgumentTypeError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def cmd_extract(args) -> None:
    from chatvec_lab.core.vector import ChatVector, extract

    if args.format == "chatvec" and (args.target is not None or args.alpha != 1.0):
        raise ChatVecError("--target and --alpha belong to --format peft (a saved vector is applied later)")
    if args.format == "chatvec" and args.rank is None and not (args.include or args.exclude):
        extract(args.base, args.chat, out=args.out, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                progress=not args.quiet, max_shard_bytes=int(args.max_shard_gb * 1024**3))
        print(f"wrote {args.out}")
        return
    vector = ChatVector.from_models(args.base, args.chat, allow_pickle=args.allow_pickle)
    if args.include or args.exclude:
        vector = vector.select(include=args.include, exclude=args.exclude)
    if args.format == "peft":
        from chatvec_lab.core.lora import export_peft

        export_peft(vector, args.out, rank=args.rank, alpha=args.alpha, target=args.target,
                    overwrite=args.overwrite, allow_pickle=args.allow_pickle, progress=not args.quiet)
        print(f"wrote {args.out} (PEFT LoRA adapter, rank {args.rank or 'full'}, alpha {args.alpha:g})")
        return
    if args.rank is not None:
        vector = vector.low_rank(args.rank)
    vector.save(args.out, overwrite=args.overwrite, progress=not args.quiet,
                max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"wrote {args.out}")


def cmd_apply(args) -> None:
    from chatvec_lab.core.apply import ApplyOptions, apply_vectors
    from chatvec_lab.core.vector import ChatVector

    alphas = args.alpha or [1.0]
    if len(alphas) == 1 and len(args.vector) > 1:
        alphas = alphas * len(args.vector)
    if len(alphas) != len(args.vector):
        raise ChatVecError(f"{len(args.vector)} --vector but {len(alphas)} --alpha: give one --alpha per --vector")
    pairs = [(ChatVector.load(v), a) for v, a in zip(args.vector, alphas)]
    base = args.base  # without one, the API checks against the base the vector records, where it still exists
    token_map = _token_map(args.token_map)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report prints them
        options = ApplyOptions(base=base, embeddings=args.embeddings, include=args.include, exclude=args.exclude,
                               layers=args.layers, token_map=token_map, chat=args.chat,
                               allow_pickle=args.allow_pickle, target_only=args.target_only,
                               check_lineage=not args.no_lineage_check)
        report = apply_vectors(
            args.target, pairs, args.out, options=options, chat_template_from=args.chat_template_from,
            overwrite=args.overwrite, progress=not args.quiet,
            max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(report.summary())
    if report.lineage_distance is None and not args.no_lineage_check:
        print("note: lineage not checked (the vector's base is not available here; pass --base)", file=sys.stderr)


def _token_map(text: str | None) -> dict[str, str]:
    """``"<|end|>,<|a|>=<|b|>"`` → ``{"<|end|>": "<|end|>", "<|a|>": "<|b|>"}`` (target token = chat token)."""
    pairs = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        target, _, chat = item.partition("=")
        if not target or (_ and not chat):
            raise ChatVecError(f"--token-map entries are TOKEN or TARGET_TOKEN=CHAT_TOKEN, not {item!r}")
        pairs[target] = chat or target
    if text is not None and not pairs:
        raise ChatVecError(f"--token-map {text!r} names no token")
    return pairs


def cmd_info(args) -> None:
    from chatvec_lab.analysis.info import describe

    meta, table = describe(args.path, norms=not args.no_norms)
    for key, value in meta.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    import pandas as pd
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 160):
        print(table.to_string(index=False, max_rows=args.max_rows))


def cmd_compare(args) -> None:
    from chatvec_lab import plots
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.vector import named_vectors

    from chatvec_lab.io.output import atomic_file, atomic_folder, check_output_path

    vectors = named_vectors(args.vectors)
    inputs = [p for v in vectors.values() for p in v.input_paths()]
    outputs = [(out, flag, folder) for out, flag, folder in (
        (args.csv, "--csv", False), (args.csv_matrix, "--csv-matrix", False), (args.plots, "--plots", True)) if out]
    for out, _, folder in outputs:  # before the pass, not after
        check_output_path(out, args.overwrite, inputs, folder=folder)
    import itertools
    for (a, flag_a, _), (b, flag_b, _) in itertools.combinations(outputs, 2):
        ra, rb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
        if ra == rb or ra in rb.parents or rb in ra.parents:
            raise ChatVecError(f"{flag_a} {a} and {flag_b} {b} overlap: give each output its own path")
    stats = geometry.vector_stats(vectors)
    cos = geometry.cosine_matrix(stats)
    import pandas as pd
    with pd.option_context("display.width", 160, "display.precision", 4):
        print("cosine similarity:")
        print(cos.to_string())
        print("\nnorm of each vector by layer:")
        print(geometry.layer_norms(stats).to_string())
    if args.csv or args.csv_matrix:
        print()
    if args.csv:
        with atomic_file(args.csv, args.overwrite, inputs) as tmp:
            geometry.tidy_table(stats).to_csv(tmp, index=False)
        print(f"wrote {args.csv} (one row per tensor and vector, and per tensor and vector pair)")
    if args.csv_matrix:
        with atomic_file(args.csv_matrix, args.overwrite, inputs) as tmp:
            cos.to_csv(tmp)
        print(f"wrote {args.csv_matrix}")
    if args.plots:
        with atomic_folder(args.plots, args.overwrite, inputs) as tmp:
            paths = plots.save_compare_plots(stats, tmp)
        print(f"wrote {len(paths)} figures to {args.plots}")


def cmd_atlas(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chatvec_lab import plots
    from chatvec_lab.behaviour.ablations import merge_sweep, rank_curve, summarize
    from chatvec_lab.behaviour.atlas import atlas, rank_cells, summarize_atlas
    from chatvec_lab.analysis.interference import interference
    from chatvec_lab.io.output import atomic_folder, check_output_path, source_paths
    from chatvec_lab.io.sources import open_weights
    from chatvec_lab.behaviour.sweep import load_target, read_prompts
    from chatvec_lab.core.vector import ChatVector

    if args.skip_map and not (args.ranks or args.second_vector):
        raise ChatVecError("--skip-map leaves nothing to do: add --ranks and/or --second-vector")
    vector = ChatVector.load(args.vector)
    second = names = None
    if args.second_vector:
        from chatvec_lab.core.merge import METHODS
        from chatvec_lab.core.transforms import check_settings
        from chatvec_lab.core.vector import check_compatible, named_vectors

        check_settings(args.density)  # before the work, not after it
        names = named_vectors([args.vector, args.second_vector])  # the same folder twice is refused here
        names = {(f"{k} (source)" if k in METHODS else k): v for k, v in names.items()}
        second = list(names.values())[1]
        check_compatible(vector, second)
    inputs = [*source_paths(open_weights(args.target)), Path(args.prompts), *vector.input_paths(),
              *(second.input_paths() if second else [])]
    check_output_path(args.out, args.overwrite, inputs)  # before the work, not after
    prompts = read_prompts(args.prompts)
    if args.quick:
        prompts = prompts[:8]
    executor = _executor(args)
    if executor is not None and (args.ranks or second is not None):
        raise ChatVecError("--ray runs the layer × module map; leave out --ranks / --second-vector, or --ray")
    model, tokenizer = load_target(args.target) if executor is None else (args.target, None)
    common = dict(tokenizer=tokenizer, seeds=args.seeds, max_new_tokens=args.max_new_tokens, language=args.language,
                  progress=not args.quiet)
    tables, figures = {}, {}
    if not args.skip_map:
        df = atlas(model, vector, prompts, alphas=args.alphas, executor=executor, **common)
        s = summarize_atlas(df)
        tables |= {"atlas.csv": df, "summary.csv": s}
        for design in ("keep-only", "knock-out"):
            tables[f"ranking-{design}.csv"] = rank_cells(s, design=design)
            for metric in ("ended_turn", "share_de"):
                figures[f"atlas-{design}-{metric}.png"] = plots.plot_atlas(s, metric, design, "norm-matched")
        print(rank_cells(s).head(10).to_string(index=False))
    if args.ranks:
        curve = rank_curve(model, vector, args.ranks, prompts, alphas=args.alphas, **common)
        rs = summarize(curve)
        tables |= {"rank-curve.csv": curve, "rank-summary.csv": rs}
        for alpha in args.alphas:
            for x in ("rank", "stored_bytes"):
                figures[f"rank-curve-{x}-alpha{alpha:g}.png"] = plots.plot_rank_curve(rs, x=x, alpha=alpha)
        print(rs[[c for c in rs.columns if not c.endswith(("_lo", "_hi"))]].round(3).to_string(index=False))
    if second is not None:
        conflicts = interference(vector, second, density=args.density)
        merges = merge_sweep(model, names, prompts, alphas=args.alphas, **common)
        ms = summarize(merges)
        tables |= {"interference.csv": conflicts, "merges.csv": merges, "merge-summary.csv": ms}
        figures["interference.png"] = plots.plot_interference(conflicts, "trimmed_conflict")
        figures["merges.png"] = plots.plot_merges(ms, "ended_turn")
        print(ms[[c for c in ms.columns if not c.endswith(("_lo", "_hi"))]].round(3).to_string(index=False))
    with atomic_folder(args.out, args.overwrite, inputs=inputs) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / name, index=False)
        for name, fig in figures.items():
            fig.savefig(tmp / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
    print(f"wrote {args.out} ({', '.join(tables)})")


def _executor(args):
    """``--ray [ADDRESS]`` → a ``RayExecutor``; without it, None (the local executor)."""
    if getattr(args, "ray", None):
        from chatvec_lab.behaviour.grid import RayExecutor

        return RayExecutor(address=args.ray, actors=args.actors, threads_per_actor=args.threads_per_actor)
    if args.actors != 2 or args.threads_per_actor != 1:
        raise ChatVecError("--actors and --threads-per-actor go with --ray")
    return None


def cmd_sweep(args) -> None:
    from chatvec_lab.behaviour.sweep import run_sweep_cli

    run_sweep_cli(args, executor=_executor(args))


def cmd_demo(args) -> None:
    from chatvec_lab.course.demo import run_demo

    out = run_demo(args.out, overwrite=args.overwrite, notebooks=not args.no_notebooks, quick=args.quick,
                   full=args.full)
    print(f"report: {out}")


def cmd_notebooks(args) -> None:
    import importlib.util
    import shlex

    from chatvec_lab.io.resources import copy_notebooks

    copied = copy_notebooks(args.dir, overwrite=args.overwrite)
    folder = copied[0].parent.resolve()
    print(f"copied {len(copied)} notebooks to {folder}:")
    print("".join(f"  {p.name}\n" for p in copied), end="")
    print(f"open them with:  jupyter lab {shlex.quote(str(folder))}")
    if importlib.util.find_spec("jupyterlab") is None:
        print("(JupyterLab is not installed here: pip install 'chatvec_lab[notebooks]')")


def build_parser() -> argparse.ArgumentParser:
    from chatvec_lab.version import __version__

    p = OneLineParser(prog="chatvec", description="Chat-vector arithmetic on language models.")
    p.add_argument("--version", action="version", version=f"chatvec_lab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("extract", help="build a chat vector: chat − base")
    e.add_argument("--base", required=True, help="hub id, model folder or .safetensors file")
    e.add_argument("--chat", required=True)
    e.add_argument("-o", "--out", required=True, help="folder to write the vector to")
    e.add_argument("--rank", type=_rank, help="keep each matrix's best rank-R approximation (truncated SVD)")
    e.add_argument("--format", choices=["chatvec", "peft"], default="chatvec",
                   help="chatvec: a vector folder (default); peft: a LoRA adapter for "
                        "peft.PeftModel.from_pretrained on the target")
    e.add_argument("--target", help="with --format peft: the model the adapter is for (norm weights are "
                                    "stored whole, as target + alpha·Δ)")
    e.add_argument("--alpha", type=_number, default=1.0, help="with --format peft: the coefficient baked in")
    e.add_argument("--include", help="regex: only tensors whose name matches")
    e.add_argument("--exclude", help="regex: leave tensors whose name matches (e.g. norm, for an adapter "
                                     "without --target)")
    e.set_defaults(func=cmd_extract)

    a = sub.add_parser("apply", help="target + Σ alpha·vector, written as a new model folder")
    a.add_argument("--target", required=True)
    a.add_argument("--vector", action="append", required=True, help="a vector folder (repeatable)")
    a.add_argument("--alpha", action="append", type=_number, help="coefficient for each --vector (default 1.0)")
    a.add_argument("-o", "--out", required=True)
    a.add_argument("--base", help="the vector's base, for the lineage check (default: the one recorded)")
    a.add_argument("--no-lineage-check", action="store_true")
    a.add_argument("--embeddings", choices=["error", "skip", "shared", "tokens", "union"], default="error",
                   help="how embedding/lm_head rows meet when vocabularies differ: refuse, leave them, add by row "
                        "index to the rows both have, match rows by token, or match by token and add the chat "
                        "model's new tokens to the vocabulary")
    a.add_argument("--target-only", choices=["keep", "mean"], default="keep",
                   help="with --embeddings tokens|union: rows of tokens the vector lacks keep the target's, or get "
                        "the mean delta")
    a.add_argument("--include", help="regex: only tensors whose name matches")
    a.add_argument("--exclude", help="regex: leave tensors whose name matches")
    a.add_argument("--layers", type=_layers, help="only these layers, e.g. 0-15 or 0,2,4")
    a.add_argument("--token-map", help="comma-separated tokens whose embedding/lm_head rows come from --chat; "
                                       "TARGET=CHAT takes the chat model's row of another token")
    a.add_argument("--chat", help="the chat model (for --token-map)")
    a.add_argument("--chat-template-from", help="copy the chat template from this model")
    a.set_defaults(func=cmd_apply)

    i = sub.add_parser("info", help="what a vector or checkpoint holds")
    i.add_argument("path")
    i.add_argument("--no-norms", action="store_true", help="skip reading tensors (headers only)")
    i.add_argument("--max-rows", type=int, default=40)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("compare", help="cosine similarity and per-layer norms of vectors")
    c.add_argument("vectors", nargs="+")
    c.add_argument("--csv", help="write the per-tensor table here (tidy: a row per tensor and vector, and per "
                   "tensor and vector pair: norms, cosine, sign agreement)")
    c.add_argument("--csv-matrix", help="write the global cosine matrix here")
    c.add_argument("--plots", help="write PNG figures to this (new) folder")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --csv/--csv-matrix file or --plots folder")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("sweep", help="generate and score replies over coefficients")
    s.add_argument("--target", required=True)
    s.add_argument("--vector", action="append", required=True)
    s.add_argument("--alphas", type=_alphas, default=[0.0, 0.5, 1.0])
    s.add_argument("--prompts", required=True, help="one prompt a line, or JSONL with a 'prompt' field")
    s.add_argument("--scorers", default="turn_end,language,refusal,offensive",
                   help="comma-separated: turn_end, language, refusal, offensive, detoxify")
    s.add_argument("--seeds", type=_seed_count, default=1, help="number of sampling seeds")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--language", default="de", help="the new language's code, for the language share")
    s.add_argument("--csv", required=True)
    s.add_argument("--cache-dir", help="reuse results cached here")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("atlas", help="map where a vector's behaviour lives: keep-only and knock-out per layer × module")
    t.add_argument("--target", required=True)
    t.add_argument("--vector", required=True, help="a saved vector (chatvec extract)")
    t.add_argument("--prompts", required=True, help="one prompt a line, or JSONL with a 'prompt' field")
    t.add_argument("-o", "--out", required=True, help="a new folder: atlas.csv, summary.csv, rankings, heatmaps")
    t.add_argument("--alphas", type=_alphas, default=[1.0], help="grid α values besides the norm-matched one")
    t.add_argument("--seeds", type=_seed_count, default=1, help="number of sampling seeds")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--language", default="de")
    t.add_argument("--quick", action="store_true", help="8 prompts")
    t.add_argument("--ranks", type=_ranks, help="also a low-rank curve: these ranks of every matrix, e.g. 1,4,16,64")
    t.add_argument("--second-vector", help="also interference with this vector and merges of the two (each method)")
    t.add_argument("--density", type=_number, default=0.2, help="TIES' trim density for the interference table")
    t.add_argument("--skip-map", action="store_true", help="no layer × module map (only --ranks / --second-vector)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    t.set_defaults(func=cmd_atlas)

    d = sub.add_parser("demo", help="run the lab on the toy families and write a report folder (default: every "
                                    "held-out prompt once, both families, the atlas's knock-out map, notebooks 00-02)")
    d.add_argument("-o", "--out", default="chatvec-report")
    d.add_argument("--no-notebooks", action="store_true", help="skip executing the notebooks")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke test: 8 prompts per set, α 0 and 1, one notebook")
    size.add_argument("--full", action="store_true", help="the complete report: tuning and held-out prompts, 3 "
                      "seeds, 2 samplings, conversations, the whole atlas, every notebook")
    d.set_defaults(func=cmd_demo)

    n = sub.add_parser("notebooks", help="copy the teaching notebooks into a folder, to open in JupyterLab")
    n.add_argument("dir", help="where to put them (a new or empty folder)")
    n.add_argument("--overwrite", action="store_true", help="replace the notebooks in a non-empty folder (other files stay)")
    n.set_defaults(func=cmd_notebooks)

    for sp in (e, a):
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")
        sp.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt weights (weights_only=True)")
        sp.add_argument("--max-shard-gb", type=_shard_gb, default=4.0)
    d.add_argument("--overwrite", action="store_true")
    for sp in (e, a, i, c, s, t, d):
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    for sp in (s, t):
        sp.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run the grid's cells on Ray actors: 'local' (the default) starts Ray here, or a "
                             "cluster's address ('auto', 'ray://host:10001'); pip install 'chatvec_lab[distributed]'")
        sp.add_argument("--actors", type=_positive, default=2, help="with --ray: actors, one model each")
        sp.add_argument("--threads-per-actor", type=_positive, default=1, help="with --ray: torch threads per actor")
    return p


def main(argv=None) -> int:
    from chatvec_lab.io.output import Interrupted
    from chatvec_lab.core.threads import one_torch_thread

    argv = _join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("extract", "apply"):  # streaming, I/O-bound: one thread is as fast, and steady under load
            with one_torch_thread():
                args.func(args)
        else:
            args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `chatvec info … | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ChatVecError as e:
        print(f"chatvec {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chatvec {args.command}: error: {one_line(msg)}", file=sys.stderr)
        return 2
    except RecursionError:  # a file nested so deeply that a parser outside the lab gave up
        print(f"chatvec {args.command}: error: an input file is nested too deeply to be read (JSON thousands of "
              "levels deep?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"chatvec {args.command}: interrupted by {signal.Signals(signum).name}; no partial output was left",
              file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
