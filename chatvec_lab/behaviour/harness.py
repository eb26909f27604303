"""Benchmarks of ``target + α·vector`` through EleutherAI's lm-evaluation-harness, one α at a time, in place.

    from chatvec_lab import evaluate_harness, toy
    df = evaluate_harness(toy.path("cp"), cv, [0, 0.5, 1], ["chatvec_toy_de_en"])
    plots.plot_eval(df)                                  # from chatvec_lab import plots

The target is loaded once and wrapped in a ``LiveModel``; at each α its weights are rewritten in place (exactly
``chatvec apply`` at that α, without writing a checkpoint) and the harness evaluates that same model object
through its own model interface (``lm_eval.models.huggingface.HFLM``) and ``lm_eval.simple_evaluate``. The
metrics and their standard errors are the harness's, unchanged: this module only collects them into one tidy
table, a row per (task, metric, α): ``task``, ``metric``, ``alpha`` (``alpha_<name>`` per vector too when there
are several), ``value``, ``stderr``.

Tasks are any the harness knows (its own, e.g. ``hellaswag``, fetched from the hub), YAML files or folders of
``include_path``, and the tasks shipped with the lab (``resources.harness_task_dir()``; they read a local file
through :func:`local_dataset`, so they run offline). The harness is an optional dependency
(``pip install 'chatvec_lab[eval]'``), imported only when a function here needs it.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from chatvec_lab.errors import ChatVecError, NotFound, Unavailable, UnknownName, UsageError, clip
from chatvec_lab.io.formats import check_yaml_folder
from chatvec_lab.io.signals import received_signal

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("task", "metric", "alpha", "value", "stderr")
INSTALL = "chatvec eval needs lm-eval: pip install 'chatvec_lab[eval]'"


def harness():
    """The ``lm_eval`` package, or an ``Unavailable`` error that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (its import fails where transformers does not fit)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"{INSTALL} ({e})") from None
    return lm_eval


def local_dataset(data_files=None, config_source=None, **_):
    """The ``custom_dataset`` of a task shipped with the lab: ``data_files`` (``{split: file}``, JSONL, one object a
    line) read from beside the task's YAML (``config_source``, which the harness passes), held in memory: no
    network, no cache. In the YAML::

        custom_dataset: !function chatvec_lab.behaviour.harness.local_dataset
        dataset_kwargs:
          data_files: {test: items.jsonl}
    """
    import datasets

    if not isinstance(data_files, dict) or not data_files or config_source is None:
        raise UsageError("a local harness task needs dataset_kwargs: data_files: {split: file.jsonl} in its YAML")
    folder = Path(config_source).parent
    splits = {}
    for split, name in data_files.items():
        path = folder / name
        if not path.is_file():
            raise NotFound(f"harness task data {path} not found (named by {config_source})")
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{i}: expected one JSON object a line")
                rows.append(row)
        if not rows:
            raise UsageError(f"{path} holds no items")
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def _include_paths(include_path) -> list[Path]:
    from chatvec_lab.io.resources import harness_task_dir

    given = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    return [harness_task_dir(), *(check_yaml_folder(p, "include path (a folder of task YAML files)") for p in given)]


@contextlib.contextmanager
def _skipped_files(folders: list[Path]) -> Iterator[dict]:
    """``{yaml file: error}`` of the files in ``folders`` that the harness's task index skipped while the block ran
    (it logs each at debug level, "Skip FILE (ERROR)", and goes on): what is wrong with a task it then does not
    know. The log shows no more than it did."""
    skipped: dict = {}
    roots = [f.resolve() for f in folders]
    logger = logging.getLogger("lm_eval.tasks._index")
    level, shown = logger.level, logger.getEffectiveLevel()

    def note(record: logging.LogRecord) -> bool:
        if record.msg == "Skip %s (%s)" and isinstance(record.args, tuple) and len(record.args) == 2:
            path = Path(str(record.args[0])).resolve()
            if any(path == r or r in path.parents for r in roots):
                skipped[path] = record.args[1]
        return record.levelno >= shown

    logger.addFilter(note)
    logger.setLevel(logging.DEBUG)
    try:
        yield skipped
    finally:
        logger.setLevel(level)
        logger.removeFilter(note)


def _skipped_hint(skipped: dict) -> str:
    if not skipped:
        return ""
    said = [f"{path} ({type(err).__name__}: {clip(' '.join(str(err).split()), 201)})" for path, err in skipped.items()]
    return (f"; {len(said)} YAML file(s) of the include path could not be loaded: {'; '.join(said[:3])}"
            + (" …" if len(said) > 3 else ""))


