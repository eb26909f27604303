"""The ``chatvec`` commands on behaviour: ``sweep`` (generate and score replies over α values) and ``atlas``
(where a vector's behaviour lives: keep-only and knock-out per layer × module; a low-rank curve; interference
and merges with a second vector).

Each command is a pair: ``*_arguments`` adds its flags to its parser, ``run_*`` calls the library with them.
``COMMANDS`` lists them for ``chatvec_lab.cli``.
"""
from __future__ import annotations

from pathlib import Path

from chatvec_lab.cli.arguments import (Command, add_device_options, add_quiet, add_ray_options, alpha_list,
                                       make_executor, max_new_tokens, one_number, rank_list, seed_count)
from chatvec_lab.errors import ChatVecError

# ---------------------------------------------------------------------------------------------- sweep


def sweep_arguments(s) -> None:
    s.add_argument("--target", required=True)
    s.add_argument("--vector", action="append", required=True)
    s.add_argument("--alphas", type=alpha_list, default=[0.0, 0.5, 1.0])
    s.add_argument("--prompts", required=True, help="one prompt a line, or JSONL with a 'prompt' field")
    s.add_argument("--scorers", default="ended_turn,language,refusal,offensive",
                   help="comma-separated: ended_turn, language, refusal, offensive, detoxify")
    s.add_argument("--seeds", type=seed_count, default=1, help="number of sampling seeds")
    s.add_argument("--max-new-tokens", type=max_new_tokens, default=64)
    s.add_argument("--language", default="de", help="the new language's code, for the language share")
    s.add_argument("--csv", required=True)
    s.add_argument("--cache-dir", help="reuse results cached here")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    add_device_options(s)
    add_quiet(s)
    add_ray_options(s)


def run_sweep(args) -> None:
    from chatvec_lab.behaviour.sweep import run_sweep_cli

    run_sweep_cli(args, executor=make_executor(args.ray, args.actors, args.threads_per_actor, args.gpus_per_actor))


# ---------------------------------------------------------------------------------------------- atlas


