"""The ``chatvec`` commands on weights: ``extract`` (a vector: chat − base), ``apply`` (target + Σ α·vector),
``info`` (what a vector or checkpoint holds) and ``compare`` (cosines and norms of vectors).

Each command is a pair: ``*_arguments`` adds its flags to its parser, ``run_*`` calls the library with them.
``COMMANDS`` lists them for ``chatvec_lab.cli``.
"""
from __future__ import annotations

import json
import sys
import warnings

from chatvec_lab.cli.arguments import (Command, add_quiet, add_write_options, layer_list, matrix_rank,
                                       one_number, positive_int)
from chatvec_lab.core.threads import one_torch_thread
from chatvec_lab.errors import ChatVecError


# ---------------------------------------------------------------------------------------------- extract


def extract_arguments(e) -> None:
    e.add_argument("--base", required=True, help="hub id, model folder or .safetensors file")
    e.add_argument("--chat", required=True)
    e.add_argument("-o", "--out", required=True, help="folder to write the vector to")
    e.add_argument("--rank", type=matrix_rank, help="keep each matrix's best rank-R approximation (truncated SVD)")
    e.add_argument("--format", choices=["chatvec", "peft"], default="chatvec",
                   help="chatvec: a vector folder (default); peft: a LoRA adapter for "
                        "peft.PeftModel.from_pretrained on the target")
    e.add_argument("--target", help="with --format peft: the model the adapter is for (norm weights are "
                                    "stored whole, as target + alpha·Δ)")
    e.add_argument("--alpha", type=one_number, default=1.0, help="with --format peft: the coefficient baked in")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="with --format peft: the adapter's dtype (default: the target's)")
    e.add_argument("--include", help="regex: only tensors whose name matches")
    e.add_argument("--exclude", help="regex: leave tensors whose name matches (e.g. norm, for an adapter "
                                     "without --target)")
    add_write_options(e)
    e.set_defaults(max_shard_gb=None)  # None: not given (4 GB); --format peft writes one file and says it ignores it
    add_quiet(e)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def run_extract(args) -> None:
    from chatvec_lab.core.extraction import same_weights
    from chatvec_lab.core.vector import ChatVector, extract
    from chatvec_lab.io.shards import DEFAULT_SHARD_BYTES

    shard_bytes = DEFAULT_SHARD_BYTES if args.max_shard_gb is None else int(args.max_shard_gb * 1024**3)
    with one_torch_thread():  # streaming, I/O-bound: one thread is as fast, and steady under load
        if args.format == "chatvec" and (args.target is not None or args.alpha != 1.0):
            raise ChatVecError("--target and --alpha belong to --format peft (a saved vector is applied later)")
        if args.format == "peft" and args.max_shard_gb is not None:
            _note("--max-shard-gb is ignored with --format peft (an adapter is written as one file)")
        if args.format == "peft" and args.alpha == 0:
            _note("--alpha 0: the adapter changes nothing (every delta is scaled to zero)")
        if args.format == "chatvec" and args.rank is None and not (args.include or args.exclude):
            vector = extract(args.base, args.chat, out=args.out, overwrite=args.overwrite,
                             allow_pickle=args.allow_pickle, progress=not args.quiet, max_shard_bytes=shard_bytes)
            if same_weights(vector.metadata):
                _note("--base and --chat hold the same weights: the vector is all zeros")
            print(f"wrote {args.out}")
            return
        vector = ChatVector.from_models(args.base, args.chat, allow_pickle=args.allow_pickle)
        if same_weights(vector.metadata):
            _note("--base and --chat hold the same weights: the vector is all zeros")
        if args.include or args.exclude:
            vector = vector.select(include=args.include, exclude=args.exclude)
        if args.format == "peft":
            from chatvec_lab.core.lora import export_peft

            export_peft(vector, args.out, rank=args.rank, alpha=args.alpha, target=args.target,
                        overwrite=args.overwrite, allow_pickle=args.allow_pickle, progress=not args.quiet,
                        dtype=args.dtype)
            print(f"wrote {args.out} (PEFT LoRA adapter, rank {args.rank or 'full'}, alpha {args.alpha:g})")
            return
        if args.rank is not None:
            vector = vector.low_rank(args.rank)
        vector.save(args.out, overwrite=args.overwrite, progress=not args.quiet, max_shard_bytes=shard_bytes)
        print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------- apply


def apply_arguments(a) -> None:
    a.add_argument("--target", required=True)
    a.add_argument("--vector", action="append", required=True, help="a vector folder (repeatable)")
    a.add_argument("--alpha", action="append", type=one_number, help="coefficient for each --vector (default 1.0)")
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
    a.add_argument("--layers", type=layer_list, help="only these layers, e.g. 0-15 or 0,2,4")
    a.add_argument("--token-map", help="comma-separated tokens whose embedding/lm_head rows come from --chat; "
                                       "TARGET=CHAT takes the chat model's row of another token")
    a.add_argument("--chat", help="the chat model (for --token-map)")
    a.add_argument("--chat-template-from", help="copy the chat template from this model")
    add_write_options(a)
    add_quiet(a)


