"""Merge whole models from a mergekit config, written like ``apply``: streamed, atomic, sharded.

    merge_from_config("merge.yml", "out")            # → the output folder
    merge_from_config(config_dict, "out", overwrite=True, observer=report)

Tensor by tensor, the largest first (else in the base's or first model's order): read that tensor from every
input, cast to the compute dtype (float32; float64 if ``dtype: float64``), merge it with the method's kernel
(``core/merge_methods.py``), cast to the output dtype (``out_dtype``, else ``dtype``, else the tensor's own)
and write it into the next shard. Tensors are merged on ``workers`` threads at once, but those read and not yet
written never hold more elements together than the largest tensor alone (``core/threads.ordered_results``): memory
stays about that of a merge one tensor at a time (plus each thread's own, tens of MB), and the shards are written
in order. The folder appears only
when complete, with the config and tokenizer files of ``tokenizer_source`` (else the base, else the first
model), ``config.json``'s dtype set to the output's, and ``chatvec_merge.json`` (the config, the seed, the base
and its weight files' sizes). The output may not be, contain or sit inside any input (``input_paths``).

``observer``: an object with ``observe(name, base, sources, merged)`` (float tensors in the compute dtype,
``base`` None for a method without one), called for every tensor, and optionally ``finish(folder)``, called
with the output's temporary folder to add files to it (``analysis/merge_report.py``'s ``MergeReport``).

A merge's output as one more vector: ``merged_vector(folder)`` is ``merged − base`` (lazy, as
``ChatVector.from_models``), the base read from its ``chatvec_merge.json`` and checked (not the folder itself, not a
saved vector, not changed since the merge); ``named_sources`` names vectors and
merge outputs together for ``chatvec compare`` and the atlas.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from pathlib import Path

import torch

from chatvec_lab.core.apply import MODEL_FILES
from chatvec_lab.core.merge_config import MergeConfig, locate, quoted, read_config
from chatvec_lab.core.threads import check_workers, ordered_results, torch_threads
from chatvec_lab.errors import (ChatVecError, MismatchError, NotFound, SourceError, UsageError, check_finite,
                                clip, require_bool)
from chatvec_lab.io.formats import read_json_object, sample_digest
from chatvec_lab.io.naming import parse
from chatvec_lab.io.output import atomic_folder, check_output_path, source_paths, write_json
from chatvec_lab.io.shards import DEFAULT_SHARD_BYTES, ShardedSafetensorsWriter
from chatvec_lab.io.sources import model_folder, open_weights

MERGE_RECORD = "chatvec_merge.json"
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def locate_inputs(config: MergeConfig) -> MergeConfig:
    """Each model (and ``tokenizer_source``) as found: from the working folder, else beside the config."""
    config.inputs = [locate(s, config.origin) for s in config.inputs]
    if config.tokenizer_source is not None:
        config.tokenizer_source = locate(config.tokenizer_source, config.origin)
    return config


def input_paths(config: MergeConfig) -> list[Path]:
    """What a merge reads on this machine: the config file, every local model (the base among them) and the
    tokenizer source. An output may not be, contain or sit inside any of them (hub models' files are added
    once opened)."""
    specs = [config.origin, *locate_inputs(config).inputs, config.tokenizer_source]
    local = [Path(s) for s in specs if s is not None and os.path.lexists(s)]
    return local + [f for s in specs if s is not None and not os.path.lexists(s) for f in [_hub_cache(s)] if f]


def _hub_cache(spec) -> Path | None:
    """The local hub cache's folder of a hub id (``models--org--name``: every snapshot and blob), if it has one."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(spec, str) or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + spec.replace("/", "--"))
    return folder if folder.is_dir() else None


def weight_files(path) -> dict[str, int]:
    """``{file name: size}`` of a local model's weight files (a weight file itself, or those in a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return {p.name: p.stat().st_size for p in files if p.is_file()}


def _sample(path) -> str:
    """``sample_digest`` of a local model's weight files: a base swapped for another of its shape is told."""
    path = Path(path)
    return sample_digest([path] if path.is_file() else [path / name for name in weight_files(path)])


