"""Pruning queries in one launch: the Triton ``reference.pool_queries``.

In torch, rotating and averaging a block's queries is ~15 small kernels (cast, pad, cos/sin,
rotate_half, masks, sums, divide): in a decode refresh, more launches than the pruning itself,
each a few microseconds of dependency gap in a CUDA graph. Here one program per (batch row,
query block, head) loads the block's rows, rotates them in registers (exact mode: each row at
its offset from the block start; relative mode: every row at RELATIVE_QUERY_DISTANCE) and writes
the mean of each group of STRIDE rows, and whether the group holds a real query.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import RELATIVE_QUERY_DISTANCE, Geometry, pooled_rows
from ..rope import RoPE
from .pdl import launch_options, release_next, wait_for_previous
from .prune import _rotate


@triton.jit
def _pool_kernel(
    q_ptr, exact_ptr, inv_freq_ptr, attention_scaling: tl.constexpr, qp_ptr, valid_ptr,
    stride_qb, stride_qt, stride_qh,                # q (B, Tq, H, D), unit stride on D
    stride_pb, stride_pq, stride_pr, stride_ph,     # qp (B, NQB, R, H, D) float32, unit stride on D
    stride_vb, stride_vq,                           # valid (B, NQB, R) int8, unit stride on R
    TQ, NQB, H,
    ROWS: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, STRIDE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, FAST: tl.constexpr, DISTANCE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    pid = tl.program_id(0)
    h = pid % H
    qb = (pid // H) % NQB
    b = (pid // (H * NQB)).to(tl.int64)
    r = tl.arange(0, R_P)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    exact = tl.load(exact_ptr + b) != 0
    inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
    acc1 = tl.zeros((R_P, HALF_P), tl.float32)
    acc2 = tl.zeros((R_P, HALF_P), tl.float32)
    count = tl.zeros((R_P,), tl.int32)
    for s in range(STRIDE):
        t = r * STRIDE + s                          # row of the block; query qb * ROWS + t
        ok = (r < R) & (qb * ROWS + t < TQ)
        off = b * stride_qb + (qb * ROWS + t).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :]
        mask = ok[:, None] & d_ok[None, :]
        x1 = tl.load(q_ptr + off, mask=mask, other=0.0).to(tl.float32)      # (R_P, HALF_P)
        x2 = tl.load(q_ptr + off + HALF, mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            x1, x2 = _rotate(x1, x2, tl.where(exact, t, DISTANCE), inv_freq, attention_scaling, FAST)
        acc1 += x1
        acc2 += x2
        count += ok.to(tl.int32)
    n = tl.maximum(count, 1).to(tl.float32)[:, None]
    out = b * stride_pb + qb * stride_pq + r[:, None] * stride_pr + h * stride_ph + d[None, :]
    out_mask = (r < R)[:, None] & d_ok[None, :]
    tl.store(qp_ptr + out, acc1 / n, mask=out_mask)
    tl.store(qp_ptr + out + HALF, acc2 / n, mask=out_mask)
    if h == 0:
        tl.store(valid_ptr + b * stride_vb + qb * stride_vq + r, (count > 0).to(tl.int8), mask=r < R)


def pool_queries(q: torch.Tensor, geo: Geometry, stride: int, rope: RoPE | None):
    """Triton ``reference.pool_queries``: q (B, Tq, H, D) -> qp (B, NQB, R, H, D) float32 and
    q_valid (B, NQB, R) bool. ``geo.q_pos`` must be ``geo.p0 + row`` (as ``geometry`` builds it)."""
    B, tq, H, D = q.shape
    nqb, bq = geo.q_pos.shape[1:]
    rows = pooled_rows(tq, bq, stride)
    R = rows // stride
    if q.stride(-1) != 1:
        q = q.contiguous()
    qp = torch.empty(B, nqb, R, H, D, device=q.device, dtype=torch.float32)
    valid = torch.empty(B, nqb, R, device=q.device, dtype=torch.bool)
    vi = valid.view(torch.int8)
    half = D // 2
    half_p = max(16, triton.next_power_of_2(half))
    r_p = triton.next_power_of_2(R)
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1, device=q.device)).to(q.device, torch.float32)
    opts = launch_options(q.device)
    _pool_kernel[(B * nqb * H,)](
        q, geo.exact_prune.view(torch.int8), inv_freq, float(rope.attention_scaling if rope is not None else 1.0),
        qp, vi,
        q.stride(0), q.stride(1), q.stride(2),
        qp.stride(0), qp.stride(1), qp.stride(2), qp.stride(3),
        vi.stride(0), vi.stride(1),
        tq, nqb, H,
        ROWS=rows, R=R, R_P=r_p, STRIDE=stride, HALF=half, HALF_P=half_p, ROPE=rope is not None,
        FAST=q.is_cuda, DISTANCE=RELATIVE_QUERY_DISTANCE,
        PDL=bool(opts), num_warps=max(1, min(4, r_p * half_p // 256)), **opts,
    )
    return qp, valid
