"""Where a model runs and in which precision, with Hugging Face's conventions.

    resolve_device("auto")                  # cuda (the current GPU) if torch sees one, else cpu
    resolve_device("cuda:1")                # a UsageError in one line where there is no such GPU
    resolve_dtype("auto", "path/to/model")  # the checkpoint's own dtype (config.json, else its safetensors)
    resolve_dtype("bf16")                   # torch.bfloat16

``auto`` is the default everywhere a model is loaded to run (sweep, atlas, the demo, ``load_target``): the GPU
when there is one, and the dtype the checkpoint was saved in (a bfloat16 checkpoint runs in bfloat16; its float32
copy would cost twice the memory). ``checkpoint_dtype`` reads that dtype from ``config.json`` (``dtype``, or the
older ``torch_dtype``) and, where the config does not say, from the safetensors headers (the floating dtype
holding most bytes). ``free_memory`` says how much memory a device has left (for batch sizes).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from chatvec_lab.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` → the current CUDA device if torch sees one, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"mps"`` or a ``torch.device`` → that device, if this machine has it. Anything else, or a
    device this machine lacks, is a one-line UsageError."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"device must be one of {', '.join(DEVICES)} (or a torch.device), not {type(device).__name__}")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, ValueError):
        raise UsageError(f"device {device!r} is not one of {', '.join(DEVICES)}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
            raise UsageError(f"device {str(device)!r}: this machine has no CUDA device ({why}); use --device cpu "
                             "(or auto)")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise UsageError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
        return torch.device("cuda", index)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"device {str(device)!r}: this machine has no Apple MPS device; use --device cpu "
                             "(or auto)")
        return torch.device("mps")
    raise UsageError(f"device {str(device)!r} is not supported: choose {', '.join(DEVICES)}")


def dtype_of_name(name) -> torch.dtype | None:
    """``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"`` … → the torch dtype; None for anything else."""
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        return None
    return DTYPES.get(name.strip().lower().removeprefix("torch."))


def _config_dtype(config: dict) -> torch.dtype | None:
    for holder in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("dtype", "torch_dtype"):
            found = dtype_of_name(holder.get(key))
            if found is not None:
                return found
    return None


def checkpoint_dtype(checkpoint) -> torch.dtype | None:
    """The dtype a checkpoint was saved in, or None when it cannot be told: a model's own floating dtype;
    a folder's ``config.json`` (``dtype`` / ``torch_dtype``), else the floating dtype of most of its safetensors
    bytes. A dtype other than float32, bfloat16 or float16 (float64, float8) counts as float32."""
    from chatvec_lab.io.formats import read_json_object
    from chatvec_lab.io.sources import model_folder, open_weights

    if checkpoint is None:
        return None
    if isinstance(checkpoint, torch.nn.Module):
        found = next((p.dtype for p in checkpoint.parameters() if p.is_floating_point()), None)
        return None if found is None else (found if found in RUN_DTYPES else torch.float32)
    if isinstance(checkpoint, (str, os.PathLike)):
        folder = model_folder(checkpoint)
    else:
        folder = getattr(checkpoint, "folder", None)
    if folder is not None and (Path(folder) / "config.json").is_file():
        found = _config_dtype(read_json_object(Path(folder) / "config.json", "model config"))
        if found is not None:
            return found
    source = open_weights(checkpoint)
    weights: dict[torch.dtype, int] = {}
    for name in source.keys():
        dtype = source.dtype(name)
        if dtype.is_floating_point:
            n = 1
            for d in source.shape(name):
                n *= d
            weights[dtype] = weights.get(dtype, 0) + n * dtype.itemsize
    if not weights:
        return None
    found = max(weights, key=weights.get)
    return found if found in RUN_DTYPES else torch.float32


def resolve_dtype(dtype=None, checkpoint=None) -> torch.dtype:
    """``None``/``"auto"`` → the checkpoint's own dtype (``checkpoint_dtype``; float32 when it cannot be told);
    ``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``fp32``, ``bf16``, ``fp16``, a ``torch.dtype``) → that
    dtype. Anything else is a one-line UsageError."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return checkpoint_dtype(checkpoint) or torch.float32
    found = dtype_of_name(dtype)
    if found not in RUN_DTYPES:
        raise UsageError(f"dtype {str(dtype)!r} is not one of auto, float32, bfloat16, float16")
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def free_memory(device: torch.device) -> int | None:
    """Bytes the device has free now: a GPU's free memory, or the RAM the system has available (Linux
    ``MemAvailable``); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None
