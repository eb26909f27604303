"""A sweep as a grid of independent cells, run here or on Ray, with nothing lost.

A cell is one coefficient point × one sampling seed over all prompts (the same batches as a local run, so
the same numerics). ``CellRunner`` turns a cell into rows (generate, score, perplexity); an executor decides
where runners live:

- ``LocalExecutor`` (the default): one runner in this process, cells in order;
- ``RayExecutor``: one runner per Ray actor, each built from an ``EngineSpec`` (paths only: every actor
  opens the target and the vectors itself, once) and moved between cells by in-place coefficient changes.
  An actor that dies has its cell given to another (a fresh one if needed); each cell's rows are kept
  once, whoever finished it.

With ``cache_dir``, each finished cell is written there at once (``cells/cell-<key>.json``, the key a hash of
everything the cell's rows depend on: :mod:`chatvec_lab.behaviour.cache`), so a grid interrupted as a whole
resumes with the missing cells only.
"""
from __future__ import annotations

import math
import numbers
import warnings
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import pandas as pd

from chatvec_lab.behaviour.cache import CellCache
from chatvec_lab.behaviour.scoring import RECORDED, check_language, make_scorer, score_all
from chatvec_lab.core.plan import Cell, cell_coefficient
from chatvec_lab.errors import ChatVecWarning, Unavailable, UsageError
from chatvec_lab.io.signals import check_interrupted


@dataclass(frozen=True)
class GridCell:
    """One cell of the grid: a coefficient point × a sampling seed (× a region, for the atlas)."""
    index: int
    point: tuple[tuple[str, float], ...]  # ((vector name, α), …)
    seed: int
    perplexity: bool  # the point's first seed also measures held-out perplexity
    region: tuple | None = None  # an atlas cell: (design, row, module); the point's α applies by design

    @property
    def alphas(self) -> dict:
        """``{vector name: α}`` as the model is set for this cell (an atlas cell's α applies by design)."""
        if self.region is None:
            return dict(self.point)
        design, row, module = self.region
        cell = Cell(row, module) if row is not None else None
        return {name: cell_coefficient(cell, design, alpha) for name, alpha in self.point}


@dataclass(frozen=True)
class GridSettings:
    """Everything but the model that a cell's rows depend on (picklable: shipped to each worker once)."""
    prompts: tuple[str, ...]
    scorers: tuple[str, ...]
    max_new_tokens: int
    language: str
    heldout: tuple[tuple[str, tuple[str, ...]], ...] = ()
    gen_kwargs: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):  # checked before any model loads
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) \
                or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if "language" in self.scorers:
            check_language(self.language)

    def key(self) -> dict:
        return {"prompts": list(self.prompts), "scorers": list(self.scorers), "max_new_tokens": self.max_new_tokens,
                "language": self.language, "heldout": [[k, list(v)] for k, v in self.heldout],
                "gen": [list(kv) for kv in self.gen_kwargs]}


MAX_SEEDS = 100_000
SEED_LIMIT = 2**63  # a seed is stored in an int64 column (and torch seeds with 64 bits)


def check_seeds(seeds) -> list[int]:
    """The sampling seeds of a grid: a count (``3`` → seeds 0, 1, 2; 1 to ``MAX_SEEDS``) or a list of distinct
    integers in [0, 2⁶³). Anything else is a one-line UsageError, before any work."""
    import numbers

    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if not 1 <= seeds <= MAX_SEEDS:
            raise UsageError(f"seeds={seeds} is a number of sampling seeds: give 1 to {MAX_SEEDS:,}, or a list of "
                             "seeds such as [0, 7]")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes, bool, float, Mapping)) or not hasattr(seeds, "__iter__"):
        raise UsageError(f"seeds must be a number of seeds or a list of integer seeds, not {seeds!r}")
    out = []
    for s in seeds:
        if not isinstance(s, numbers.Integral) or isinstance(s, bool) or not 0 <= s < SEED_LIMIT:
            raise UsageError(f"seed {s!r} is not an integer in [0, 2**63): seeds are 0, 1, 2 … (any such integer)")
        if int(s) in out:
            raise UsageError(f"seed {int(s)} is given twice: each seed's replies would count twice")
        out.append(int(s))
        if len(out) > MAX_SEEDS:
            raise UsageError(f"more than {MAX_SEEDS:,} seeds")
    if not out:
        raise UsageError("the list of seeds is empty")
    return out


def make_cells(points: Sequence[Mapping[str, float]], seeds: Sequence[int]) -> list[GridCell]:
    cells = []
    for point in points:
        for j, seed in enumerate(seeds):
            cells.append(GridCell(len(cells), tuple(point.items()), int(seed), perplexity=j == 0))
    return cells


