"""Tiny random models of several architectures, saved as sharded safetensors folders."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2)


def tiny_config(arch: str, vocab_size: int = 96):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=64, num_key_value_heads=4, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "gemma":
        return tf.GemmaConfig(intermediate_size=64, num_key_value_heads=1, head_dim=8, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             tie_word_embeddings=True)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
                                **common)
    if arch == "phi3":
        return tf.Phi3Config(intermediate_size=64, num_key_value_heads=4, pad_token_id=0,
                             tie_word_embeddings=False, **common)
    raise ValueError(arch)


def new_model(arch: str, seed: int = 0, vocab_size: int = 96, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    return model.to(dtype).eval()


def perturbed(model, seed: int, scale: float = 0.1):
    """A descendant: every tensor moved by ``scale`` times its own spread."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            spread = float(p.float().std()) if p.numel() > 1 else 0.0
            p.add_((torch.randn(p.shape, generator=g) * scale * (spread + 0.02)).to(p.dtype))
    return out


def save(model, folder: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def checksums(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """``family(arch, dtype)`` → dict of folders ``base``, ``chat``, ``cp`` (sharded, with index)."""
    cache: dict = {}

    def make(arch: str = "llama", dtype=torch.float32):
        key = (arch, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            base = new_model(arch, dtype=dtype)
            chat = perturbed(base, 1)
            cp = perturbed(base, 2)
            cache[key] = {"base": save(base, root / "base"), "chat": save(chat, root / "chat"),
                          "cp": save(cp, root / "cp"), "root": root}
        return cache[key]
    return make


def pytest_sessionstart(session):
    """Print the resolved versions even under ``-q`` (which hides the report header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        for line in pytest_report_header(session.config):
            reporter.write_line(line)


def pytest_report_header(config):
    """The versions this run resolved: a fresh install may get newer ones than a developer's machine."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "numba", "numpy", "safetensors", "tokenizers"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    import platform
    return [f"chatvec_lab test run: Python {platform.python_version()}, " + ", ".join(found)]
