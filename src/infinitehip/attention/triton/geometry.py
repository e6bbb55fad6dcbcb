"""The geometry of one query block in one launch: the Triton ``reference.block_geometry``.

A decode step that reuses its mask is otherwise two kernels of attention plus eight one-line
torch kernels of positions (``mask.geometry`` and ``mask.anchor_window``) per layer; in a CUDA
graph each of those costs ~1.2 us of work plus a dependency gap, as much as the attention. One
program per batch row writes every field of the ``Geometry`` at once.

``block_positions`` is the per-row arithmetic itself, shared with the attention kernel: a decode
step that reuses its mask computes its positions inside attention (``ops.attend_reused``) and
launches nothing else.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import HiPConfig
from ..mask import Geometry, HiPMask, exact_rule, valid_rows, window_slots
from .pdl import launch_options, release_next, wait_for_previous

_RULES = {"never": 0, "always": 1, "within": 2}


def position_constants(config: HiPConfig) -> dict:
    """The compile-time keywords of ``block_positions`` for one config."""
    return dict(WINDOW=config.window,
                LOWEST=config.block_size_q - window_slots(config),   # the window's slots must hold the newest keys
                PRUNE_RULE=_RULES[exact_rule(config.rope_prune, config)],
                ATTEND_RULE=_RULES[exact_rule(config.rope_attend, config)])


@triton.jit
def _exact(kv_len, RULE: tl.constexpr, CONTEXT):
    if RULE == 0:
        out = kv_len < 0
    elif RULE == 1:
        out = kv_len >= 0
    else:
        out = kv_len <= CONTEXT
    return out


@triton.jit
def block_positions(b, kv_len_ptr, mask_w0_ptr, rows_ptr, TQ, TK, CONTEXT,
                    LENS: tl.constexpr, ANCHOR: tl.constexpr, ROWS: tl.constexpr, WINDOW: tl.constexpr,
                    LOWEST: tl.constexpr, PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr):
    """Row ``b``'s single query block: (p0, w0, exact_prune, exact_attend), int64 / bool scalars.

    kv_len_ptr (B,) valid keys per row (LENS; else every row has TK); mask_w0_ptr (B,) the
    window start when stage 0 last pruned (ANCHOR); rows_ptr (B,) int8, the rows that keep that
    anchor (ROWS; else all do).
    """
    if LENS:
        kv_len = tl.load(kv_len_ptr + b).to(tl.int64)
    else:
        kv_len = tl.full([], TK, tl.int64)
    p0 = kv_len - TQ
    w0 = p0 - (WINDOW - 1)
    if ANCHOR:   # anchor_window: stay where stage 0 pruned, but keep the newest keys in the slots
        anchored = tl.maximum(tl.minimum(w0, tl.load(mask_w0_ptr + b).to(tl.int64)), p0 + LOWEST)
        if ROWS:
            anchored = tl.where(tl.load(rows_ptr + b) != 0, anchored, w0)
        w0 = anchored
    return p0, w0, _exact(kv_len, PRUNE_RULE, CONTEXT), _exact(kv_len, ATTEND_RULE, CONTEXT)


@triton.jit
def _block_geometry_kernel(
    kv_len_ptr, mask_w0_ptr, rows_ptr, p0_ptr, w0_ptr, q_pos_ptr, exact_prune_ptr, exact_attend_ptr,
    TQ, CONTEXT,
    BQ: tl.constexpr, ANCHOR: tl.constexpr, ROWS: tl.constexpr,
    WINDOW: tl.constexpr, LOWEST: tl.constexpr, PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    b = tl.program_id(0)
    p0, w0, exact_prune, exact_attend = block_positions(
        b, kv_len_ptr, mask_w0_ptr, rows_ptr, TQ, 0, CONTEXT, True, ANCHOR, ROWS,
        WINDOW, LOWEST, PRUNE_RULE, ATTEND_RULE)
    tl.store(p0_ptr + b, p0)
    tl.store(w0_ptr + b, w0)
    t = tl.arange(0, BQ)
    tl.store(q_pos_ptr + b * BQ + t, p0 + t)
    tl.store(exact_prune_ptr + b, exact_prune.to(tl.int8))
    tl.store(exact_attend_ptr + b, exact_attend.to(tl.int8))


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
    opts = launch_options(dev)
    _block_geometry_kernel[(B,)](
        kv_len, mask_w0, row_flags, p0, w0, q_pos, exact[0].view(torch.int8), exact[1].view(torch.int8),
        tq, config.model_context_length or 0,
        BQ=bq, ANCHOR=anchor, ROWS=rows is not None, **position_constants(config),
        PDL=bool(opts), num_warps=1, **opts,
    )
    return Geometry(p0, w0, q_pos, valid_rows(tq, 1, bq, dev).expand_as(q_pos), exact[0], exact[1])