def atlas_arguments(t) -> None:
    t.add_argument("--target", required=True)
    t.add_argument("--vector", required=True,
                   help="a saved vector (chatvec extract), or a merge's output folder (read as merged − base)")
    t.add_argument("--prompts", required=True, help="one prompt a line, or JSONL with a 'prompt' field")
    t.add_argument("-o", "--out", required=True, help="a new folder: atlas.csv, summary.csv, rankings, heatmaps")
    t.add_argument("--alphas", type=alpha_list, default=[1.0], help="grid α values besides the norm-matched one")
    t.add_argument("--seeds", type=seed_count, default=1, help="number of sampling seeds")
    t.add_argument("--max-new-tokens", type=max_new_tokens, default=64)
    t.add_argument("--language", default="de")
    t.add_argument("--quick", action="store_true", help="8 prompts")
    t.add_argument("--ranks", type=rank_list, help="also a low-rank curve: these ranks of every matrix, e.g. 1,4,16,64")
    t.add_argument("--second-vector", help="also interference with this vector and merges of the two (each method)")
    t.add_argument("--density", type=one_number, default=0.2, help="TIES' trim density for the interference table")
    t.add_argument("--skip-map", action="store_true", help="no layer × module map (only --ranks / --second-vector)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_device_options(t)
    add_quiet(t)
    add_ray_options(t)


def run_atlas(args) -> None:
    atlas_study(args.target, args.vector, args.prompts, args.out, alphas=args.alphas, seeds=args.seeds,
                max_new_tokens=args.max_new_tokens, language=args.language, quick=args.quick, ranks=args.ranks,
                second_vector=args.second_vector, density=args.density, skip_map=args.skip_map,
                overwrite=args.overwrite, quiet=args.quiet, ray=args.ray, actors=args.actors,
                threads_per_actor=args.threads_per_actor, gpus_per_actor=args.gpus_per_actor, device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size)


def atlas_study(target, vector_path, prompts_path, out, alphas=None, seeds: int = 1, max_new_tokens: int = 64,
                language: str = "de", quick: bool = False, ranks=None, second_vector=None, density: float = 0.2,
                skip_map: bool = False, overwrite: bool = False, quiet: bool = False, ray=None, actors: int = 2,
                threads_per_actor: int = 1, gpus_per_actor: float = 0.0, device="auto", dtype="auto",
                batch_size: int | None = None) -> None:
    """The atlas of the vector saved at ``vector_path`` on ``target`` (the prompts of ``prompts_path``), into the new
    folder ``out``: the layer × module map (``behaviour.atlas``; unless ``skip_map``), a low-rank curve at ``ranks``,
    and with ``second_vector`` the interference of the two vectors and their merges by each method
    (``behaviour.ablations``). Tables as CSV, figures as PNG; a short summary of each is printed.

    ``device`` / ``dtype``: where and in which precision the target runs (``auto``: a GPU if there is one, the
    checkpoint's own dtype); ``batch_size``: prompts generated together (None: a memory-aware default).

    Settings are checked, and the output path too, before any reply is generated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chatvec_lab import plots
    from chatvec_lab.analysis.interference import interference
    from chatvec_lab.behaviour.ablations import merge_sweep, rank_curve, summarize
    from chatvec_lab.behaviour.atlas import atlas, rank_cells, summarize_atlas
    from chatvec_lab.behaviour.sweep import load_target, read_prompts
    from chatvec_lab.core.model_merge import is_merge_output, merged_vector, named_sources
    from chatvec_lab.core.vector import ChatVector
    from chatvec_lab.io.output import atomic_folder, check_output_path, source_paths
    from chatvec_lab.io.sources import open_weights

    if skip_map and not (ranks or second_vector):
        raise ChatVecError("--skip-map leaves nothing to do: add --ranks and/or --second-vector")
    alphas = [1.0] if alphas is None else alphas
    vector = merged_vector(vector_path) if is_merge_output(vector_path) else ChatVector.load(vector_path)
    second = names = None
    if second_vector:
        from chatvec_lab.core.merge import METHODS
        from chatvec_lab.core.transforms import check_settings
        from chatvec_lab.core.vector import check_compatible

        check_settings(density)  # before the work, not after it
        names = named_sources([vector_path, second_vector])  # the same folder twice is refused here
        names = {(f"{k} (source)" if k in METHODS else k): v for k, v in names.items()}
        second = list(names.values())[1]
        check_compatible(vector, second)
    inputs = [*source_paths(open_weights(target)), Path(prompts_path), *vector.input_paths(),
              *(second.input_paths() if second else [])]
    check_output_path(out, overwrite, inputs)  # before the work, not after
    prompts = read_prompts(prompts_path)
    if quick:
        prompts = prompts[:8]
    executor = make_executor(ray, actors, threads_per_actor, gpus_per_actor)
    if executor is not None and (ranks or second is not None):
        raise ChatVecError("--ray runs the layer × module map; leave out --ranks / --second-vector, or --ray")
    model, tokenizer = load_target(target, device=device, dtype=dtype) if executor is None else (target, None)
    common = dict(tokenizer=tokenizer, seeds=seeds, max_new_tokens=max_new_tokens, language=language,
                  progress=not quiet, batch_size=batch_size)
    tables, figures = {}, {}
    if not skip_map:
        df = atlas(model, vector, prompts, alphas=alphas, executor=executor, device=device, dtype=dtype, **common)
        s = summarize_atlas(df)
        tables |= {"atlas.csv": df, "summary.csv": s}
        for design in ("keep-only", "knock-out"):
            tables[f"ranking-{design}.csv"] = rank_cells(s, design=design)
            for metric in ("ended_turn", "share_de"):
                figures[f"atlas-{design}-{metric}.png"] = plots.plot_atlas(s, metric, design, "norm-matched")
        print(rank_cells(s).head(10).to_string(index=False))
    if ranks:
        curve = rank_curve(model, vector, ranks, prompts, alphas=alphas, **common)
        rs = summarize(curve)
        tables |= {"rank-curve.csv": curve, "rank-summary.csv": rs}
        for alpha in alphas:
            for x in ("rank", "stored_bytes"):
                figures[f"rank-curve-{x}-alpha{alpha:g}.png"] = plots.plot_rank_curve(rs, x=x, alpha=alpha)
        print(rs[[c for c in rs.columns if not c.endswith(("_lo", "_hi"))]].round(3).to_string(index=False))
    if second is not None:
        conflicts = interference(vector, second, density=density)
        merges = merge_sweep(model, names, prompts, alphas=alphas, **common)
        ms = summarize(merges)
        tables |= {"interference.csv": conflicts, "merges.csv": merges, "merge-summary.csv": ms}
        figures["interference.png"] = plots.plot_interference(conflicts, "trimmed_conflict")
        figures["merges.png"] = plots.plot_merges(ms, "ended_turn")
        print(ms[[c for c in ms.columns if not c.endswith(("_lo", "_hi"))]].round(3).to_string(index=False))
    with atomic_folder(out, overwrite, inputs=inputs) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / name, index=False)
        for name, fig in figures.items():
            fig.savefig(tmp / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
    print(f"wrote {out} ({', '.join(tables)})")


COMMANDS = {
    "sweep": Command("generate and score replies over α values", sweep_arguments, run_sweep),
    "atlas": Command("map where a vector's behaviour lives: keep-only and knock-out per layer × module",
                     atlas_arguments, run_atlas),
}