class CellRunner:
    """Turns cells into rows on one engine; the scorers are built once per runner."""

    def __init__(self, engine, settings: GridSettings, scorers: Sequence | None = None):
        self.engine, self.settings = engine, settings
        wanted = scorers if scorers is not None else settings.scorers
        self.scorers = [make_scorer(s, language=settings.language) if isinstance(s, str) else s
                        for s in wanted if s not in ("turn_end", *RECORDED)]  # recorded by generation itself

    def run(self, cell: GridCell) -> pd.DataFrame:
        s = self.settings
        self.engine.set_alphas(cell.alphas)
        gen = self.engine.generate(list(s.prompts), seed=cell.seed, max_new_tokens=s.max_new_tokens,
                                   **dict(s.gen_kwargs))
        df = pd.concat([gen.reset_index(drop=True), score_all(gen["reply"].tolist(), self.scorers)], axis=1)
        for name, value in cell.point:
            df.insert(0, f"alpha_{name}", value)
        df.insert(0, "alpha", cell.point[0][1])
        live = getattr(self.engine, "live", None)
        if cell.region is not None and live is not None:
            df.insert(0, "rewritten_tensors", live.rewritten)  # what the move to this cell cost
        if cell.perplexity:
            for lang, texts in s.heldout:
                df[f"ppl_{lang}"] = self.engine.perplexity(list(texts))
        df["cell"] = cell.index
        return df



@dataclass
class Progress:
    """One bar over the whole grid: cells done / total, replies per second."""
    total: int
    enabled: bool = True
    replies: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, desc="grid", unit="cell", disable=not self.enabled)

    def done(self, rows: int) -> None:
        self.replies += rows
        rate = self.replies / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} replies/s", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class LocalExecutor:
    """Cells in order, in this process, on one runner."""

    def run(self, make_runner: Callable[[], CellRunner], spec, settings: GridSettings, cells: list[GridCell],
            on_result: Callable[[GridCell, pd.DataFrame], None]) -> None:
        runner = make_runner()
        for cell in cells:
            check_interrupted()  # between cells: a signal whose exception was lost stops the grid here
            on_result(cell, runner.run(cell))


def _remote_runner_class():
    import ray

    @ray.remote
    class RemoteRunner:
        def __init__(self, spec, settings):
            self.runner = CellRunner(spec.open(), settings)

        def ready(self) -> bool:
            return True

        def resources(self) -> dict:
            return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}

        def run(self, cell):
            return self.runner.run(cell)

    return RemoteRunner


