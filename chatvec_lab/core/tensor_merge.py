"""The arithmetic of one tensor: ``target + Σ αᵢ·vectorᵢ``, a block of rows at a time, checked finite.

``merge_tensor`` adds the vectors' deltas to the target's rows by index; ``merge_token_rows`` matches rows by
token (a token the chat model added takes the chat model's row). Both accumulate in float32 and write the
target's dtype; a block that is not finite in that dtype raises a :class:`~chatvec_lab.errors.NonFiniteError`
naming the tensor and the cause (the target, a vector, a coefficient too large for float32, or a result past the
dtype's range). Which tensors get which coefficients is planned beforehand (:mod:`chatvec_lab.core.plan`).
"""
from __future__ import annotations

import torch

from chatvec_lab.core.plan import Alpha, TensorPlan
from chatvec_lab.core.terms import CHUNK_ELEMENTS, row_blocks
from chatvec_lab.core.vector import ChatVector
from chatvec_lab.errors import MismatchError, NonFiniteError, check_finite, count_nonfinite
from chatvec_lab.io.paging import paged_rows
from chatvec_lab.io.vocab import TokenRows


def merge_tensor(target_tensor: torch.Tensor, plan: TensorPlan, pairs: list[tuple[ChatVector, Alpha]],
                 chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``target + Σ αᵢ·vᵢ``, accumulated in float32 a block of rows at a time, in the target's dtype.

    What is written is checked: a block that is not finite in the target's dtype raises, naming the tensor and
    the cause (the target, a vector, a coefficient too large for float32, or a result past the dtype's range)."""
    if not (target_tensor.is_floating_point() or target_tensor.is_complex()) and any(c != 0 for c in plan.coefficients):
        raise MismatchError(f"tensor {plan.name!r}: the target stores it as {target_tensor.dtype} (quantized or "
                            "integer); adding a float delta would truncate it. Apply to a float checkpoint "
                            "(dequantize first), or leave the tensor out with --exclude")
    out = torch.empty_like(target_tensor)
    sources = plan.sources or [plan.name if plan.name in vec else None for vec, _ in pairs]
    active = [(coef, vec, src) for coef, (vec, _), src in zip(plan.coefficients, pairs, sources)
              if coef != 0 and src is not None]
    streams = [(coef, vec.blocks(src, rows=plan.rows, chunk=chunk, check=False)) for coef, vec, src in active]
    # a large memory-mapped target is faulted in a block ahead, by a background thread
    for index in paged_rows([target_tensor], row_blocks(tuple(target_tensor.shape), plan.rows, chunk)):
        acc = target_tensor[index].to(torch.float32, copy=True)
        for coef, stream in streams:
            _, delta = next(stream)
            if coef != 1:
                delta.mul_(coef)  # multiply, then add: the naive formula's rounding
            acc.add_(delta)
        out[index] = acc
        if count_nonfinite(out[index]):
            _explain_nonfinite(plan, index, target_tensor, active, chunk, acc, out.dtype)
    if plan.rows is not None and plan.rows < target_tensor.shape[0]:
        out[plan.rows:] = target_tensor[plan.rows:]
        check_finite(out[plan.rows:], f"tensor {plan.name!r} in the target")
    return out


def merge_token_rows(target_tensor: torch.Tensor, plan: TensorPlan, pairs: list[tuple[ChatVector, Alpha]],
                     target_only: str = "keep", chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """A token-indexed tensor whose rows are matched to the vectors' by token: each target row gets α times the
    delta of its token's row; a row of a token the chat model added is replaced by the chat model's row; rows of
    tokens a vector lacks keep the target's (``target_only='keep'``) or get α times the vector's mean delta
    (``'mean'``); a union vocabulary appends the chat model's rows of the tokens it adds."""
    rows_in = target_tensor.shape[0]
    out = torch.zeros((plan.out_rows or rows_in, *target_tensor.shape[1:]), dtype=target_tensor.dtype)
    active = [(coef, vec.row_reader(src), tr, _mean_delta(vec, src, tr) if target_only == "mean" else None)
              for coef, (vec, _), src, tr in zip(plan.coefficients, pairs, plan.sources, plan.token_rows)
              if coef != 0 and src is not None and tr is not None]
    for index in row_blocks(tuple(target_tensor.shape), None, chunk):
        acc = target_tensor[index].to(torch.float32, copy=True)
        for coef, read, tr, mean in active:
            rows, absolute = tr.rows[index], tr.absolute[index]
            delta = (rows >= 0) & ~absolute
            if delta.any():
                acc[delta] += read(rows[delta]).mul_(coef)
            if absolute.any():
                acc[absolute] = read(rows[absolute])
            if mean is not None and (rows < 0).any():
                acc[rows < 0] += mean * coef
        out[index] = acc
        if count_nonfinite(out[index]):
            raise NonFiniteError(f"tensor {plan.name!r}: a block of rows matched by token is not finite in "
                                 f"{str(out.dtype).replace('torch.', '')} (check the vectors and coefficients)")
    for coef, read, tr, _ in active:
        for vector_row, out_row in tr.appended:
            out[out_row] = read(torch.tensor([vector_row]))[0].to(out.dtype)
    return out


def _mean_delta(vec: ChatVector, name: str, tr: TokenRows) -> torch.Tensor:
    """The mean delta over the vector's rows that are differences (not chat-added rows)."""
    total, count = None, 0
    chat_rows = set(vec.chat_rows)
    for index, block in vec.blocks(name):
        keep = [i for i in range(index.start, index.stop) if i not in chat_rows] if chat_rows else None
        part = block if keep is None else block[torch.tensor(keep, dtype=torch.long) - index.start]
        s = part.sum(0)
        total = s if total is None else total + s
        count += part.shape[0]
    return total / max(count, 1)


def _explain_nonfinite(plan: TensorPlan, index, target_tensor, active, chunk, acc, dtype) -> None:
    """Raise the reason a merged block is not finite (only on that rare path are the inputs read again)."""
    name = plan.name
    check_finite(target_tensor[index].float(), f"tensor {name!r} in the target")
    for coef, vec, src in active:
        raw = next(block for i, block in vec.blocks(src, rows=plan.rows, chunk=chunk, check=False) if i == index)
        check_finite(raw, f"tensor {name!r} in a vector (its base or chat)")
        if count_nonfinite(raw * coef):
            raise NonFiniteError(f"tensor {name!r}: coefficient {coef:g} × the vector overflows float32 "
                                 f"(largest |delta| {float(raw.abs().max()):.3g}); use a smaller coefficient")
    if count_nonfinite(acc):
        raise NonFiniteError(f"tensor {name!r}: target + Σ coefficient·vector overflows float32; "
                             "use smaller coefficients")
    raise NonFiniteError(f"tensor {name!r}: the result (largest |value| {float(acc.abs().max()):.3g}) does not fit "
                         f"the target's {str(dtype).replace('torch.', '')} (largest {torch.finfo(dtype).max:.3g}); "
                         "use a smaller coefficient")
