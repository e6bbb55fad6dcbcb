"""The geometry of one query block in one launch: the Triton ``reference.block_geometry``.

A decode step that reuses its mask is otherwise two kernels of attention plus eight one-line
torch kernels of positions (``mask.geometry`` and ``mask.anchor_window``) per layer; in a CUDA
graph each of those costs ~1.2 us of work plus a dependency gap, as much as the attention. One
program per batch row writes every field of the ``Geometry`` at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import HiPConfig
from ..mask import Geometry, HiPMask, exact_rule, valid_rows, window_slots

_RULES = {"never": 0, "always": 1, "within": 2}


@triton.jit
def _exact(kv_len, RULE: tl.constexpr, CONTEXT):
    if RULE == 0:
        out = kv_len < 0
    elif RULE == 1:
        out = kv_len >= 0
    else:
        out = kv_len <= CONTEXT
    return out.to(tl.int8)


@triton.jit
def _block_geometry_kernel(
    kv_len_ptr, mask_w0_ptr, rows_ptr, p0_ptr, w0_ptr, q_pos_ptr, exact_prune_ptr, exact_attend_ptr,
    TQ, CONTEXT,
    WINDOW: tl.constexpr, BQ: tl.constexpr, LOWEST: tl.constexpr, ANCHOR: tl.constexpr, ROWS: tl.constexpr,
    PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_len = tl.load(kv_len_ptr + b)
    p0 = kv_len - TQ
    w0 = p0 - (WINDOW - 1)
    if ANCHOR:   # anchor_window: stay where stage 0 pruned, but keep the newest keys in the slots
        anchored = tl.maximum(tl.minimum(w0, tl.load(mask_w0_ptr + b)), p0 + LOWEST)
        if ROWS:
            anchored = tl.where(tl.load(rows_ptr + b) != 0, anchored, w0)
        w0 = anchored
    tl.store(p0_ptr + b, p0)
    tl.store(w0_ptr + b, w0)
    t = tl.arange(0, BQ)
    tl.store(q_pos_ptr + b * BQ + t, p0 + t)
    tl.store(exact_prune_ptr + b, _exact(kv_len, PRUNE_RULE, CONTEXT))
    tl.store(exact_attend_ptr + b, _exact(kv_len, ATTEND_RULE, CONTEXT))


def block_geometry(kv_len: torch.Tensor, tq: int, config: HiPConfig, mask: HiPMask | None = None,
                   rows: torch.Tensor | None = None) -> Geometry:
    """kv_len (B,) int64; tq <= block_size_q queries ending at kv_len; ``mask``/``rows`` as in
    ``anchor_window`` (None: no anchoring)."""
    B, dev, bq = kv_len.shape[0], kv_len.device, config.block_size_q
    kv_len = kv_len.long().contiguous()
    p0 = torch.empty(B, 1, dtype=torch.long, device=dev)
    w0 = torch.empty_like(p0)
    q_pos = torch.empty(B, 1, bq, dtype=torch.long, device=dev)
    exact = torch.empty(2, B, dtype=torch.bool, device=dev)
    anchor = mask is not None and mask.w0 is not None
    mask_w0 = mask.w0.long().contiguous() if anchor else kv_len
    row_flags = rows.contiguous().view(torch.int8) if rows is not None else kv_len
    _block_geometry_kernel[(B,)](
        kv_len, mask_w0, row_flags, p0, w0, q_pos, exact[0].view(torch.int8), exact[1].view(torch.int8),
        tq, config.model_context_length or 0,
        WINDOW=config.window, BQ=bq, LOWEST=bq - window_slots(config), ANCHOR=anchor, ROWS=rows is not None,
        PRUNE_RULE=_RULES[exact_rule(config.rope_prune, config)],
        ATTEND_RULE=_RULES[exact_rule(config.rope_attend, config)],
        num_warps=1,
    )
    return Geometry(p0, w0, q_pos, valid_rows(tq, 1, bq, dev).expand_as(q_pos), exact[0], exact[1])
