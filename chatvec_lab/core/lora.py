"""A chat vector as a PEFT LoRA adapter: ``α·CV`` factored per matrix, loadable onto the target.

    export_peft(cv, "cv-lora", rank=16, alpha=1.0, target="path/to/cp")
    # later: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cp), "cv-lora")

Each weight matrix ``W`` of a linear layer (attention and MLP projections, the lm_head) is stored as the
factors of its truncated SVD, ``α·ΔW ≈ B @ A`` (``lora_B``: out × r, ``lora_A``: r × in, scaling 1). The
input embedding's delta is stored the way PEFT's embedding LoRA reads it (``lora_embedding_A``: r × vocab,
``lora_embedding_B``: hidden × r, ``ΔE = (B @ A)ᵀ``). A matrix whose rank is below ``rank`` gets its own
(full) rank through ``rank_pattern``. At full rank the adapter is the vector itself up to float32 rounding.

What LoRA cannot carry: 1-D tensors (norm weights and norm biases). PEFT stores those as whole modules
(``modules_to_save``) and loads every parameter of such a module, so they need the target's own values: with
``target=`` the adapter holds each parameter of the module, ``target + α·Δ`` where the vector has a delta and
the target's own value where it has none (a GPT-NeoX LayerNorm exported with ``--exclude bias`` keeps its
bias); without it the export refuses and says which tensors to exclude. Biases of linear layers, fused
mixture-of-experts tensors and GPT-2-style ``Conv1D`` weights are refused by name (exclude them with
``ChatVector.select``).

The factors are stored in ``dtype``: by default the target's dtype for each tensor (the vector's source
dtype without a target), or the one asked for (``dtype=torch.float32`` keeps full precision at 2× the size).

The adapter is written in one pass, one matrix in memory at a time, into a temporary folder renamed into
place (``output.atomic_folder``): an interrupted export leaves nothing behind.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from chatvec_lab.errors import MismatchError, UsageError, check_finite, require_bool
from chatvec_lab.io.naming import parse
from chatvec_lab.io.output import atomic_folder, write_json
from chatvec_lab.io.shards import ShardedSafetensorsWriter
from chatvec_lab.io.sources import open_weights
from chatvec_lab.core.transforms import check_rank, low_rank_factors
from chatvec_lab.core.vector import ChatVector

ADAPTER_FILE = "adapter_model"  # .safetensors: PEFT reads one file, so the writer never shards
LINEAR_MODULES = frozenset({"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up",
                            "mlp_gate_up", "mlp_down", "lm_head", "moe_router"})
CONV1D_NAMES = ("c_attn", "c_proj", "c_fc")  # GPT-2 family: weights stored in × out (PEFT's fan_in_fan_out)
PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterPart:
    """How one tensor of the vector goes into the adapter: ``kind`` is "linear", "embedding" or "whole"."""
    name: str
    kind: str
    module: str  # the module's path in the model (the tensor name without ``.weight``)
    shape: tuple[int, ...]
    rank: int  # 0 for "whole"

    def entries(self) -> list[tuple[str, tuple[int, ...]]]:
        """(adapter tensor name, shape) in the order they are written."""
        rows, cols = self.shape[0], self.shape[-1]
        if self.kind == "linear":
            return [(f"{PREFIX}{self.module}.lora_A.weight", (self.rank, cols)),
                    (f"{PREFIX}{self.module}.lora_B.weight", (rows, self.rank))]
        if self.kind == "embedding":
            return [(f"{PREFIX}{self.module}.lora_embedding_A", (self.rank, rows)),
                    (f"{PREFIX}{self.module}.lora_embedding_B", (cols, self.rank))]
        return [(f"{PREFIX}{self.name}", self.shape)]


def in_memory_name(config: dict | None):
    """A function from a checkpoint's tensor name to the one the loaded model uses (transformers ≥ 5 renames
    some on load, e.g. GPT-NeoX's ``embed_out`` → ``lm_head``): PEFT finds modules by their in-memory path."""
    import re

    renames = []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers < 5 keeps the checkpoint's names
        return lambda name: name
    config = config or {}
    for key in [*(config.get("architectures") or []), config.get("model_type")]:
        found = get_checkpoint_conversion_mapping(key) if isinstance(key, str) else None
        if found:
            renames = [(src[0], tgt[0]) for r in found if isinstance(r, WeightRenaming)
                       and len(src := list(r.source_patterns)) == 1 and len(tgt := list(r.target_patterns)) == 1]
            break

    def rename(name: str) -> str:
        for src, tgt in renames:
            name = re.sub(src, tgt, name)
        return name
    return rename


