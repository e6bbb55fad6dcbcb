"""The model's two elementwise steps as one Triton launch each, for CUDA (``llama.py`` calls them
there; decode replays them per layer, where each PyTorch kernel costs microseconds whatever its
size: on an H200 at 256K ``F.rms_norm`` took 6.3 us a call, 65 calls a token, and SiLU then the
product were two launches). Their PyTorch statements are the CPU path and the tests' reference:

- ``rms_norm_triton(x, w, eps)``: ``F.rms_norm(x, w.shape, w, eps)``: float32 math, rounded once.
- ``silu_mul_triton(gate_up)``: ``F.silu(gate) * up`` of the fused w13 output (..., 2 I): SiLU
  rounded to the input dtype before the product, as the two PyTorch ops round.
- ``argmax_triton(logits)``: ``logits.argmax(-1)`` of (B, V) rows, greedy decoding's pick
  (PyTorch's took 27 us for one 128K-vocabulary row on an H200, a single-row reduction).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.triton.decode import arrival_counters


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, C, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                 # one row of C channels per program
    c = tl.arange(0, BLOCK)
    ok = c < C
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < I
    g = tl.load(gu_ptr + row * stride_in + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_in + I + c, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + c, (s * u).to(dtype), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape), x's dtype out: one program per row."""
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(C)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), C, float(eps), BLOCK=block,
                                       num_warps=min(16, max(4, block // 1024)))
    return out.view(x.shape)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2 I) -> (..., I): SiLU of the first half times the second."""
    I = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * I)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(4096, triton.next_power_of_2(I))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(I, block))](rows, out, I, rows.stride(0), out.stride(0), BLOCK=block,
                                                              num_warps=4)
    return out.view(*gate_up.shape[:-1], I)


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, val_ptr, idx_ptr, count_ptr, V, stride_x, BLOCK: tl.constexpr,
                   PROGRAMS_P: tl.constexpr):
    """Row ``row``'s BLOCK values at program ``pid``: their maximum and its first index to the
    workspace; the row's last program to arrive reduces the row's pairs in program order (the
    first index among equal maxima, as torch) and zeroes its counter again. NaN ranks above
    every number (as torch; between +inf and NaN the first of the two wins here)."""
    row, pid = tl.program_id(0), tl.program_id(1)
    n = tl.num_programs(1)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + i, mask=i < V, other=-float("inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    best = tl.max(x, axis=0)
    tl.store(val_ptr + row * n + pid, best)
    tl.store(idx_ptr + row * n + pid, tl.min(tl.where(x == best, i, V), axis=0))
    tl.debug_barrier()      # every thread's stores before the count; acq_rel makes them visible
    if tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu") == n - 1:
        j = tl.arange(0, PROGRAMS_P)
        vals = tl.load(val_ptr + row * n + j, mask=j < n, other=-float("inf"), cache_modifier=".cg")
        idxs = tl.load(idx_ptr + row * n + j, mask=j < n, other=V, cache_modifier=".cg")
        tl.store(out_ptr + row, tl.min(tl.where(vals == tl.max(vals, axis=0), idxs, V), axis=0).to(tl.int64))
        tl.atomic_xchg(count_ptr + row, 0)


def argmax_triton(logits: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """(B, V) -> (B,) int64, ``logits.argmax(-1)``: V / block programs a row, one launch."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = min(block, triton.next_power_of_2(V))
    programs = triton.cdiv(V, block)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    vals = torch.empty(B, programs, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(B, programs, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(B, programs)](logits, out, vals, idxs, arrival_counters(B, logits.device), V, logits.stride(0),
                                  BLOCK=block, PROGRAMS_P=triton.next_power_of_2(programs), num_warps=8)
    return out
