"""Coefficient sweeps: generate and score replies for ``target + α·vector`` over a grid of α.

    df = sweep(toy.path("cp"), cv, [0, 0.5, 1.0], prompts, seeds=3)
    plots.plot_scores(df, ["ended_turn", "share_de"])   # from chatvec_lab import plots

One tidy DataFrame: a row per (coefficient, prompt, seed) with the reply and every score. Results
are cached on disk by their inputs, so re-running a notebook does not regenerate.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from chatvec_lab.errors import ChatVecError, ChatVecWarning, NotFound, UsageError, one_line
from chatvec_lab.behaviour.engines import EngineSpec, TransformersEngine, load_target, runtime_key
from chatvec_lab.analysis.intervals import estimate, metric_kind, wilson_interval  # noqa: F401 (wilson_interval: re-exported)
from chatvec_lab.behaviour.cache import CellCache, check_cache_dir, files_key, read_table, vector_key, write_table
from chatvec_lab.behaviour.grid import check_seeds, CellRunner, GridSettings, LocalExecutor, make_cells, run_grid
from chatvec_lab.core.live import LiveModel
from chatvec_lab.core.plan import check_alpha
from chatvec_lab.io.output import atomic_file, check_clear_of_inputs, check_output_path, check_separate_outputs
from chatvec_lab.core.vector import ChatVector, named_vectors

DEFAULT_SCORERS = ("ended_turn", "language", "refusal", "offensive")
METRIC_LABELS = {
    "ended_turn": "turn-end rate",
    "share_de": "German share of reply words",
    "refusal": "refusal rate",
    "offensive": "offensive-language probability (alt-profanity-check; English replies only)",
    "toxicity": "Detoxify toxicity",
    "reply_tokens": "reply length (tokens)",
    "ppl_en": "perplexity, English held-out",
    "ppl_de": "perplexity, German held-out",
}


def read_prompts(path) -> list[str]:
    """One prompt a line (``.txt`` and others), or JSONL with a string ``prompt`` field (``.jsonl``).

    Lines end at ``\n`` only (a U+2028 or form feed inside a prompt stays in it); a UTF-8 byte-order mark is
    dropped; blank lines are skipped."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder: the prompts are a file (one prompt a line, or JSONL)")
    if not path.is_file():
        raise NotFound(f"prompt file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); save the prompts as UTF-8") from None
    prompts = []
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
                item = None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                raise UsageError(f"{path}:{i}: expected a JSON object with a non-empty string 'prompt' field")
            prompts.append(item["prompt"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def check_alphas(alphas, names: Sequence[str]) -> list[dict[str, float]]:
    """Normalise to a list of ``{vector: α}``; one clear error for anything that is not a finite number."""
    if isinstance(alphas, (numbers.Number, str)) or alphas is None:
        alphas = [alphas]
    out = []
    for c in alphas:
        point = c if isinstance(c, Mapping) else {n: c for n in names}
        clean = {}
        for name, value in point.items():
            if name not in names:
                raise UsageError(f"α for unknown vector {name!r}; vectors are {list(names)}")
            clean[name] = check_alpha(value)
        out.append({n: clean.get(n, 0.0) for n in names})
    if not out:
        raise UsageError("no α values to sweep")
    seen = set()
    for point in out:
        key = tuple(point.items())
        if key in seen:
            raise UsageError(f"α {point} is given twice: its replies would be pooled as if independent, "
                             "narrowing the intervals (use more seeds for more replies)")
        seen.add(key)
    return out


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _model_fingerprint(target) -> object:
    if isinstance(target, (str, Path)):
        return files_key([Path(target)])
    return None


def check_coefficients(alphas, names: Sequence[str]) -> list[dict[str, float]]:
    """Deprecated spelling of :func:`check_alphas`."""
    warnings.warn("check_coefficients is now check_alphas", DeprecationWarning, stacklevel=2)
    return check_alphas(alphas, names)


def sweep(target, vectors, alphas=None, prompts: Sequence[str] | None = None, *, tokenizer=None, scorers=DEFAULT_SCORERS,
          seeds: int | Sequence[int] = 1, max_new_tokens: int = 64, language: str = "de",
          heldout: Mapping[str, Sequence[str]] | None = None, cache_dir=None, progress: bool = True,
          live: LiveModel | None = None, executor=None, device="auto", dtype="auto", batch_size: int | None = None,
          **gen_kwargs) -> pd.DataFrame:
    """Generate and score at every α (or ``{vector: α}``); returns the tidy table.

    ``target``: a model folder (loaded once) or a model (with ``tokenizer=``); ``vectors``: a vector or
    ``{name: vector}``; ``alphas``: numbers (the same α for every vector) or ``{name: α}`` dicts;
    ``heldout``: ``{language: texts}`` for perplexity columns ``ppl_<language>``. ``executor``: where the
    grid's cells run (``grid.LocalExecutor``, the default, or ``grid.RayExecutor``; see ``grid``); with
    ``cache_dir`` each finished cell is kept there, so an interrupted sweep resumes with the missing cells.
    ``device`` / ``dtype``: where and in which precision a target folder is loaded (``auto``: the GPU if there is
    one, and the checkpoint's own dtype; see ``chatvec_lab.io.devices``); cached results are kept per device kind
    and dtype. ``batch_size``: prompts generated together (None: every prompt of a cell, up to a memory-aware cap;
    replies do not depend on it in float32, see ``generation.generate``).
    The model is left exactly as it was found.
    """
    if "coefficients" in gen_kwargs:  # the old spelling, kept for one release
        if alphas is not None:
            raise UsageError("give alphas= only (coefficients= is its old name)")
        warnings.warn("sweep(coefficients=...) is now sweep(alphas=...)", DeprecationWarning, stacklevel=2)
        alphas = gen_kwargs.pop("coefficients")
    if alphas is None or prompts is None:
        raise UsageError("sweep needs alphas and prompts: sweep(target, vectors, alphas, prompts, ...)")
    prompts = [p for p in prompts]
    if not prompts:
        raise UsageError("the prompt list is empty")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("every prompt must be a non-empty string")
    if isinstance(vectors, (ChatVector, str, Path)):
        vectors = {"chat": vectors}
    vectors = named_vectors(vectors)
    points = check_alphas(alphas, list(vectors))
    seed_list = check_seeds(seeds)  # a count of 1.. or distinct seeds in [0, 2**63): one clear line otherwise
    scorer_names = [s if isinstance(s, str) else s.name for s in scorers]

    cache_file = None
    if cache_dir is not None:
        check_cache_dir(cache_dir, [*([Path(target)] if isinstance(target, (str, Path)) else []),
                                    *(p for v in vectors.values() for p in v.input_paths())])
    key_target = _model_fingerprint(target)
    runtime = runtime_key(target, live, device, dtype)  # a device this machine lacks is refused here, before any work
    if cache_dir is not None and key_target is not None:
        key = _fingerprint({"target": key_target, "vectors": {k: vector_key(v) for k, v in vectors.items()},
                            "points": points, "prompts": prompts, "scorers": scorer_names, "seeds": seed_list,
                            "max_new_tokens": max_new_tokens, "language": language, "heldout": heldout,
                            "gen": gen_kwargs, "runtime": runtime, "version": 3})
        cache_file = Path(cache_dir) / f"sweep-{key}.json"
        cached = read_table(cache_file)
        if cached is not None and len(cached) == len(points) * len(seed_list) * len(prompts):
            return cached

    settings = GridSettings(tuple(prompts), tuple(scorer_names), max_new_tokens, language,
                            tuple((k, tuple(v)) for k, v in (heldout or {}).items()), tuple(gen_kwargs.items()))
    cells = make_cells(points, seed_list)
    cell_cache = None
    if cache_dir is not None and key_target is not None:
        cell_cache = CellCache(cache_dir, {"target": key_target, "vectors": {k: vector_key(v) for k, v in vectors.items()},
                                           "runtime": runtime, **settings.key()}, prompts)
    executor = executor if executor is not None else LocalExecutor()
    engine, saved = None, {}

    def make_runner() -> CellRunner:  # the local executor's runner: the model already here, or loaded once
        nonlocal engine, saved, live, tokenizer
        if live is None:
            if isinstance(target, (str, Path)):
                model, tokenizer = load_target(target, device=device, dtype=dtype)
            else:
                model = target
            live = LiveModel(model, vectors, checkpoint=target if isinstance(target, (str, Path)) else None)
        engine = TransformersEngine(live.model, tokenizer, live=live, batch_size=batch_size)
        saved = dict(live.alphas)
        return CellRunner(engine, settings, scorers=list(scorers))

    if live is None and not isinstance(target, (str, Path)) and tokenizer is None:
        raise UsageError("pass tokenizer= with an in-memory model")
    if live is not None and tokenizer is None:
        raise UsageError("pass tokenizer= with a LiveModel")
    spec = None
    if not isinstance(executor, LocalExecutor):
        if live is not None or not isinstance(target, (str, Path)):
            raise UsageError("a distributed sweep loads the model in each worker: give the target as a folder or hub id")
        if any(not isinstance(sc, str) for sc in scorers):
            raise UsageError("a distributed sweep builds its scorers in each worker: give scorers by name")
        spec = EngineSpec.of(target, vectors, device=device, dtype=dtype, batch_size=batch_size)
    try:
        result = run_grid(executor, make_runner, spec, settings, cells, cache=cell_cache, progress=progress)
    finally:
        if engine is not None:
            engine.set_alphas(saved)  # the model is left exactly as it was found
    for lang, _ in settings.heldout:  # measured once per point (its first seed): every row of the point shows it
        column = f"ppl_{lang}"
        result[column] = result.groupby([f"alpha_{n}" for n in vectors], sort=False)[column].transform("first")
    if cache_file is not None and not (cell_cache is not None and cell_cache.failed):
        try:  # concurrent runs write the same content: whichever is last replaces it whole
            write_table(cache_file, result)
        except (ChatVecError, OSError) as e:  # the cache saves time; the table is the result
            warnings.warn(f"the sweep's table could not be cached ({one_line(e)})", ChatVecWarning, stacklevel=2)
    return result


def summarize(df: pd.DataFrame, metrics: Sequence[str] | None = None, by: str | Sequence[str] = "alpha",
              cluster: str | None = "prompt") -> pd.DataFrame:
    """Mean and 95% interval (``<metric>_lo``, ``<metric>_hi``) of each metric per coefficient (or per ``by``).

    The intervals come from ``chatvec_lab.analysis.intervals`` (its docstring has the reasons):

    * a **rate** — one 0/1 outcome per reply: ``ended_turn``, ``refusal``, or any column whose values are all
      0/1 or booleans — gets the **Wilson score interval**, which never leaves [0, 1] and keeps a width at
      0/n and n/n (a normal approximation gives 7/8 an upper bound above 1 and 0/8 a zero-width interval);
    * replies to one prompt under several seeds are not independent: with ``cluster="prompt"`` (the default,
      when the table has that column) Wilson runs on the effective number of replies, n divided by the
      design effect of the prompts (between 1 and the seeds per prompt), and the other metrics use a
      cluster-robust standard error with t on (prompts − 1) degrees of freedom; ``cluster=None`` treats every
      reply as independent;
    * any other metric gets mean ± t·SE, clipped to [0, 1] for one bounded there (``share_*``, classifier
      probabilities such as ``offensive``); from a single value (or a single prompt) the interval is NaN.

    Whether a metric is a rate is decided on the whole column (``intervals.metric_kind``), so every group's
    interval is of the same kind. Columns: ``by``, ``n`` (rows in the group), then per metric its mean,
    ``_lo`` and ``_hi``."""
    metrics = metrics or [m for m in METRIC_LABELS if m in df.columns]
    kinds = {m: metric_kind(m, df[m]) for m in metrics}
    clustered = cluster is not None and cluster in df.columns
    rows = []
    for key, group in df.groupby(by, sort=True):
        row = dict(zip([by] if isinstance(by, str) else by, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(group)
        for m in metrics:
            mean, lo, hi = estimate(group[m], kinds[m], group[cluster] if clustered else None)
            row[m] = mean
            row[f"{m}_lo"], row[f"{m}_hi"] = lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def run_sweep_cli(args, executor=None) -> None:
    from chatvec_lab.io.output import source_paths
    from chatvec_lab.io.sources import open_weights

    inputs = [*source_paths(open_weights(args.target)), Path(args.prompts),
              *(p for v in args.vector for p in ChatVector.load(v).input_paths())]
    check_output_path(args.csv, args.overwrite, inputs, folder=False, flag="--csv")  # before the sweep's work
    check_separate_outputs([(args.csv, "--csv"), (args.cache_dir, "--cache-dir")])
    if args.cache_dir:
        check_clear_of_inputs(args.cache_dir, inputs)
    prompts = read_prompts(args.prompts)
    vectors = named_vectors(args.vector)
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    df = sweep(args.target, vectors, args.alphas, prompts, scorers=scorers, seeds=args.seeds,
               max_new_tokens=args.max_new_tokens, language=args.language, cache_dir=args.cache_dir,
               progress=not args.quiet, executor=executor, device=getattr(args, "device", "auto"),
               dtype=getattr(args, "dtype", "auto"), batch_size=getattr(args, "batch_size", None))
    out = Path(args.csv)
    with atomic_file(out, args.overwrite, inputs) as tmp:
        df.to_csv(tmp, index=False)
    with pd.option_context("display.width", 160):
        print(summarize(df)[["alpha", "n"] + [m for m in METRIC_LABELS if m in df.columns]].to_string(index=False))
    print(f"wrote {out} ({len(df)} rows)")
