"""Generation engines: what a grid cell needs from a model, behind one small interface.

A grid (a sweep or an atlas) asks an engine three things: move to a coefficient point, generate replies,
and measure perplexity. ``TransformersEngine`` does them with a transformers model and a ``LiveModel``
(in-place weight changes); another engine (vLLM with in-place weight updates, or with the LoRA adapters of
``lora.export_peft``) would implement the same three methods.

``EngineSpec`` is how a worker process builds its own engine: paths or hub ids only, never tensors, so a
Ray actor opens the target and the vectors itself and nothing large travels through Ray's object store.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import pandas as pd
import torch

from chatvec_lab.errors import SourceError, UsageError, count_nonfinite
from chatvec_lab.behaviour.generation import generate
from chatvec_lab.core.live import LiveModel
from chatvec_lab.behaviour.scoring import perplexity
from chatvec_lab.core.vector import ChatVector


def check_json_objects(target, names) -> None:
    """Each of ``names`` in a model folder, when present, holds one JSON object (transformers would raise a
    traceback on a list or a number); a one-line SourceError naming the file otherwise."""
    import json
    from pathlib import Path

    folder = Path(str(target))
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise SourceError(f"{path}: not valid JSON ({type(e).__name__})") from None
        if not isinstance(value, dict):
            raise SourceError(f"{path}: expected a JSON object, found a {type(value).__name__}")


def load_target(target, device="auto", dtype="auto"):
    """A model folder or hub id → ``(model in eval mode, tokenizer)``, on ``device`` in ``dtype``.

    ``device``: ``auto`` (the GPU if torch sees one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``;
    ``dtype``: ``auto`` (the checkpoint's own, e.g. bfloat16), ``float32``, ``bfloat16``, ``float16`` (see
    ``chatvec_lab.io.devices``). A device this machine lacks is a one-line UsageError, before anything loads."""
    from transformers import AutoModelForCausalLM

    from chatvec_lab.io.devices import resolve_device, resolve_dtype
    from chatvec_lab.io.vocab import load_tokenizer

    where = resolve_device(device)
    check_json_objects(target, ("config.json", "generation_config.json"))
    tokenizer = load_tokenizer(target, check_template=True)  # before the model: a bad tokenizer fails at once
    precision = resolve_dtype(dtype, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=precision)
    except RecursionError:
        raise SourceError(f"cannot load the model in {target}: a JSON file it reads (config.json, "
                          "generation_config.json …) is nested too deeply") from None
    if where.type != "cpu":
        model = model.to(where)
    return model.eval(), tokenizer


def runtime_key(target, live=None, device="auto", dtype="auto") -> dict:
    """Where and in which precision the replies are made (part of a cache key): the device kind and the dtype,
    of a model given (or a LiveModel's), or as ``device`` / ``dtype`` resolve for a target folder."""
    from chatvec_lab.io.devices import dtype_name, resolve_device, resolve_dtype

    model = live.model if live is not None else target if isinstance(target, torch.nn.Module) else None
    if model is not None:
        param = next(model.parameters())
        return {"device": param.device.type, "dtype": dtype_name(param.dtype)}
    return {"device": resolve_device(device).type, "dtype": dtype_name(resolve_dtype(dtype, target))}


class GenerationEngine(Protocol):
    def set_alphas(self, alphas: Mapping[str, float]) -> None: ...  # ``{vector name: α}``

    def generate(self, prompts: Sequence[str], seed: int, max_new_tokens: int, **gen_kwargs) -> pd.DataFrame: ...

    def perplexity(self, texts: Sequence[str]) -> float: ...


@dataclass(frozen=True)
class VectorSpec:
    """A vector a worker can open itself: a saved vector's folder, or ``chat − base`` of two models."""
    folder: str | None = None
    base: str | None = None
    chat: str | None = None

    def open(self) -> ChatVector:
        if self.folder is not None:
            return ChatVector.load(self.folder)
        return ChatVector.from_models(self.base, self.chat, hash_files=False)


def _folder_of(source) -> str | None:
    folder = getattr(source, "folder", None)
    return os.fspath(folder) if folder is not None else None


def vector_spec(vector) -> VectorSpec:
    """How to reopen ``vector`` elsewhere; a clear error for vectors that exist only in this process."""
    if isinstance(vector, (str, os.PathLike)):
        return VectorSpec(folder=os.fspath(vector))
    if isinstance(vector, ChatVector) and len(vector.terms) == 1 and vector.terms[0][0] == 1.0 \
            and set(vector.shapes) == set(vector.names):
        term = vector.terms[0][1]
        sources = term.sources()
        if set(sources) == {"source"} and _folder_of(sources["source"]) and not vector.metadata.get("selected"):
            return VectorSpec(folder=_folder_of(sources["source"]))
        if set(sources) == {"base", "chat"} and all(_folder_of(s) for s in sources.values()) \
                and not vector.metadata.get("selected"):
            return VectorSpec(base=_folder_of(sources["base"]), chat=_folder_of(sources["chat"]))
    raise UsageError("a worker opens each vector itself: give saved vector folders (chatvec extract), or vectors "
                     "made by ChatVector.from_models / ChatVector.load from folders (not computed in memory)")


@dataclass(frozen=True)
class EngineSpec:
    """What a worker needs to build a ``TransformersEngine``: the target and the vectors by path or hub id, and
    where and how the model runs (``device`` and ``dtype`` are resolved in the worker; ``batch_size`` None: the
    memory-aware default of ``generation.default_batch_size``)."""
    target: str
    vectors: Mapping[str, VectorSpec] = field(default_factory=dict)
    dtype: str = "auto"
    threads: int | None = None  # torch threads in the worker (None: torch's default)
    device: str = "auto"
    batch_size: int | None = None

    @classmethod
    def of(cls, target, vectors: Mapping[str, object], threads: int | None = None, device="auto", dtype="auto",
           batch_size: int | None = None) -> "EngineSpec":
        if not isinstance(target, (str, os.PathLike)):
            raise UsageError("a worker loads the target itself: give its folder or hub id, not a model object")
        return cls(target=os.fspath(target), vectors={k: vector_spec(v) for k, v in vectors.items()}, threads=threads,
                   device=str(device), dtype=str(dtype).replace("torch.", ""), batch_size=batch_size)

    def open(self) -> "TransformersEngine":
        if self.threads:
            torch.set_num_threads(self.threads)
        model, tokenizer = load_target(self.target, device=self.device, dtype=self.dtype)
        return TransformersEngine(model, tokenizer, {k: v.open() for k, v in self.vectors.items()},
                                  batch_size=self.batch_size, checkpoint=self.target)


class TransformersEngine:
    """A transformers model whose α values move in place (``LiveModel``); the first engine.

    ``batch_size``: prompts generated together (None: ``generation.default_batch_size``, every prompt of a cell
    up to a memory-aware cap); ``checkpoint``: where the live model reads the target's values back from (see
    ``LiveModel``; None: the model's own folder)."""

    def __init__(self, model, tokenizer, vectors: Mapping[str, ChatVector] | None = None,
                 live: LiveModel | None = None, batch_size: int | None = None, checkpoint=None):
        if live is None and not vectors:
            raise UsageError("an engine needs vectors or a LiveModel")
        self.live = live if live is not None else LiveModel(model, dict(vectors), checkpoint=checkpoint)
        self.model, self.tokenizer = self.live.model, tokenizer
        self.batch_size = batch_size

    def set_alphas(self, alphas) -> None:
        self.live.set(alphas)

    def set_coefficients(self, alphas) -> None:
        warnings.warn("engine.set_coefficients is now engine.set_alphas", DeprecationWarning, stacklevel=2)
        self.set_alphas(alphas)

    def generate(self, prompts, seed: int, max_new_tokens: int, **gen_kwargs) -> pd.DataFrame:
        from chatvec_lab.errors import NonFiniteError

        gen_kwargs.setdefault("batch_size", self.batch_size)
        try:
            return generate(self.model, self.tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
                            **gen_kwargs)
        except NonFiniteError as e:
            shown = ", ".join(f"{k}={v}" for k, v in (self.live.alphas.items() if self.live else ()))
            for name, param in self.model.named_parameters():  # only now, on failure: a scan costs a pass
                if param.is_floating_point() and count_nonfinite(param.detach()):
                    where = "the target's own weights" if not any(self.live.alphas.values()) else \
                        f"the weights at α {shown}"
                    raise NonFiniteError(f"tensor {name!r} holds {count_nonfinite(param.detach())} NaN/Inf values "
                                         f"in {where}: the model cannot generate") from None
            raise NonFiniteError(f"at α {shown}: {e}" if shown else str(e)) from None

    def perplexity(self, texts) -> float:
        return perplexity(self.model, self.tokenizer, texts)

    @property
    def alphas(self) -> dict:
        return dict(self.live.alphas)

