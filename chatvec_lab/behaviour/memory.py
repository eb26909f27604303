"""How much memory each job will need for a model, told from its checkpoint's headers before anything loads.

    memory_estimate("path/to/model")                       # a DataFrame: one row per job
    memory_estimate(LlamaConfig(hidden_size=4096, ...))    # or from a config alone: no weights needed
    memory_check()                                         # the formula against the measured figures

A job's estimate is the sum of four parts, each a column:

- ``overhead``: the process itself (Python, torch, transformers, the tokenizer, the scorers), measured with a
  model of 0.4 MB by ``benchmarks/bench_real.py --size tiny`` (``OVERHEAD``);
- ``model``: the parameters in the dtype the job runs them in (the checkpoint's own under ``auto``);
- ``working``: what the job holds beside the model. The live model (sweep, atlas, eval, the panel) rewrites one
  tensor at a time, on the CPU: the largest tensor's stored values and its result, and float32 blocks of rows
  of the sum and each vector's delta;
- ``batch``: the generation state of a batch (KV cache, activations, scores: ``generation.config_row_bytes``).

Extract and apply stream tensor by tensor: their memory does not grow with the model, and their row gives
the figure measured on a 4.2 GB vector (``STREAMING``). A merge streams too, but holds every input's copy of the
largest tensor, its float32 deltas and the trim's sort at once: its row (a trim merge, ``ties`` / ``dare`` /
``della``, of ``MERGE_SOURCES`` sources and a base) grows with the largest tensor, on the line through
``benchmarks/bench_merge.py``'s peaks at two sizes (``MERGE_MEASURED``, ``merge_line``). ``MEASURED`` holds the
peaks the formula is checked against (``benchmarks/bench_real.py`` at 0.36B and 0.97B, on this project's 2-core CPU machine;
``tests/test_memory.py`` checks they are the figures in ``benchmarks/results/bench_real.jsonl``). No GPU has
measured the formula yet: on a GPU the ``basis`` column says so.
"""
from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path

import pandas as pd
import torch

from chatvec_lab.core.terms import CHUNK_ELEMENTS
from chatvec_lab.errors import NotFound, UsageError

GB = 1e9
# Peak RSS with a 0.4 MB model (bench_real --size tiny, commit 6306d7f, 2026-12-05, CPU): the process's own cost.
OVERHEAD = {"generate": 533_594_112, "live": 622_272_512}
# Peak RSS of `chatvec apply` streaming a 4.2 GB float32 vector (docs/benchmarks.md, "Extract"): 719 MiB.
STREAMING = 719 * 2**20
# Measured peaks (bench_real, "after-final"/"after" runs at commit 6306d7f, CPU, bfloat16, 2 prompts, 8 new tokens).
MEASURED = [
    {"size": "0.36b", "job": "generate", "peak_rss": 1_264_099_328},
    {"size": "0.36b", "job": "live", "peak_rss": 1_367_162_880},
    {"size": "1b", "job": "generate", "peak_rss": 2_566_447_104},
    {"size": "1b", "job": "live", "peak_rss": 2_622_861_312},
]
# The shapes bench_real builds (its SIZES, with the toy family's 2,048-token vocabulary).
BENCH_SHAPES = {
    "0.36b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=2048),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=2048),
}
# Peak RSS of `chatvec merge` (ties, 3 sources + base, bfloat16 inputs, --workers 2; bench_merge, docs/benchmarks.md
# "Merge") at two sizes: four 2.52 GB models (largest tensor 65,536,000 elements) and four 0.01 GB ones (524,288).
MERGE_SOURCES = 3
MERGE_LABEL = "workers 2 vs mergekit -j 2"  # the runs' label in benchmarks/results/bench_merge.jsonl
MERGE_MEASURED = [{"size": "full", "largest": 65_536_000, "peak_rss": 4_220_801_024},
                  {"size": "small", "largest": 524_288, "peak_rss": 365_629_440}]
JOBS = {
    "generate": "load and generate (notebooks 01-02, the demo)",
    "live": "sweep, atlas, eval, the panel and widgets (a live model)",
    "streaming": "extract, apply (streamed tensor by tensor)",
    "merge": f"chatvec merge, a trim method (ties, dare, della) of {MERGE_SOURCES} sources and a base",
}


