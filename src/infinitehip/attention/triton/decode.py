"""Flash-decoding: merge the per-split partial outputs of ``bsa._bsa_kernel`` (SPLIT=True).

Each split of the slot list wrote an output normalized over its own keys and its log2-sum-exp;
the merge weights split i by 2^(lse_i - max lse). Splits that saw no valid key have lse = -inf
and weight 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_pt, stride_ph, stride_ps,     # partials (B, Tq, H, NSPLIT, D), unit stride on D
    stride_lb, stride_lt, stride_lh,                # lse (B, Tq, H, NSPLIT), unit stride on NSPLIT
    stride_ob, stride_ot, stride_oh,                # out (B, Tq, H, D), unit stride on D
    TQ, H, NSPLIT,
    D: tl.constexpr, D_P: tl.constexpr, NSPLIT_P: tl.constexpr,
):
    # One program per (batch, query, head).
    pid = tl.program_id(0)
    h = pid % H
    t = (pid // H) % TQ
    b = (pid // (H * TQ)).to(tl.int64)
    sp = tl.arange(0, NSPLIT_P)
    d = tl.arange(0, D_P)
    lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + h * stride_lh + sp, mask=sp < NSPLIT,
                  other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, axis=0))                                      # (NSPLIT_P,)
    part = tl.load(part_ptr + b * stride_pb + t * stride_pt + h * stride_ph + sp[:, None] * stride_ps
                   + d[None, :], mask=(sp[:, None] < NSPLIT) & (d[None, :] < D), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)                      # (D_P,)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


def combine(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """part (B, Tq, H, NSPLIT, D) float32, lse (B, Tq, H, NSPLIT) float32 -> out (B, Tq, H, D)."""
    B, tq, H, nsplit, D = part.shape
    assert part.stride(-1) == 1 and lse.stride(-1) == 1 and out.stride(-1) == 1
    _combine_kernel[(B * tq * H,)](
        part, lse, out,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        tq, H, nsplit,
        D=D, D_P=triton.next_power_of_2(D), NSPLIT_P=max(2, triton.next_power_of_2(nsplit)),
        num_warps=4 if D >= 128 else 2,
    )
    return out