def run_apply(args) -> None:
    from chatvec_lab.core.apply import ApplyOptions, apply_vectors
    from chatvec_lab.core.vector import ChatVector

    with one_torch_thread():  # streaming, I/O-bound: one thread is as fast, and steady under load
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


# ---------------------------------------------------------------------------------------------- info


def info_arguments(i) -> None:
    i.add_argument("path")
    i.add_argument("--no-norms", action="store_true", help="skip reading tensors (headers only)")
    i.add_argument("--max-rows", type=positive_int, default=40)
    i.add_argument("--memory", action="store_true", help="instead: the memory each job will need for this model "
                   "(generate; sweep/atlas/eval; extract/apply/merge), from its headers and config only")
    i.add_argument("--device", default="auto", help="with --memory: where the jobs will run (auto, cpu, cuda)")
    i.add_argument("--dtype", default="auto", help="with --memory: auto (the checkpoint's own), float32, bfloat16, "
                                                   "float16")
    i.add_argument("--batch-size", type=positive_int, default=8, help="with --memory: replies generated together")
    i.add_argument("--tokens", type=positive_int, default=512, help="with --memory: tokens per reply, prompt "
                                                                    "included")
    add_quiet(i)


def run_info(args) -> None:
    import pandas as pd

    from chatvec_lab.analysis.info import describe

    if args.memory:
        from chatvec_lab.behaviour.memory import memory_estimate

        table = memory_estimate(args.path, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                tokens=args.tokens)
        shown = table.drop(columns=["basis"]).round(3)
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(shown.to_string(index=False))
        for job, basis in zip(table["job"], table["basis"]):
            print(f"{job}: {basis}")
        return
    meta, table = describe(args.path, norms=not args.no_norms)
    for key, value in meta.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 160):
        print(table.to_string(index=False, max_rows=args.max_rows))


# ---------------------------------------------------------------------------------------------- compare


def compare_arguments(c) -> None:
    c.add_argument("vectors", nargs="+", help="saved vector folders; a chatvec merge output folder counts as one "
                   "more vector: merged − the base its chatvec_merge.json records")
    c.add_argument("--csv", help="write the per-tensor table here (tidy: a row per tensor and vector, and per "
                   "tensor and vector pair: norms, cosine, sign agreement)")
    c.add_argument("--csv-matrix", help="write the global cosine matrix here")
    c.add_argument("--plots", help="write PNG figures to this (new) folder")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --csv/--csv-matrix file or --plots folder")
    add_quiet(c)


def run_compare(args) -> None:
    compare_vectors(args.vectors, csv=args.csv, csv_matrix=args.csv_matrix, plots=args.plots,
                    overwrite=args.overwrite)


def compare_vectors(paths, csv=None, csv_matrix=None, plots=None, overwrite: bool = False) -> None:
    """Print the cosine matrix of the vectors at ``paths`` and each one's norm by layer; write the tidy per-tensor
    table (``csv``), the cosine matrix (``csv_matrix``) and the figures (``plots``, a new folder) where asked.
    A merge's output folder among ``paths`` is read as merged − base (``model_merge.named_sources``).

    Every output path is checked before the pass over the vectors, not after it."""
    import pandas as pd

    from chatvec_lab import plots as figures
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.model_merge import named_sources
    from chatvec_lab.io.output import atomic_file, atomic_folder, check_output_path, check_separate_outputs

    vectors = named_sources(paths)
    inputs = [p for v in vectors.values() for p in v.input_paths()]
    outputs = [(out, flag, folder) for out, flag, folder in (
        (csv, "--csv", False), (csv_matrix, "--csv-matrix", False), (plots, "--plots", True)) if out]
    for out, flag, folder in outputs:  # before the pass, not after
        check_output_path(out, overwrite, inputs, folder=folder, flag=flag)
    check_separate_outputs([(out, flag) for out, flag, _ in outputs])
    stats = geometry.vector_stats(vectors)
    cos = geometry.cosine_matrix(stats)
    with pd.option_context("display.width", 160, "display.precision", 4):
        print("cosine similarity:")
        print(cos.to_string())
        print("\nnorm of each vector by layer:")
        print(geometry.layer_norms(stats).to_string())
    if csv or csv_matrix:
        print()
    if csv:
        with atomic_file(csv, overwrite, inputs) as tmp:
            geometry.tidy_table(stats).to_csv(tmp, index=False)
        print(f"wrote {csv} (one row per tensor and vector, and per tensor and vector pair)")
    if csv_matrix:
        with atomic_file(csv_matrix, overwrite, inputs) as tmp:
            cos.to_csv(tmp)
        print(f"wrote {csv_matrix}")
    if plots:
        with atomic_folder(plots, overwrite, inputs) as tmp:
            written = figures.save_compare_plots(stats, tmp)
        print(f"wrote {len(written)} figures to {plots}")


COMMANDS = {
    "extract": Command("build a chat vector: chat − base", extract_arguments, run_extract),
    "apply": Command("target + Σ alpha·vector, written as a new model folder", apply_arguments, run_apply),
    "info": Command("what a vector or checkpoint holds", info_arguments, run_info),
    "compare": Command("cosine similarity and per-layer norms of vectors", compare_arguments, run_compare),
}
