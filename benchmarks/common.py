"""Shared pieces of the benchmarks: synthetic Llama-shaped checkpoints and measured child processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatvec_lab.io.shards import ShardedSafetensorsWriter  # noqa: E402


def llama_config(layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
            "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_family(folder: Path, cfg: dict, dtype=torch.bfloat16, shard_bytes: int = 500 * 1024**2) -> dict[str, Path]:
    """base, chat = base + small noise, cp = base + other noise; tensor by tensor, never whole in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    names = llama_tensors(cfg)
    plan = [(n, s, dtype) for n, s in names]
    paths = {k: folder / k for k in ("base", "chat", "cp")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    writers = {}
    for key, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        writers[key] = ShardedSafetensorsWriter(path, plan, max_shard_bytes=shard_bytes)
    g = torch.Generator().manual_seed(0)
    for name, shape in names:
        base = torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)
        writers["base"].write(name, base.to(dtype))
        writers["chat"].write(name, (base + torch.randn(shape, generator=g) * 0.002).to(dtype))
        writers["cp"].write(name, (base + torch.randn(shape, generator=g) * 0.004).to(dtype))
    for key, path in paths.items():
        writers[key].close()
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return paths


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _status_kib(pid: int, field: str = "VmHWM") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch_peak(proc: subprocess.Popen, every: float = 0.02) -> int:
    """Poll a running command until it exits; its peak memory in bytes: the larger of the kernel's high-water
    mark of its own process (VmHWM) and the summed RSS of its whole process tree (workers, kernels, actors).
    ``ru_maxrss`` would also count the forked copy of this (large) parent before exec."""
    import psutil

    peak_tree, peak_hwm = 0, 0
    try:
        parent = psutil.Process(proc.pid)
    except psutil.Error:
        parent = None
    while proc.poll() is None:
        if parent is not None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
        peak_hwm = max(peak_hwm, _status_kib(proc.pid) * 1024)
        time.sleep(every)
    return max(peak_tree, peak_hwm)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall seconds, CPU seconds of its whole process tree (``RUSAGE_CHILDREN``) and its peak
    memory in MiB (``watch_peak``: the tree's, polled)."""
    import resource
    import threading

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak = watch_peak(proc)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    reader.join()
    output = b"".join(chunks).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-2000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 2**20, "output": output}


def table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
