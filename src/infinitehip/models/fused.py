"""The model's two elementwise steps as one Triton launch each, for CUDA (``llama.py`` calls them
there; decode replays them per layer, where each PyTorch kernel costs microseconds whatever its
size: on an H200 at 256K ``F.rms_norm`` took 6.3 us a call, 65 calls a token, and SiLU then the
product were two launches). Their PyTorch statements are the CPU path and the tests' reference:

- ``rms_norm_triton(x, w, eps)``: ``F.rms_norm(x, w.shape, w, eps)``: float32 math, rounded once.
- ``silu_mul_triton(gate_up)``: ``F.silu(gate) * up`` of the fused w13 output (..., 2 I): SiLU
  rounded to the input dtype before the product, as the two PyTorch ops round.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
