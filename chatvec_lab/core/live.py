"""A model whose chat-vector coefficients change in place, without reloading.

    live = LiveModel(model, {"chat": cv, "alt": cv_alt})
    live.set(chat=1.0)          # weights = target + 1.0·chat
    live.set(chat=0.5, alt=0.5)
    live.reset()                # back to the target, bit for bit

It keeps one copy of the tensors the vectors touch (the target's values) and the vectors' deltas;
a change rewrites only those tensors.
"""
from __future__ import annotations

from typing import Mapping

import torch

from chatvec_lab.errors import MismatchError, NonFiniteError, UnknownName, UsageError
from chatvec_lab.io.naming import parse
from chatvec_lab.core.plan import Alpha, coefficient_for, layer_filter, plan_apply
from chatvec_lab.io.sources import module_state, open_weights
from chatvec_lab.core.vector import ChatVector


class LiveModel:
    def __init__(self, model: torch.nn.Module, vectors: Mapping[str, ChatVector] | ChatVector,
                 embeddings: str = "error", include: str | None = None, exclude: str | None = None,
                 layers=None):
        if isinstance(vectors, ChatVector):
            vectors = {"chat": vectors}
        if not vectors:
            raise UsageError("no vector given")
        self.model = model
        self.names = list(vectors)
        state = module_state(model)
        source = open_weights(state)
        pairs = [(ChatVector.open(v), 1.0) for v in vectors.values()]
        if embeddings in ("tokens", "union"):
            raise UsageError(f"embeddings={embeddings!r} is for apply_vectors; a live model keeps its vocabulary")
        plans, self.notes = plan_apply(source, pairs, embeddings, layer_filter(layers, include, exclude))
        self.plans = {n: p for n, p in plans.items() if p.added}
        if not self.plans:
            raise MismatchError("none of the model's tensors is changed by these vectors")
        self.params = {n: state[n] for n in self.plans}
        self.original = {n: t.detach().clone() for n, t in self.params.items()}
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        for i, (key, (vec, _)) in enumerate(zip(self.names, pairs)):
            d = {}
            for name, plan in self.plans.items():
                src = plan.sources[i]
                if src is not None:
                    delta = vec[src]
                    if plan.rows is not None:
                        delta = delta[: plan.rows].contiguous()
                    d[name] = delta.to(self.params[name].device)
            self.deltas[key] = d
        self.coefficients: dict[str, Alpha] = {k: 0.0 for k in self.names}
        # per tensor: (the coefficients it holds, its torch version counter after our write), or () if unknown
        self._applied: dict[str, tuple] = {n: ((), t._version) for n, t in self.params.items()}
        self.rewritten = 0  # tensors rewritten by the last set(): the cost of a change is theirs alone

    def _check(self, alphas: Mapping[str, Alpha]) -> dict[str, Alpha]:
        unknown = set(alphas) - set(self.names)
        if unknown:
            raise UnknownName(f"unknown vector(s) {sorted(unknown)}; this model holds {self.names}")
        merged = {**self.coefficients, **alphas}
        for name in self.plans:  # validate every rule before touching a weight
            for key in self.names:
                coefficient_for(parse(name), merged[key])
        return merged

    @torch.no_grad()
    def set(self, alphas: Mapping[str, Alpha] | None = None, **kwargs: Alpha) -> None:
        """Set the coefficients (by vector name); the weights become ``target + Σ αᵢ·vᵢ``.

        Coefficients that make a weight overflow to Inf (or NaN) in its dtype are refused with a NonFiniteError
        naming the tensor, and the model is left at the coefficients it held before."""
        merged = self._check({**(alphas or {}), **kwargs})
        previous = dict(self.coefficients)
        try:
            self._write(merged)
        except NonFiniteError:
            self._write(previous)  # finite before: every tensor written so far goes back
            self.coefficients = previous
            raise
        self.coefficients = merged

    def _write(self, merged: dict) -> None:
        from chatvec_lab.core.apply import is_finite

        self.rewritten = 0
        for name, param in self.params.items():
            info = parse(name)
            coefs = [(key, coefficient_for(info, merged[key])) for key in self.names if name in self.deltas[key]]
            coefs = [(k, c) for k, c in coefs if c != 0]
            held = self._applied[name]
            if held and held[0] == tuple(coefs) and held[1] == param._version:
                continue  # holds these coefficients, and nothing wrote to it since (torch counts in-place writes)
            self._applied[name] = ()  # until the write below completes
            self.rewritten += 1
            if not coefs:
                param.copy_(self.original[name])
                self._applied[name] = (tuple(coefs), param._version)
                continue
            rows = self.plans[name].rows
            if param.dtype == torch.float32 and rows is None:
                # fast path, two passes per vector through a reused buffer; same rounding as apply:
                # target + round(α·v), added in vector order
                buf = self._scratch(param)
                first = True
                for key, c in coefs:
                    torch.mul(self.deltas[key][name], c, out=buf)
                    if first:
                        torch.add(self.original[name], buf, out=param)
                        first = False
                    else:
                        param.add_(buf)
            else:
                acc = self.original[name].to(torch.float32, copy=True)
                view = acc[:rows] if rows is not None else acc
                for key, c in coefs:
                    view.add_(self.deltas[key][name] * c)
                param.copy_(acc)
            if not is_finite(param):  # _applied stays empty: the restore rewrites it
                shown = ", ".join(f"{k}={c:g}" for k, c in coefs)
                raise NonFiniteError(f"coefficients {shown} make tensor {name!r} overflow to Inf/NaN in "
                                     f"{str(param.dtype).replace('torch.', '')} (largest "
                                     f"{torch.finfo(param.dtype).max:.3g}): use smaller coefficients; the model is "
                                     "left as it was")
            self._applied[name] = (tuple(coefs), param._version)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        buf = getattr(self, "_buffer", None)
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = self._buffer = torch.empty(max(n, max(p.numel() for p in self.params.values())),
                                             dtype=torch.float32, device=like.device)
        return buf[:n].view(like.shape)

    def reset(self) -> None:
        self.set({k: 0.0 for k in self.names})
