"""The lineage check of ``apply``: how far the target lies from the vector's base, ‖target − base‖/‖base‖.

A vector transfers to models that descend from its base; a target far from that base probably does not. The base
is the one given, else the one the vector is built from, else the folder the vector records, checked against the
names, sizes and (for small models) sha256 of the files it was extracted from. Token-indexed tensors are compared
on the rows of the same token when the apply matches rows by token (a target whose vocabulary is permuted is as
near its base as the original). The estimate reads every ``LINEAGE_STRIDE``-th block of rows.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from chatvec_lab.core.metadata import base_changes
from chatvec_lab.core.terms import row_blocks
from chatvec_lab.errors import SourceError
from chatvec_lab.io.sources import WeightSource, open_weights
from chatvec_lab.io.vocab import Vocabulary, row_map

LINEAGE_WARN = 0.5
LINEAGE_STRIDE = 4
RowPairs = tuple[torch.Tensor, torch.Tensor]  # (target rows, base rows) of the same tokens


def accumulate(acc: list[float], target_t: torch.Tensor, base_t: torch.Tensor | None,
               rows: RowPairs | None = None) -> None:
    """Add ‖target − base‖² and ‖base‖² of one weight matrix to ``acc`` (norm gains near 1 would hide a stranger),
    on rows of the same index, or on the row pairs ``rows`` (token-indexed tensors matched by token)."""
    if base_t is None or target_t.dim() < 2 or not target_t.is_floating_point():
        return
    if target_t.shape[1:] != base_t.shape[1:]:
        return
    if rows is None:
        n = min(target_t.shape[0], base_t.shape[0])
        blocks = ((index, index) for index in row_blocks(tuple(target_t.shape), n))
    else:
        t_rows, b_rows = rows
        blocks = ((t_rows[index], b_rows[index]) for index in row_blocks((len(t_rows), *target_t.shape[1:])))
    for i, (t_index, b_index) in enumerate(blocks):
        if i % LINEAGE_STRIDE:
            continue  # an estimate from every LINEAGE_STRIDE-th block of rows is plenty for a warning
        b = base_t[b_index].to(torch.float32)
        d = target_t[t_index].to(torch.float32) - b
        acc[0] += float(torch.dot(d.reshape(-1), d.reshape(-1)))
        acc[1] += float(torch.dot(b.reshape(-1), b.reshape(-1)))


def resolve_base(base, pairs, check: bool) -> tuple[WeightSource | None, bool, list[str]]:
    """The source for the lineage check, whether it is the vector's own (read anyway), and warnings about it: the
    given base, else the base a vector is built from, else the base a saved vector records, where that folder
    still exists (and a warning when its files are not those the vector was extracted from). ``check`` False:
    no base at all, not even opened."""
    if not check:
        return None, False, []
    if base is not None:
        return open_weights(base), False, []
    for vec, _ in pairs:
        src = vec.base_source
        if src is not None:
            return src, True, []
    for vec, _ in pairs:
        recorded = vec.recorded_base()
        if recorded is not None:
            try:
                src = open_weights(recorded)
            except SourceError as e:
                why = "has no weights" if str(e).startswith("no weights") else f"cannot be read ({e})"
                raise SourceError(f"the vector's recorded base {recorded} {why}; pass --base or "
                                  "--no-lineage-check (base= or check_lineage=False)") from None
            return src, False, recorded_base_warnings(vec.metadata.get("base") or {}, recorded, src)
    return None, False, []


def recorded_base_warnings(fingerprint: dict, folder: Path, src: WeightSource) -> list[str]:
    """What to say of the base a vector records, as found now: changed since extraction, or found by a relative
    path (a vector from before 0.1), which resolves against the current folder."""
    out = []
    changed = base_changes(fingerprint, getattr(src, "files", None))
    if changed:
        out.append(f"the vector's recorded base {folder} has changed since the vector was extracted ({changed}): "
                   "the lineage is measured against what lies there now; pass --base for the true base")
    if not fingerprint.get("path") and not os.path.isabs(str(fingerprint.get("source", ""))):
        out.append(f"the vector records its base by a relative path, {fingerprint.get('source')!r}, found in the "
                   f"current folder ({Path(folder).resolve()}); pass --base if that is not its base")
    return out


def token_row_pairs(plans, target: WeightSource, base: WeightSource, target_vocab: Vocabulary | None) \
        -> dict[str, RowPairs]:
    """For each tensor whose rows the apply matches by token: the target and base rows of the same token, so the
    lineage compares like with like. Without the base's vocabulary no rows are paired: the tensor is left out."""
    names = [n for n, p in plans.items() if any(r is not None for r in p.token_rows) and n in base]
    if not names:
        return {}
    base_vocab = Vocabulary.of_folder(base.folder) if getattr(base, "folder", None) else None
    empty = torch.zeros(0, dtype=torch.long)
    out = {}
    for name in names:
        if base_vocab is None or target_vocab is None:
            out[name] = (empty, empty)
            continue
        b_rows = row_map(target.shape(name)[0], target_vocab, base_vocab)
        keep = (b_rows >= 0) & (b_rows < base.shape(name)[0])
        out[name] = (keep.nonzero().flatten(), b_rows[keep])
    return out