def check_inputs(config: MergeConfig, sources) -> list[str]:
    """The tensor names to merge, in the reference input's order; every input must hold each with one shape."""
    ref = sources[config.base if config.base is not None else 0]
    names = list(ref.keys())
    for spec, src in zip(config.inputs, sources):
        missing = [n for n in names if n not in src]
        if missing:
            raise MismatchError(f"{spec} lacks {len(missing)} tensor(s) of the others, e.g. {missing[:2]} "
                                "(the lab merges models of one architecture)")
        for n in names:
            if tuple(src.shape(n)) != tuple(ref.shape(n)):
                hint = " (a different vocabulary: mergekit's tokenizer surgery is not in the lab)" \
                    if parse(n).is_embedding_like else ""
                raise MismatchError(f"tensor {n!r}: shape {tuple(src.shape(n))} in {spec} but "
                                    f"{tuple(ref.shape(n))} in {config.inputs[config.base or 0]}{hint}")
        extra = [n for n in src.keys() if n not in set(names)]
        if extra:
            raise MismatchError(f"{spec} has tensor(s) the reference model lacks, e.g. {extra[:2]}")
    return names


BLOCK_ELEMENTS = 1 << 16  # an elementwise kernel's block: its temporaries (a few per input) stay in the CPU's cache