def task_manager(tasks: Sequence[str], include_path=None):
    """A harness ``TaskManager`` that knows every task in ``tasks``: the lab's and ``include_path``'s alone when
    they hold them all (no scan of the harness's thousands of YAML files), else the harness's own as well.
    A name none of them knows is an ``UnknownName`` that names it (and the nearest known names, or the YAML files
    of ``include_path`` that the harness could not load, and why)."""
    harness()
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)

    def known(manager, name) -> bool:
        return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())

    with _skipped_files(paths[1:]) as skipped:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(known(local, t) for t in tasks):
        return local
    manager = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if not known(manager, t)]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else " (`lm-eval ls tasks` lists the harness's)"
        raise UnknownName(f"unknown harness task{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: not "
                          f"shipped with chatvec_lab or in an include path ({', '.join(local.all_tasks) or 'none'}), "
                          f"nor among lm-eval's {len(manager.all_tasks)}{hint}{_skipped_hint(skipped)}")
    return manager


@contextlib.contextmanager
def _task_errors(names: Sequence[str], doing: str):
    """An exception the harness raises while building or running ``names`` (a YAML key its ``TaskConfig`` does not
    know, a template naming a missing field, a ``!function`` that fails …) as one ``UsageError`` that names the
    task(s) and the exception. The lab's own errors, signals and running out of memory pass as they are."""
    import torch

    try:
        yield
    except ImportError as e:  # a package the task or its metric needs (sacrebleu, rouge …)
        raise Unavailable(f"harness task(s) {', '.join(names)} need a package this machine lacks: {e}") from None
    except (ChatVecError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)):
        raise
    except Exception as e:
        if received_signal():
            raise
        raise UsageError(f"harness task{'s' * (len(names) > 1)} {', '.join(names)} failed while {doing} "
                         f"(raised by lm-eval): {type(e).__name__}: {e}") from e


def load_tasks(manager, tasks: Sequence[str]) -> dict:
    """Build ``tasks`` once with ``manager`` (their data read or downloaded), one at a time: a task that cannot be
    built fails here, before a model loads, in one line that names it (a package it needs and this machine lacks
    is an ``Unavailable`` error). Returns ``manager.load``'s dict (``{"tasks": {name: task}, "groups": …}``)."""
    loaded: dict = {}
    for name in tasks:
        with _task_errors([name], "loading"):
            part = manager.load([name])
        for key, value in (part or {}).items():
            if isinstance(value, dict):
                loaded.setdefault(key, {}).update(value)
            else:
                loaded[key] = value
    return loaded


def _check_fewshot(loaded: dict, num_fewshot: int | None) -> None:
    """Refuse more few-shot examples than a loaded task has documents to draw them from (the harness would stop
    at the first item with "Sample larger than population"), before the model loads."""
    for name, task in (loaded.get("tasks") or {}).items():
        config = getattr(task, "config", None)
        default = getattr(config, "num_fewshot", None)
        shots = default if num_fewshot is None or default == 0 else num_fewshot  # the harness's own rule
        if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
            continue
        sampler = getattr(task, "sampler", None)
        pool = len(sampler.fewshot_docs()) if sampler is not None else 0
        if getattr(getattr(task, "fewshot_cfg", None), "split", None) == getattr(config, "test_split", None):
            pool = max(pool - 1, 0)  # the item itself is never its own example
        if shots > pool:
            asked = "--num-fewshot / num_fewshot asks" if shots == num_fewshot else "its YAML's num_fewshot asks"
            raise UsageError(f"harness task {name!r} has only {pool} document(s) to draw few-shot examples from; "
                             f"{asked} for {shots}")


def check_tasks(tasks) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]``: names (or YAML paths), each once; one clear line otherwise."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise UsageError(f"tasks must be harness task names (a list of str, or a comma-separated string), not "
                         f"{clip(repr(tasks), 81)}")
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise UsageError("no harness task given")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise UsageError(f"harness task {twice[0]!r} is given twice")
    return names


def check_limit(limit, name: str = "limit") -> int | float:
    """The one rule for ``limit`` (``evaluate_harness``) and ``--limit`` (``chatvec eval``): a whole number of items
    per task (``2.0`` is 2) or a fraction of each task below 1; anything else is a ``UsageError`` naming ``name``."""
    ok = (not isinstance(limit, bool) and isinstance(limit, numbers.Real) and math.isfinite(limit) and limit > 0
          and (limit < 1 or limit == int(limit)))
    if not ok:
        raise UsageError(f"{name} is a number of items per task (e.g. 50) or a fraction below 1 (e.g. 0.1), "
                         f"not {limit!r}")
    return int(limit) if limit >= 1 else float(limit)