class RayExecutor:
    """Cells spread over ``actors`` Ray actors, one model each; a lost actor's cell goes to another.

    ``address``: None or "local" starts a Ray instance on this machine (``num_cpus``: its CPUs); otherwise
    the address of a running cluster ("auto", "ray://host:10001"). ``threads_per_actor``: torch threads in
    each actor. ``gpus_per_actor``: GPUs Ray gives each actor (a fraction shares one GPU between actors, e.g. 0.5;
    whole numbers above 1); each actor loads its model once, on its GPU (``device="auto"``). ``num_gpus``: GPUs of a
    local Ray instance (default: those it finds). ``on_result(cell, rows, actor_index)``: called as each cell
    finishes (progress, tests)."""

    def __init__(self, address: str | None = None, actors: int = 2, threads_per_actor: int | None = 1,
                 num_cpus: int | None = None, max_replacements: int = 3, on_result=None,
                 gpus_per_actor: float = 0, num_gpus: int | None = None):
        if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
            raise UsageError(f"actors must be a positive integer, not {actors!r}")
        if threads_per_actor is not None and (not isinstance(threads_per_actor, int) or isinstance(threads_per_actor, bool)
                                              or threads_per_actor < 1):
            raise UsageError(f"threads_per_actor must be a positive integer or None, not {threads_per_actor!r}")
        self.address, self.n_actors, self.threads = address, actors, threads_per_actor
        self.gpus = check_gpus_per_actor(gpus_per_actor)
        self.num_gpus = num_gpus
        self.assigned: list[dict] = []  # the resources Ray gave each actor (what it reported when it started)
        self.num_cpus, self.max_replacements, self.on_result = num_cpus, max_replacements, on_result
        self.actors: list = []
        self.replaced = 0

    def _init(self):
        try:
            import ray
        except ImportError:
            raise Unavailable("the Ray executor needs ray: pip install 'chatvec_lab[distributed]'") from None
        if not ray.is_initialized():
            if self.address in (None, "local"):
                ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        return ray

    def run(self, make_runner, spec, settings: GridSettings, cells: list[GridCell], on_result) -> None:
        if spec is None:
            raise UsageError("the Ray executor needs the target and vectors as folders or hub ids")
        ray = self._init()
        from dataclasses import replace

        spec = replace(spec, threads=self.threads or spec.threads)
        cpus = ray.cluster_resources().get("CPU", 0)
        if (self.threads or 1) > cpus:  # such an actor could never be placed: Ray would wait for ever
            raise Unavailable(f"an actor asks for {self.threads or 1} CPUs but the Ray cluster has {cpus:g}: "
                              "lower --threads-per-actor")
        n_actors = min(self.n_actors, len(cells))
        if self.gpus:
            if spec.device == "cpu":
                raise UsageError("--gpus-per-actor gives each actor a GPU: leave --device at auto (or cuda)")
            gpus = ray.cluster_resources().get("GPU", 0)
            if self.gpus > gpus:  # never placed: Ray would wait for ever
                raise Unavailable(f"an actor asks for {self.gpus:g} GPUs but the Ray cluster has {gpus:g}")
            if n_actors * self.gpus > gpus + 1e-9:
                n_actors = max(1, int(gpus / self.gpus + 1e-9))
                warnings.warn(f"{self.n_actors} actors × {self.gpus:g} GPUs is more than the cluster's {gpus:g}: "
                              f"running {n_actors}", ChatVecWarning, stacklevel=2)
        remote = _remote_runner_class().options(num_cpus=self.threads or 1, num_gpus=self.gpus)
        self.actors = [remote.remote(spec, settings) for _ in range(n_actors)]
        try:
            self.assigned = ray.get([actor.resources.remote() for actor in self.actors])
        except ray.exceptions.RayError:  # an actor that died starting: the loop below replaces it
            self.assigned = []
        queue = list(cells)
        running: dict = {}  # future → (cell, actor index)
        idle = list(range(len(self.actors)))
        try:
            while queue or running:
                while queue and idle:
                    i = idle.pop(0)
                    cell = queue.pop(0)
                    running[self.actors[i].run.remote(cell)] = (cell, i)
                ready, _ = ray.wait(list(running), num_returns=1)
                future = ready[0]
                cell, i = running.pop(future)
                try:
                    rows = ray.get(future)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                        ray.exceptions.ActorUnavailableError):
                    if self.replaced >= self.max_replacements:
                        raise Unavailable(f"Ray actors kept dying ({self.replaced} replaced); cell {cell.index} "
                                          "not run") from None
                    self.replaced += 1
                    self.actors[i] = remote.remote(spec, settings)  # a fresh actor in the dead one's place
                    queue.insert(0, cell)
                    idle.append(i)
                    continue
                on_result(cell, rows)
                if self.on_result is not None:
                    self.on_result(cell, rows, i)
                idle.append(i)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


def check_gpus_per_actor(value) -> float:
    """GPUs per Ray actor: 0 (none), a fraction in (0, 1] or a whole number, as Ray accepts them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
            or (value > 1 and value != int(value)):
        raise UsageError(f"gpus per actor must be 0, a fraction up to 1 (e.g. 0.5) or a whole number, not {value!r}")
    return float(value)


def run_grid(executor, make_runner, spec, settings: GridSettings, cells: list[GridCell],
             cache: CellCache | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every cell not already in ``cache``; returns all cells' rows in cell order, each cell once."""
    if not cells:
        raise UsageError("the grid has no cell to run: give at least one coefficient and one seed")
    results: dict[int, pd.DataFrame] = {}
    todo = []
    for cell in cells:
        cached = cache.get(cell) if cache is not None else None
        if cached is not None:
            results[cell.index] = cached
        else:
            todo.append(cell)
    bar = Progress(total=len(cells), enabled=progress)
    for df in results.values():
        bar.done(len(df))

    def keep(cell: GridCell, rows: pd.DataFrame) -> None:
        if cell.index in results:  # a cell finished twice (a resubmitted one whose first run came back): once
            return
        results[cell.index] = rows
        if cache is not None:
            cache.put(cell, rows)
        bar.done(len(rows))

    try:
        if todo:
            executor.run(make_runner, spec, settings, todo, keep)
    finally:
        bar.close()
    missing = [c.index for c in cells if c.index not in results]
    if missing:
        raise Unavailable(f"cells {missing[:5]} did not finish")
    return pd.concat([results[c.index] for c in cells], ignore_index=True).drop(columns="cell")