def plan_adapter(vector: ChatVector, rank: int | None, have_target: bool,
                 target_shapes: dict | None = None, rename=None) -> list[AdapterPart]:
    """Sort the vector's tensors into LoRA matrices and whole modules; refuse what PEFT cannot hold, by name.

    ``target_shapes`` (the target's tensor name → shape): each whole module also gets the parameters the vector
    lacks (e.g. a norm's bias left out with ``--exclude bias``), as PEFT loads whole modules. ``rename``: the
    checkpoint → in-memory name map (``in_memory_name``), for the module paths PEFT looks for."""
    rename = rename or (lambda n: n)
    parts, refused, whole = [], [], []
    for name, shape in vector.shapes.items():
        info = parse(name)
        module = rename(name).rsplit(".", 1)[0] if info.param in ("weight", "bias") else rename(name)
        if any(f".{c}." in f".{name}" for c in CONV1D_NAMES) or info.module.startswith("expert_") or len(shape) > 2:
            refused.append(name)
        elif len(shape) == 1 and info.param in ("weight", "bias") and info.module not in LINEAR_MODULES \
                and info.module != "embed":
            whole.append(name)
            parts.append(AdapterPart(name, "whole", module, shape, 0))
        elif info.param != "weight":
            refused.append(name)
        elif len(shape) == 2 and info.module == "embed":
            parts.append(AdapterPart(name, "embedding", module, shape, min(rank or min(shape), *shape)))
        elif len(shape) == 2 and info.module in LINEAR_MODULES:
            parts.append(AdapterPart(name, "linear", module, shape, min(rank or min(shape), *shape)))
        else:
            refused.append(name)
    if refused:
        raise UsageError(
            f"a PEFT LoRA adapter cannot hold {len(refused)} tensor(s) of this vector, e.g. {refused[:3]} "
            "(biases of linear layers, fused experts, Conv1D or unknown 2-D weights): leave them out with "
            "vector.select(exclude=...) / --exclude")
    if whole and not have_target:
        raise UsageError(
            f"{len(whole)} tensor(s) are not matrices (e.g. {whole[:2]}): PEFT stores them as whole modules, "
            "which needs the target's own values; give target= (--target), or leave them out with "
            "exclude='norm' (--exclude norm)")
    if not parts:
        raise MismatchError("the vector holds no tensor: there is nothing to export")
    if target_shapes is not None:
        have = {p.name for p in parts}
        modules = {p.module for p in parts if p.kind == "whole"}
        for name, shape in target_shapes.items():
            module, _, param = rename(name).rpartition(".")
            if module in modules and name not in have and param in ("weight", "bias"):
                parts.append(AdapterPart(name, "whole", module, tuple(shape), 0))  # the target's own value
    return parts


ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_dtype(dtype, fallback: bool = False) -> torch.dtype | None:
    """A floating dtype for the adapter's tensors from a torch dtype or its name (``None``: the default).

    ``fallback``: an unknown name (e.g. a vector's recorded source dtype) gives float32 instead of an error."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in ADAPTER_DTYPES.values():
        return dtype if dtype is not None or not fallback else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name in ADAPTER_DTYPES:
        return ADAPTER_DTYPES[name]
    if fallback:
        return torch.float32
    raise UsageError(f"dtype must be one of {sorted(ADAPTER_DTYPES)}, not {dtype!r}")


def _refuse_tied(config: dict | None, what: str, parts: list[AdapterPart]) -> None:
    """PEFT's embedding LoRA changes the input side only; a tied lm_head would not see the change until merged."""
    if config and config.get("tie_word_embeddings") and any(p.kind == "embedding" for p in parts):
        raise UsageError(f"{what} ties its input embeddings to the lm_head: a LoRA adapter on the embeddings would "
                         "change the input side only (unmerged output differs from target + α·vector); leave the "
                         "embeddings out (exclude='embed_tokens', --exclude embed_tokens) or apply the vector")


def adapter_config(parts: list[AdapterPart], rank: int, base_model: str | None) -> dict:
    """PEFT's ``adapter_config.json``: exact module paths as targets, every scaling ``lora_alpha / r = 1``."""
    lora = [p for p in parts if p.kind != "whole"]
    pattern = {p.module: p.rank for p in lora if p.rank != rank}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(p.module for p in lora),
        "modules_to_save": sorted({p.module for p in parts if p.kind == "whole"}) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }


def export_peft(vector: ChatVector, out, rank: int | None = None, alpha: float = 1.0, target=None,
                method: str = "auto", seed: int = 0, overwrite: bool = False, allow_pickle: bool = False,
                progress: bool = False, dtype=None) -> Path:
    """Write ``alpha · vector`` as a PEFT LoRA adapter folder; ``rank=None`` keeps every matrix's full rank.

    ``dtype`` (a torch dtype or its name, e.g. "bfloat16"): what the adapter's tensors are stored in; by
    default the target's dtype for each tensor, or the vector's source dtype without a target.

    Returns the folder. Besides PEFT's two files it holds ``chatvec.json``: the vector's metadata, the
    settings, and per matrix the share of the delta's squared norm the rank keeps (``kept_energy``)."""
    from tqdm.auto import tqdm

    require_bool(overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    if rank is not None:
        check_rank(rank, method)
        if rank == 0:
            raise UsageError("rank must be at least 1 (rank 0 is an empty adapter)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number, not {alpha!r}")
    dtype = adapter_dtype(dtype)
    parts = plan_adapter(vector, rank, target is not None, rename=in_memory_name(vector.base_config))
    _refuse_tied(vector.base_config, "the vector's base", parts)
    target_weights = open_weights(target, allow_pickle=allow_pickle) if target is not None else None
    try:
        if target_weights is not None:
            parts = plan_adapter(vector, rank, True, {n: target_weights.shape(n) for n in target_weights.keys()},
                                 rename=in_memory_name(target_weights.config or vector.base_config))
            _refuse_tied(target_weights.config, "the target", parts)
            for p in parts:
                if p.name not in target_weights:
                    raise MismatchError(f"tensor {p.name!r} is in the vector but not in the target")
                if tuple(target_weights.shape(p.name)) != p.shape:
                    raise MismatchError(f"tensor {p.name!r}: the vector's shape {p.shape} differs from the "
                                        f"target's {tuple(target_weights.shape(p.name))} (a grown vocabulary? "
                                        "apply the vector with embeddings='shared' instead)")
        r = max((p.rank for p in parts), default=1) if rank is None else rank
        default = adapter_dtype(vector.metadata.get("source_dtype"), fallback=True)

        def stored(p: AdapterPart) -> torch.dtype:
            if dtype is not None:
                return dtype
            return target_weights.dtype(p.name) if target_weights is not None else default

        plan = [(n, s, stored(p)) for p in parts for n, s in p.entries()]
        kept: dict[str, float] = {}
        inputs = vector.input_paths() + ([Path(target)] if target is not None and Path(str(target)).exists() else [])
        with atomic_folder(out, overwrite, inputs=inputs) as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan, prefix=ADAPTER_FILE, max_shard_bytes=1 << 62)
            try:
                for p in tqdm(parts, desc="adapter", unit="tensor", disable=not progress):
                    if p.name not in vector.shapes:  # a whole module's parameter the vector has no delta for
                        writer.write(p.entries()[0][0], target_weights[p.name].to(stored(p)))
                        continue
                    delta = vector[p.name].to(torch.float32) * alpha
                    check_finite(delta, f"tensor {p.name!r} in the vector")
                    if p.kind == "whole":
                        writer.write(p.entries()[0][0], (target_weights[p.name].to(torch.float32) + delta).to(stored(p)))
                        continue
                    matrix = delta.T if p.kind == "embedding" else delta
                    b, a = low_rank_factors(matrix, p.rank, method, seed)
                    total = float(matrix.double().square().sum())
                    kept[p.name] = 1.0 if total == 0 else min(1.0, float(b.double().square().sum()) / total)  # A: orthonormal rows
                    (name_a, _), (name_b, _) = p.entries()
                    writer.write(name_a, a.to(stored(p)))
                    writer.write(name_b, b.to(stored(p)))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            base_model = None if target is None else (
                os.path.abspath(target) if os.path.exists(target) else str(target))  # a hub id stays as given
            write_json(tmp / "adapter_config.json", adapter_config(parts, r, base_model))
            write_json(tmp / "chatvec.json", {
                "kind": "peft_lora", "rank": rank, "alpha": alpha, "method": method, "seed": seed,
                "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "target",
                "target": base_model, "vector": vector.metadata, "kept_energy": kept})
    finally:
        if target_weights is not None:
            target_weights.close()
    return Path(out)
