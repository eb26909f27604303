"""A model whose chat-vector α values change in place, without reloading.

    live = LiveModel(model, {"chat": cv, "alt": cv_alt})
    live.set(chat=1.0)          # weights = target + 1.0·chat
    live.set(chat=0.5, alt=0.5)
    live.reset()                # back to the target, bit for bit

What it costs is about one model: the model itself and the tensor it is rewriting.

- **No second copy of the target.** The target's values are read back from its checkpoint (memory-mapped, a
  tensor at a time) whenever a tensor is rewritten. At construction each tensor the vectors touch is compared,
  bit for bit, with the checkpoint's (``checkpoint``: the model's own folder by default); only a tensor that
  differs (the model was changed after loading, or came from no checkpoint) is copied, to CPU memory, in the
  model's dtype: ``original`` holds those copies.
- **No deltas held.** A vector's deltas are read when a tensor is rewritten, from the vector's own storage (a
  saved vector's memory-mapped shards, or the two models of ``chat − base``), as ``apply_vectors`` reads them.
- **The same arithmetic as ``apply_vectors``.** Each rewrite is ``apply``'s :func:`merge_tensor`: the target
  in float32, plus each α·delta (multiplied, then added, in vector order), rounded once to the model's dtype. So
  the live model at α equals ``chatvec apply`` at α bit for bit, in the model's dtype, on any device (the
  arithmetic runs on the CPU; the result is copied to the model's device).

A change rewrites only the tensors whose α values change (``rewritten`` counts them), and a tensor written
by anyone else since is rewritten too (torch's version counter tells).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping

import torch

from chatvec_lab.errors import MismatchError, NonFiniteError, SourceError, UnknownName, UsageError
from chatvec_lab.io.naming import parse
from chatvec_lab.core.plan import Alpha, coefficient_for, layer_filter, plan_apply
from chatvec_lab.io.paging import paged_rows
from chatvec_lab.io.sources import WeightSource, model_folder, module_state, open_weights
from chatvec_lab.core.vector import CHUNK_ELEMENTS, ChatVector, row_blocks

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so that -0.0 differs from 0.0 and a NaN equals itself)."""
    return t.view(_BITS[t.element_size()]) if t.element_size() in _BITS else t


def same_values(stored: torch.Tensor, param: torch.Tensor, chunk: int = CHUNK_ELEMENTS) -> bool:
    """Whether ``stored`` (a checkpoint's tensor, any dtype) cast to ``param``'s dtype equals ``param`` bit for
    bit; read a block of rows at a time (a memory-mapped tensor's pages are dropped as it goes)."""
    if tuple(stored.shape) != tuple(param.shape) or not stored.is_floating_point():
        return False
    for index in paged_rows([stored], row_blocks(tuple(stored.shape), None, chunk), release=True):
        mine = param.detach()[index].to("cpu")
        if not torch.equal(_bits(stored[index].to(param.dtype)), _bits(mine)):
            return False
    return True