def merge_line() -> tuple[float, float]:
    """(bytes at no tensor, bytes per element of the largest tensor) of a trim merge of bfloat16 inputs: the line
    through bench_merge's two measured peaks (``MERGE_MEASURED``)."""
    small, full = sorted(MERGE_MEASURED, key=lambda m: m["largest"])
    per_element = (full["peak_rss"] - small["peak_rss"]) / (full["largest"] - small["largest"])
    return small["peak_rss"] - per_element * small["largest"], per_element


def merge_estimate(largest: int, stored: torch.dtype) -> float:
    """A trim merge's peak RAM: the measured line, its inputs' copies of the largest tensor scaled from bfloat16
    to the checkpoint's dtype (every input holds one)."""
    at_zero, per_element = merge_line()
    return at_zero + largest * (per_element + (MERGE_SOURCES + 1) * (stored.itemsize - 2))


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What the estimate needs from a checkpoint: the parameters' elements (floating and other), the largest
    tensor, the dtype most of it is stored in, and the config (for the KV cache)."""

    floating: int
    other_bytes: int
    largest: int
    stored: torch.dtype
    config: object

    @classmethod
    def of(cls, target) -> "Footprint":
        """From a model folder or hub id (safetensors headers and config.json), or a config alone."""
        if isinstance(target, (str, Path)):
            return _of_checkpoint(target)
        if isinstance(target, dict) or hasattr(target, "to_dict"):
            return _of_config(target)
        raise UsageError(f"memory_estimate takes a model folder, a hub id or a config, not {type(target).__name__}")

    def model_bytes(self, dtype: torch.dtype) -> int:
        return self.floating * dtype.itemsize + self.other_bytes


def _of_checkpoint(target) -> Footprint:
    from chatvec_lab.io.formats import read_json_object
    from chatvec_lab.io.sources import model_folder, open_weights, refuse_saved_vector

    if isinstance(target, Path) or str(target).startswith((".", "/", "~")):
        if not Path(target).expanduser().exists():
            raise NotFound(f"no such model folder: {target}")
    source = open_weights(target)
    refuse_saved_vector(source, "the model")
    floating = other = largest = 0
    stored: dict[torch.dtype, int] = {}
    for name in source.keys():
        n = 1
        for d in source.shape(name):
            n *= d
        dtype = source.dtype(name)
        if dtype.is_floating_point:
            floating += n
            stored[dtype] = stored.get(dtype, 0) + n
            largest = max(largest, n)
        else:
            other += n * dtype.itemsize
    folder = model_folder(target)
    config = {}
    if folder is not None and (Path(folder) / "config.json").is_file():
        config = read_json_object(Path(folder) / "config.json", "model config")
    return Footprint(floating, other, largest, max(stored, key=stored.get) if stored else torch.float32, config)


def _of_config(config) -> Footprint:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, dict):
        fields = dict(config)
        kind = fields.pop("model_type", None)
        if not isinstance(kind, str):
            raise UsageError("a config given as a dict needs its model_type (e.g. 'llama')")
        try:
            config = AutoConfig.for_model(kind, **fields)
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"not a model config: {e}") from None
    if not isinstance(config, PretrainedConfig):
        raise UsageError(f"not a model config: {type(config).__name__}")
    with torch.device("meta"):  # shapes only: not one byte of weights
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())  # a tied embedding once
    floating = sum(p.numel() for p in params if p.is_floating_point())
    other = sum(p.numel() * p.element_size() for p in params if not p.is_floating_point())
    largest = max((p.numel() for p in params), default=0)
    from chatvec_lab.io.devices import RUN_DTYPES, dtype_of_name

    stored = getattr(config, "dtype", None)
    stored = stored if isinstance(stored, torch.dtype) else dtype_of_name(stored) if isinstance(stored, str) else None
    return Footprint(floating, other, largest, stored if stored in RUN_DTYPES else torch.float32, config)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def memory_estimate(target, *, device="cpu", dtype="auto", vectors: int = 1, batch_size: int = 8,
                    tokens: int = 512) -> pd.DataFrame:
    """One row per job: the memory it will need for ``target`` (a model folder, a hub id, or a config), run on
    ``device`` in ``dtype`` (``auto``: the checkpoint's own), with ``vectors`` chat vectors live at once and
    batches of ``batch_size`` rows of ``tokens`` tokens (prompt and reply).

    Columns: ``job``, ``jobs`` (what it covers), ``ram_gb`` and ``gpu_gb`` (the estimates), their parts
    ``overhead_gb``, ``model_gb``, ``working_gb``, ``batch_gb``, and ``basis`` (what the figure rests on). On a
    GPU the model and the batch are in GPU memory; the overhead, the live model's working tensor (its arithmetic
    runs on the CPU) and the model on its way in (it loads into RAM, then moves: the larger of the two) in RAM.
    A folder's or hub id's safetensors headers are read, never its weights; a config needs no file at all."""
    from chatvec_lab.behaviour.generation import config_row_bytes
    from chatvec_lab.io.devices import resolve_dtype

    vectors = _positive_int(vectors, "vectors")
    batch_size = _positive_int(batch_size, "batch_size")
    tokens = _positive_int(tokens, "tokens")
    gpu = _device_kind(device) == "cuda"
    footprint = Footprint.of(target)
    if isinstance(target, (str, Path)) or not (dtype is None or str(dtype).strip().lower() == "auto"):
        run = resolve_dtype(dtype, target if isinstance(target, (str, Path)) else None)
    else:
        run = footprint.stored  # a config's own dtype
    model = footprint.model_bytes(run)
    try:
        batch = batch_size * config_row_bytes(footprint.config, run.itemsize, tokens)
        float(batch)
    except (OverflowError, TypeError, ValueError):
        raise UsageError("the batch's memory is past any machine's: check --batch-size, --tokens and the config's "
                         "sizes (hidden_size, num_hidden_layers, …)") from None
    # the largest tensor's stored values (read from the checkpoint) and its result, plus float32 blocks of rows
    working = footprint.largest * (footprint.stored.itemsize + run.itemsize) + CHUNK_ELEMENTS * 4 * (vectors + 1)
    measured = "checked against CPU peaks at 0.36B and 0.97B (memory_check)"
    basis = "RAM as on a CPU; GPU memory: model + batch, not yet measured on a GPU" if gpu else measured
    if not footprint.config:
        basis += "; no config.json: the batch part assumes a generic shape"
    rows = []
    for job, overhead, work in (("generate", OVERHEAD["generate"], 0), ("live", OVERHEAD["live"], working)):
        ram = overhead + (max(model, work) if gpu else model + work + batch)  # a GPU's model leaves RAM once moved
        rows.append(dict(job=job, ram=ram, gpu=model + batch if gpu else 0, overhead=overhead, model=model,
                         working=work, batch=batch, basis=basis))
    rows.append(dict(job="streaming", ram=STREAMING, gpu=0, overhead=STREAMING, model=0, working=0, batch=0,
                     basis="measured: apply of a 4.2 GB vector (docs/benchmarks.md); does not grow with the model"))
    at_zero = merge_line()[0]
    merging = merge_estimate(footprint.largest, footprint.stored) - at_zero
    rows.append(dict(job="merge", ram=at_zero + merging, gpu=0, overhead=at_zero, model=0, working=merging, batch=0,
                     basis="measured line: bench_merge's peaks at 0.01 and 2.52 GB models (ties, 3 sources + base, "
                           "2 workers), scaled by the largest tensor"))
    out = pd.DataFrame(rows)
    out.insert(1, "jobs", out["job"].map(JOBS))
    for part in ("ram", "gpu", "overhead", "model", "working", "batch"):
        out[f"{part}_gb"] = out.pop(part) / GB
    return out[["job", "jobs", "ram_gb", "gpu_gb", "overhead_gb", "model_gb", "working_gb", "batch_gb", "basis"]]


def _device_kind(device) -> str:
    text = str(device).strip().lower() if device is not None else "auto"
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = text.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return "cuda" if kind in ("cuda", "mps") else "cpu"


def memory_check(prompts: int = 2, new_tokens: int = 8, prompt_tokens: int = 24) -> pd.DataFrame:
    """The formula against ``MEASURED``: for each measured (size, job), the estimate at bench_real's settings (its
    prompts in one batch, bfloat16, one vector), the measured peak, and ``ratio`` = estimate ÷ measured."""
    rows = []
    for m in MEASURED:
        est = memory_estimate(BENCH_SHAPES[m["size"]], device="cpu", dtype="bfloat16", batch_size=prompts,
                              tokens=prompt_tokens + new_tokens).set_index("job").loc[m["job"], "ram_gb"]
        rows.append(dict(size=m["size"], job=m["job"], estimate_gb=est, measured_gb=m["peak_rss"] / GB,
                         ratio=est * GB / m["peak_rss"]))
    return pd.DataFrame(rows)