def merge_tensor_from(config: MergeConfig, name: str, tensors: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """One merged tensor from every input's (in ``config.inputs`` order), in the compute dtype.

    Where the method treats each element on its own (``MergeMethod.elementwise``), it runs on a block of rows at
    a time: the same operations on the same values (so the same bits), but its temporaries stay in cache instead
    of each making a pass over memory the size of the tensor."""
    shared, per = config.parameters_for(name)
    params = {**shared, **per}
    ref = tensors[config.base if config.base is not None else 0]
    elementwise = config.method.elementwise is not None and config.method.elementwise(params)
    if not elementwise or ref.dim() < 2 or ref.numel() <= 2 * BLOCK_ELEMENTS:
        return _kernel(config, tensors, params, name, seed)
    out = torch.empty(ref.shape, dtype=config.compute_dtype)
    rows = max(1, BLOCK_ELEMENTS // (ref.numel() // ref.shape[0]))
    for start in range(0, ref.shape[0], rows):
        out[start:start + rows] = _kernel(config, [t[start:start + rows] for t in tensors], params, name, seed)
    return out


def _kernel(config: MergeConfig, tensors: list[torch.Tensor], params: dict, name: str, seed: int) -> torch.Tensor:
    dtype = config.compute_dtype
    keep = config.method.promotes  # the kernel computes in the base's dtype: the others need no converted copy
    work = [t if keep and i != config.base else t.to(dtype) for i, t in enumerate(tensors)]
    base = work[config.base] if config.base is not None else None
    return config.method.kernel(base, [work[i] for i in config.sources], params, name, seed)


def merge_from_config(config, out, overwrite: bool = False, seed: int = 0, observer=None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, allow_pickle: bool = False,
                      progress: bool = False, workers: int | None = None) -> Path:
    """Run a mergekit config (a path or dict; see ``core/merge_config.py``) into the model folder ``out``.

    ``seed``: the random masks of ``dare_*`` and ``della*`` (one per source and tensor; the same seed gives the
    same output). ``workers``: tensors merged at once on separate threads (default: the cores this process may
    use); the tensors read and not yet written never hold more elements than the largest one alone, so memory stays
    about that of a merge one tensor at a time; each tensor's arithmetic is the same whatever the number, so the
    output is the same to the bit.
    Returns the output folder."""
    from tqdm.auto import tqdm

    require_bool(overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    workers = check_workers(workers)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, not {seed!r}")
    config = config if isinstance(config, MergeConfig) else read_config(config)
    check_output_path(out, overwrite, input_paths(config))
    with contextlib.ExitStack() as stack:
        sources = []
        for spec in config.inputs:
            src = open_weights(spec, allow_pickle=allow_pickle)
            stack.callback(src.close)
            sources.append(src)
        names = check_inputs(config, sources)
        layers = [parse(n).layer for n in names]
        config.num_layers = max((x for x in layers if x is not None), default=-1) + 1
        for n in names:
            config.parameters_for(n)  # a missing or bad parameter fails now, not mid-merge
        ref = sources[config.base if config.base is not None else 0]
        plan = [(n, tuple(ref.shape(n)), config.output_dtype(ref.dtype(n))) for n in names]
        # largest first (else the base's order): a large tensor merged after many small ones finds the heap in
        # pieces and grows it; first, its freed blocks hold the smaller ones' later (ties of four 2.5 GB models on 2 workers: peak RSS 5.3 → 4.1 GB)
        plan.sort(key=lambda entry: -math.prod(entry[1]))
        inputs = [p for src in sources for p in source_paths(src)]
        with atomic_folder(out, overwrite, inputs=inputs) as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan, prefix="model", max_shard_bytes=max_shard_bytes)
            stack.callback(writer.abort)

            def job(name, out_dtype):
                tensors = [src[name] for src in sources]  # read when the job is taken, in order; merged on a worker

                def run():
                    for spec, t in zip(config.inputs, tensors):
                        check_finite(t, f"tensor {name!r} in {spec}")
                    merged = merge_tensor_from(config, name, tensors, seed)
                    check_finite(merged, f"the merged tensor {name!r}")
                    if observer is None:  # nothing but the output waits for its turn to be written
                        return name, None, None, merged.to(out_dtype)
                    return name, tensors, merged, merged.to(out_dtype)
                return run

            jobs = ((math.prod(shape), functools.partial(job, name, out_dtype)) for name, shape, out_dtype in plan)
            largest = max((math.prod(shape) for _, shape, _ in plan), default=0)
            with torch_threads(1), contextlib.closing(ordered_results(jobs, workers, budget=largest)) as results:
                for name, tensors, merged, written in tqdm(results, total=len(plan), desc="merge", unit="tensor",
                                                           disable=not progress):
                    if observer is not None:
                        work = [t.to(config.compute_dtype) for t in tensors]
                        observer.observe(name, work[config.base] if config.base is not None else None,
                                         [work[i] for i in config.sources], merged)
                    writer.write(name, written)
                    del tensors, merged, written  # not held while the next tensor is read
            writer.close()
            _model_files(config, sources, tmp, plan)
            base = config.inputs[config.base] if config.base is not None else None
            record = {"config": config.raw, "inputs": config.inputs, "seed": seed, "method": config.method.name,
                      "base": _absolute(base)}
            if base is not None and Path(base).exists():  # to tell, when read as a vector, that it is the same base
                record["base_files"] = weight_files(base)
                record["base_sample"] = _sample(base)
            write_json(tmp / MERGE_RECORD, record)
            if observer is not None and hasattr(observer, "finish"):
                observer.finish(tmp)
    return Path(out)


def _model_files(config: MergeConfig, sources, tmp: Path, plan) -> None:
    """Config and tokenizer files from ``tokenizer_source`` / the base / the first model; the dtype recorded."""
    ref_folder = model_folder(sources[config.base if config.base is not None else 0])
    tok_folder = model_folder(config.tokenizer_source) if config.tokenizer_source else ref_folder
    for folder, files in ((ref_folder, ("config.json", "generation_config.json")),
                          (tok_folder, [f for f in MODEL_FILES if f not in ("config.json", "generation_config.json")])):
        for fname in files:
            if folder is not None and (Path(folder) / fname).is_file():
                shutil.copy2(Path(folder) / fname, tmp / fname)
    cfg = tmp / "config.json"
    if cfg.is_file():
        data = read_json_object(cfg, "model config")
        dtypes = {d for _, _, d in plan}
        if len(dtypes) == 1:
            key = "torch_dtype" if "torch_dtype" in data and "dtype" not in data else "dtype"
            data[key] = DTYPE_NAMES.get(dtypes.pop(), data.get(key))
        write_json(cfg, data)


def _absolute(spec: str | None) -> str | None:
    """A local model's absolute path (the record outlives the working folder); a hub id as it is."""
    return str(Path(spec).resolve()) if spec is not None and Path(spec).exists() else spec


def is_merge_output(spec) -> bool:
    """Whether ``spec`` is a folder written by a merge (it holds ``chatvec_merge.json``, and is no saved vector)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    folder = Path(spec)
    return (folder / MERGE_RECORD).is_file() and not (folder / "chatvec.json").is_file()


def merged_vector(folder, base=None, allow_pickle: bool = False):
    """``merged − base``: a merge's output folder as a chat vector (lazy, as ``ChatVector.from_models``); the base
    is the one its ``chatvec_merge.json`` records unless ``base`` is given.

    A recorded base is checked first: a path (or hub id), neither the merge folder (nor inside it) nor a saved
    vector, still there, and — where the record lists the sizes of its weight files — the same files."""
    from chatvec_lab.core.vector import ChatVector

    record_path = Path(folder) / MERGE_RECORD
    if base is not None:
        _check_base(folder, base, f"base {clip(str(base))}")
        return ChatVector.from_models(base, folder, allow_pickle=allow_pickle)
    if not record_path.is_file():
        raise UsageError(f"{folder} is no merge output (it has no {MERGE_RECORD}): give base=")
    record = read_json_object(record_path, "merge record")
    base = record.get("base")
    if base is None and isinstance(record.get("config"), dict) and isinstance(record.get("inputs"), list):
        config = read_config(record["config"])  # a record written before the base was kept
        if config.base is not None and config.base < len(record["inputs"]):
            base = record["inputs"][config.base]
    if base is None:
        method = record.get("method")
        kind = f"a {clip(method)} merge" if isinstance(method, str) and method else "a merge"
        raise UsageError(f"{folder} is {kind} without a base model (its {MERGE_RECORD} names none), so it has no "
                         f"vector (merged − base): chatvec extract --base BASE --chat {folder} -o VECTOR")
    what = f"{clip(str(base))}, the base recorded in {record_path},"
    if not isinstance(base, str) or not base:
        raise SourceError(f"bad merge record {record_path}: its base field must be a path (or hub id), not "
                          f"{quoted(base)}")
    if not os.path.exists(base) and (os.path.isabs(base) or base.startswith(".")):
        raise NotFound(f"{what} no longer exists: extract the vector from the base the merge used (chatvec "
                       "extract, the merge folder as the chat model; or merged_vector(folder, base=…))")
    _check_base(folder, base, what)
    sizes = record.get("base_files")
    if sizes is not None and os.path.exists(base):
        if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
            raise SourceError(f"bad merge record {record_path}: base_files must map file names to sizes")
        try:
            now = weight_files(base)
        except OSError as e:
            raise SourceError(f"cannot read {what} {e.strerror or e}") from None
        sample = record.get("base_sample")
        if now != sizes or (sample is not None and sample != _sample(base)):
            raise MismatchError(f"the base recorded in {record_path} ({clip(base)}) has changed since the merge (its "
                                "weight files differ in number, size or content): extract the vector from the base "
                                "the merge used (chatvec extract, the merge folder as the chat model)")
    try:
        return ChatVector.from_models(base, folder, allow_pickle=allow_pickle)
    except ChatVecError as e:
        if os.path.exists(base):
            raise
        raise SourceError(f"{e} (it is the base recorded in {record_path})") from None


def _check_base(folder, base, what: str) -> None:
    """A base that makes merged − base meaningless: the merge folder itself (or a folder in it: all zeros, or
    nothing), or a saved vector (a difference, not a model)."""
    if not isinstance(base, (str, os.PathLike)) or not os.path.exists(base):
        return
    real, merged = Path(os.path.realpath(base)), Path(os.path.realpath(folder))
    if real == merged or merged in real.parents:
        where = "the merge folder" if real == merged else "inside the merge folder"
        raise UsageError(f"{what} is {where} {folder}: merged − base would be zero or wrong; give the base the "
                         "merge used")
    if (real / "chatvec.json").is_file():
        raise UsageError(f"{what} is a saved chat vector (it holds chatvec.json), not a model: give the base the "
                         "merge used")


def open_source(spec):
    """``spec`` as the vector algebra takes it: a merge output becomes ``merged_vector(spec)``; anything else
    (a saved vector's folder, a vector) is returned as it is."""
    return merged_vector(spec) if is_merge_output(spec) else spec


def named_sources(specs) -> dict:
    """``{name: vector}`` as ``vector.named_vectors`` names them, where a merge output among the folders stands
    for ``merged − base`` (``chatvec compare``). Folders are named by their last component (whole paths where
    two share one); the same folder twice is an error."""
    from chatvec_lab.core.vector import named_vectors

    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if isinstance(specs, dict):
        return named_vectors({k: open_source(v) for k, v in specs.items()})
    specs = list(specs)
    if not any(is_merge_output(s) for s in specs):
        return named_vectors(specs)
    paths = [s for s in specs if isinstance(s, (str, os.PathLike))]
    folders = [os.path.realpath(os.fspath(s)) for s in paths]
    if len(set(folders)) < len(folders) or len(paths) < len(specs):
        raise UsageError(f"give each folder once, and folders only, with a merge output: {[str(s) for s in specs]}")
    names = [Path(os.fspath(s)).name or str(s) for s in paths]
    if len(set(names)) < len(names):
        names = [str(s) for s in paths]
    return named_vectors(dict(zip(names, (open_source(s) for s in paths))))