class LiveModel:
    """``model`` with ``vectors`` (a vector, or ``{name: vector}``) whose α values ``set`` changes in place.

    ``checkpoint``: where the target's values are read back from: None (the default) for the model's own folder
    (``config._name_or_path``), a folder, hub id or weight source, or False to keep a CPU copy of every tensor the
    vectors touch instead. ``embeddings``, ``include``, ``exclude``, ``layers``: as for ``apply_vectors``."""

    def __init__(self, model: torch.nn.Module, vectors: Mapping[str, ChatVector] | ChatVector,
                 embeddings: str = "error", include: str | None = None, exclude: str | None = None,
                 layers=None, checkpoint=None):
        if isinstance(vectors, ChatVector):
            vectors = {"chat": vectors}
        if not vectors:
            raise UsageError("no vector given")
        self.model = model
        self.names = list(vectors)
        state = module_state(model)
        source = open_weights(state)
        self.pairs = [(ChatVector.open(v), 1.0) for v in vectors.values()]
        if embeddings in ("tokens", "union"):
            raise UsageError(f"embeddings={embeddings!r} is for apply_vectors; a live model keeps its vocabulary")
        plans, self.notes = plan_apply(source, self.pairs, embeddings, layer_filter(layers, include, exclude),
                                       no_target_vocab="a live model (sweep, eval, the panel) keeps the target's "
                                       "vocabulary: to match rows by token, write a checkpoint with apply_vectors "
                                       "(chatvec apply --embeddings tokens) and use that")
        self.plans = {n: p for n, p in plans.items() if p.added}
        if not self.plans:
            raise MismatchError("none of the model's tensors is changed by these vectors")
        self.params = {n: state[n] for n in self.plans}
        self.checkpoint = self._open_checkpoint(model, checkpoint)
        # the target's values of the tensors the checkpoint cannot give back exactly, on the CPU, in the model's dtype
        self.original: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            if not self._in_checkpoint(name, param):
                self.original[name] = param.detach().to("cpu", copy=True)
        self.alphas: dict[str, Alpha] = {k: 0.0 for k in self.names}  # α per vector name, as the weights hold them
        # per tensor: (the α values it holds, its torch version counter after our write), or () if unknown
        self._applied: dict[str, tuple] = {n: ((), t._version) for n, t in self.params.items()}
        self.rewritten = 0  # tensors rewritten by the last set(): the cost of a change is theirs alone

    @staticmethod
    def _open_checkpoint(model, checkpoint) -> WeightSource | None:
        if checkpoint is False:
            return None
        if checkpoint is None:
            checkpoint = model_folder(model)
            if checkpoint is None:
                return None
            try:
                return open_weights(checkpoint)
            except SourceError:  # no weights beside the config (or pickles only): keep copies instead
                return None
        return open_weights(checkpoint)

    def _in_checkpoint(self, name: str, param: torch.Tensor) -> bool:
        if self.checkpoint is None or name not in self.checkpoint:
            return False
        return same_values(self.checkpoint.get(name), param)

    @property
    def kept_bytes(self) -> int:
        """Bytes of target values held in memory (tensors the checkpoint could not give back)."""
        return sum(t.numel() * t.element_size() for t in self.original.values())

    def target_tensor(self, name: str) -> torch.Tensor:
        """The target's values of tensor ``name`` (on the CPU, in the model's dtype): the kept copy, or the
        checkpoint's tensor (memory-mapped; cast if the model runs in another dtype). Don't modify it."""
        if name in self.original:
            return self.original[name]
        stored = self.checkpoint.get(name)
        dtype = self.params[name].dtype
        return stored if stored.dtype == dtype else stored.to(dtype)

    def _check(self, alphas: Mapping[str, Alpha]) -> dict[str, Alpha]:
        unknown = set(alphas) - set(self.names)
        if unknown:
            raise UnknownName(f"unknown vector(s) {sorted(unknown)}; this model holds {self.names}")
        merged = {**self.alphas, **alphas}
        for name in self.plans:  # validate every rule before touching a weight
            for key in self.names:
                coefficient_for(parse(name), merged[key])
        return merged

    @torch.no_grad()
    def set(self, alphas: Mapping[str, Alpha] | None = None, **kwargs: Alpha) -> None:
        """Set α (by vector name); the weights become ``target + Σ αᵢ·vᵢ``.

        Values of α that make a weight overflow to Inf (or NaN) in its dtype are refused with a NonFiniteError
        naming the tensor, and the model is left at the α values it held before."""
        merged = self._check({**(alphas or {}), **kwargs})
        previous = dict(self.alphas)
        try:
            self._write(merged)
        except NonFiniteError:
            self._write(previous)  # finite before: every tensor written so far goes back
            self.alphas = previous
            raise
        self.alphas = merged

    def _write(self, merged: dict) -> None:
        from chatvec_lab.core.apply import merge_tensor

        self.rewritten = 0
        for name, param in self.params.items():
            plan = self.plans[name]
            info = parse(name)
            coefs = [coefficient_for(info, merged[key]) if plan.sources[i] is not None else 0.0
                     for i, key in enumerate(self.names)]
            held_key = tuple((k, c) for k, c in zip(self.names, coefs) if c != 0)
            held = self._applied[name]
            if held and held[0] == held_key and held[1] == param._version:
                continue  # holds these α values, and nothing wrote to it since (torch counts in-place writes)
            self._applied[name] = ()  # until the write below completes
            self.rewritten += 1
            target = self.target_tensor(name)
            if not held_key:
                param.copy_(target)
            else:
                try:  # apply's own arithmetic: target + α·delta in float32, rounded once; checked finite
                    result = merge_tensor(target, dataclasses.replace(plan, coefficients=coefs), self.pairs)
                except NonFiniteError as e:  # _applied stays empty: the restore rewrites it
                    shown = ", ".join(f"{k}={c:g}" for k, c in held_key)
                    raise NonFiniteError(f"α {shown} makes tensor {name!r} overflow to Inf/NaN in "
                                         f"{str(param.dtype).replace('torch.', '')} (largest "
                                         f"{torch.finfo(param.dtype).max:.3g}): use a smaller α; the model "
                                         f"is left as it was ({e})") from None
                param.copy_(result)
                del result
            del target
            self._applied[name] = (held_key, param._version)

    @property
    def coefficients(self) -> dict[str, Alpha]:
        """Deprecated spelling of :attr:`alphas`."""
        warnings.warn("LiveModel.coefficients is now LiveModel.alphas", DeprecationWarning, stacklevel=2)
        return self.alphas

    def reset(self) -> None:
        self.set({k: 0.0 for k in self.names})