def _check_settings(num_fewshot, batch_size, bootstrap_iters) -> None:
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise UsageError(f"num_fewshot must be a whole number ≥ 0, not {num_fewshot!r}")
    if batch_size is not None and batch_size != "auto" and (isinstance(batch_size, bool)
                                                            or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer or 'auto', not {batch_size!r}")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise UsageError(f"bootstrap_iters must be a whole number ≥ 0, not {bootstrap_iters!r}")


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # the harness writes "N/A" where it has no standard error
        return math.nan


def tidy_results(results: dict, point: dict[str, float]) -> list[dict]:
    """The rows of one ``simple_evaluate`` result at the coefficients ``point``: a row per task (or group) and
    metric. A metric computed under a filter other than ``none`` keeps the harness's name, ``metric,filter``."""
    names = list(point)
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filter_name = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row = {"task": task, "metric": metric if filter_name == "none" else key, "alpha": point[names[0]]}
            if len(names) > 1:
                row |= {f"alpha_{n}": point[n] for n in names}
            row["value"] = float(value)
            row["stderr"] = _number(metrics.get(f"{metric}_stderr,{filter_name}"))
            rows.append(row)
    return rows


@contextlib.contextmanager
def _hushed(progress: bool):
    """The harness's log at errors only (it warns about things chatvec chose: a model object, not a name);
    without ``progress`` its progress bars too (they write to stderr)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _without_run_record():
    """``simple_evaluate`` without the run record it adds to its results and this table drops: the git hash (a
    ``git`` subprocess, which prints "fatal: not a git repository" outside one) and the environment report (torch's
    ``collect_env``, seconds of subprocesses at every α). The evaluation itself is untouched."""
    from unittest import mock

    import lm_eval.evaluator as evaluator

    patches = [mock.patch.object(evaluator, name, replacement) for name, replacement in
               (("get_git_commit_hash", lambda: None), ("add_env_info", lambda storage: None))
               if callable(getattr(evaluator, name, None))]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


SETS = ("model", "tasks", "task_manager", "limit", "num_fewshot", "bootstrap_iters", "log_samples")


def _check_harness_kwargs(simple_evaluate, harness_kwargs: dict) -> None:
    """Refuse, before the model loads, a keyword that ``simple_evaluate`` does not take or that this module sets."""
    params = inspect.signature(simple_evaluate).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in harness_kwargs:
        if key in SETS:
            raise UsageError(f"evaluate_harness sets simple_evaluate's {key!r} itself: leave it out")
        if key not in params and not open_ended:
            near = difflib.get_close_matches(key, [*params, "tokenizer", "include_path", "device", "dtype",
                                                   "batch_size", "progress"], n=2)
            raise UsageError(f"unknown keyword argument {key!r}: evaluate_harness passes other keywords to "
                             f"lm_eval.simple_evaluate, which does not take it"
                             + (f"; did you mean {', '.join(near)}?" if near else ""))


def _named(vectors) -> dict:
    from chatvec_lab.core.vector import ChatVector, named_vectors

    one = (ChatVector, str, os.PathLike)
    if isinstance(vectors, one):
        vectors = {"chat": vectors}
    given = list(vectors.values()) if isinstance(vectors, Mapping) else vectors
    if not isinstance(given, (list, tuple)) or not all(isinstance(v, one) for v in given):
        raise UsageError(f"vectors must be a vector, a saved vector's folder, a list of them or {{name: vector}}, "
                         f"not {clip(repr(vectors), 81)}")
    return named_vectors(dict(vectors) if isinstance(vectors, Mapping) else vectors)


def _points(alphas, names: list[str]) -> list[dict[str, float]]:
    """``alphas`` as ``[{vector: α}]``, each point once (a point listed twice would be evaluated twice, to the
    same scores)."""
    from chatvec_lab.behaviour.sweep import check_alphas

    if isinstance(alphas, (numbers.Number, str, Mapping)) or alphas is None:
        alphas = [alphas]
    if not isinstance(alphas, Iterable):
        raise UsageError(f"alphas must be numbers or {{vector: α}} dicts, not {clip(repr(alphas), 81)}")
    points = [check_alphas([a], names)[0] for a in alphas]
    if not points:
        raise UsageError("no α given")
    for i, point in enumerate(points):
        if point in points[:i]:
            raise UsageError(f"α {_alpha_text(point)} is listed twice: each α is evaluated once (the harness gives "
                             "it the same scores again)")
    return points


def _alpha_text(point: dict[str, float]) -> str:
    return f"{next(iter(point.values())):g}" if len(point) == 1 else ", ".join(f"{k}={v:g}" for k, v in point.items())


def evaluate_harness(target, vectors, alphas, tasks, *, tokenizer=None, limit: float | None = None,
                     num_fewshot: int | None = None, include_path=None, device="auto", dtype="auto",
                     batch_size: int | str | None = None, bootstrap_iters: int = 100_000, progress: bool = True,
                     embeddings: str = "error", **harness_kwargs) -> pd.DataFrame:
    """Evaluate ``target + Σ αᵢ·vectorᵢ`` on harness ``tasks`` at each point of ``alphas``; the tidy table.

    ``target``: a model folder or hub id (loaded once, on ``device`` in ``dtype`` as ``sweep`` loads it), or a
    model (with ``tokenizer=``; left as it was found). ``vectors``: a vector, a saved vector's folder, or
    ``{name: vector}``; ``alphas``: numbers (the same α for every vector) or ``{name: α}`` dicts.
    ``tasks``: harness task names (or a comma-separated string); ``include_path``: folders of your own task
    YAML files. ``limit``: items per task (a fraction below 1: that share of each task); ``num_fewshot``: the
    harness's few-shot override; ``batch_size``: the harness's (None: ``"auto"`` on a GPU, 8 on a CPU);
    ``bootstrap_iters``: the harness's, for metrics whose standard error it bootstraps; ``embeddings``: as for
    ``LiveModel`` (``'skip'`` or ``'shared'`` where the vocabularies differ). Other keyword arguments
    go to ``lm_eval.simple_evaluate`` as they are (``apply_chat_template=True``, ``system_instruction=…``).

    Every α sees the same items and the same few-shot examples (the harness's fixed seeds). Columns:
    ``task``, ``metric``, ``alpha`` (the first vector's α), ``alpha_<name>`` per vector when there are several,
    ``value``, ``stderr`` (NaN where the harness gives none)."""
    import torch

    from chatvec_lab.behaviour.engines import load_target
    from chatvec_lab.core.live import LiveModel

    lm_eval = harness()
    from lm_eval.models.huggingface import HFLM

    names = check_tasks(tasks)
    limit = None if limit is None else check_limit(limit)
    _check_settings(num_fewshot, batch_size, bootstrap_iters)
    if embeddings not in ("error", "skip", "shared"):  # a live model keeps its vocabulary: no 'tokens' / 'union'
        raise UsageError(f"embeddings must be 'error', 'skip' or 'shared' (a live model), not "
                         f"{clip(repr(embeddings), 81)}")
    vectors = _named(vectors)
    points = _points(alphas, list(vectors))
    if isinstance(target, torch.nn.Module) and tokenizer is None:
        raise UsageError("pass tokenizer= with an in-memory model")
    _check_harness_kwargs(lm_eval.simple_evaluate, harness_kwargs)
    manager = task_manager(names, include_path)  # a task that does not exist fails before the model loads
    with _hushed(progress):
        loaded = load_tasks(manager, names)  # and so does one that cannot be built, or whose data is missing
    _check_fewshot(loaded, num_fewshot)
    if isinstance(target, torch.nn.Module):
        model, checkpoint = target, None
    else:
        with _hushed(progress):  # transformers' loading bar too
            model, tokenizer = load_target(target, device=device, dtype=dtype)
        checkpoint = target
    import pandas as pd

    live = LiveModel(model, vectors, embeddings=embeddings, checkpoint=checkpoint)
    try:
        with _hushed(progress), _without_run_record():
            if batch_size is None:
                batch_size = "auto" if next(model.parameters()).device.type == "cuda" else 8
            lm = HFLM(pretrained=live.model, tokenizer=tokenizer, batch_size=batch_size)
            rows = []
            for point in points:
                live.set(point)
                # the tasks are built afresh at each α (the harness's own set-up; their data is cached)
                with _task_errors(names, f"being evaluated at α {_alpha_text(point)}"):
                    results = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager,
                                                      limit=limit, num_fewshot=num_fewshot,
                                                      bootstrap_iters=bootstrap_iters, log_samples=False,
                                                      **harness_kwargs)
                rows += tidy_results(results or {}, point)
    finally:
        live.reset()  # the model holds the target's weights again, as it was found
    extra = [f"alpha_{n}" for n in vectors] if len(vectors) > 1 else []
    return pd.DataFrame(rows, columns=["task", "metric", "alpha", *extra, "value", "stderr"])
