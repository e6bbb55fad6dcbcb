"""Decode's linear layers as one Triton launch each, with the elementwise step before or after
them fused in (``llama.py`` calls these on CUDA for up to 16 rows: a decode step).

A decode step reads every weight once, so its time is the weights' bytes over the memory
bandwidth plus, per kernel, a launch and a ramp. The unfused layer is 9-10 kernels (RMSNorm,
GEMV, cuBLAS's split-K reduction, SiLU * up, ...): ~0.4 ms a token on Llama-3-8B (H200) that
is not reading weights. Here each linear layer is one kernel that applies its neighbour on the fly:

- ``norm``: the input is RMSNorm(x) * g (every program recomputes the rows' rstd from x: 8 KB
  from L2), rounded to the weights' dtype exactly as ``fused.rms_norm_triton`` rounds it;
- ``silu``: the input is SiLU(gate) * up of a fused (gate, up) row, rounded as ``silu_mul_triton``;
- ``residual``: out = residual + x W^T (+ bias), accumulated in float32 and rounded once (cuBLAS's
  beta = 1), written in place into ``residual``.

A program owns BLOCK_N output features of all (<= 16) rows and walks K in BLOCK_K tiles (or its
share of K: split-K gives more programs where N alone leaves SMs idle, and the last split of a
feature block to finish sums the partials in split order, as ``decode.arrive_and_merge`` does).
tl.dot pads the rows to 16 (tensor cores are idle anyway: the kernel waits on memory) and lets
Triton's pipeliner keep ``num_stages`` weight tiles in flight. K is a compile-time constant (a
model has a few widths; the interpreter cannot loop to a run-time bound), and so is the row count
rounded up to a power of two (five variants a layer, not one per batch size to compile). The
PyTorch composition in ``linear`` is the CPU path and the tests' reference.

Where ``attention/triton/pdl.py`` turns programmatic dependent launch on (off by default: it
measured slower), a GEMV waits for its predecessor before its first load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..attention.triton.decode import arrival_counters
from ..attention.triton.pdl import enabled as pdl_enabled, release_next, wait_for_previous

MAX_ROWS = 16          # tl.dot's smallest row tile: more rows (prefill) take cuBLAS
_NONE, _NORM, _SILU = 0, 1, 2


@dataclass(frozen=True)
class Launch:
    """One GEMV launch's tiling (``scripts/sweep_gemv.py`` measures the choices)."""
    block_n: int = 32
    block_k: int = 256
    warps: int = 4
    stages: int = 4
    split: int = 1        # split-K: programs per BLOCK_N features, the last to finish sums them


class Scatter(NamedTuple):
    """Output columns [col, col + W) and [col + W, col + 2 W) also stored as rows ``rows[m]`` of
    ``k`` and ``v`` (R, W): the q/k/v projection writing a decode step's K and V into the cache."""
    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor
    col: int


def default_launch(n: int, k: int) -> Launch:
    """The best of ``scripts/sweep_gemv.py``'s settings at Llama-3-8B's shapes (H200, one row,
    benchmarks/results/sweep_gemv_h200.json): 64 features a program and 3 stages where N is wide;
    where N is the hidden size (4096), 32 features and 5 stages, and where K is also long (the down
    projection, K = 14,336) 64 features split in two along K: 35.6 us instead of 39.8."""
    if n > 4096:
        return Launch(block_n=64, block_k=256, stages=3)
    if k >= 2 * n:
        return Launch(block_n=64, block_k=256, stages=5, split=2)
    return Launch(block_n=32, block_k=256, stages=5)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, g_ptr, b_ptr, out_ptr, ws_ptr, count_ptr, sk_ptr, sv_ptr, rows_ptr, M, N, stride_x,
                 stride_w, stride_o, eps, ROWS_P: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr,
                 BIAS: tl.constexpr, RESIDUAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 PDL: tl.constexpr, SPLIT: tl.constexpr, K_SPLIT: tl.constexpr, COL: tl.constexpr,
                 W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    m_ok, n_ok = m < M, n < N
    dtype = w_ptr.dtype.element_ty
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_x
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_w
    k_first = split * K_SPLIT                                                  # this program's K range
    wait_for_previous(PDL)
    release_next(PDL)
    if PROLOGUE == 1:   # rstd of each row, over all K
        sq = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
            sq += xs * xs
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)                    # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        k = k_first + i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a_ok = m_ok[:, None] & k_ok[None, :]
        a = tl.load(x_rows + k[None, :], mask=a_ok, other=0.0)               # (BLOCK_M, BLOCK_K)
        if PROLOGUE == 1:
            g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * rstd[:, None] * g[None, :]).to(dtype)
        elif PROLOGUE == 2:  # x rows are (gate, up): K gates, then K ups
            # Row by row: the tile's padding rows (15 of 16 in decode) would cost as many exps.
            for r in tl.static_range(ROWS_P):
                gate = tl.load(x_ptr + r * stride_x + k, mask=k_ok & (r < M), other=0.0).to(tl.float32)
                up = tl.load(x_ptr + r * stride_x + K + k, mask=k_ok & (r < M), other=0.0).to(tl.float32)
                a_r = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
                a = tl.where(m[:, None] == r, a_r[None, :], a)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)   # (BLOCK_N, BLOCK_K)
        if UPCAST:   # the CPU interpreter cannot multiply bfloat16
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif IEEE:   # float32 weights (tests): no tf32 rounding
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w))
    o_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:   # partial sums to the workspace; the last split of these features adds them up
        ws = ws_ptr + (m[:, None] * N + n[None, :]).to(tl.int64)                # (SPLIT, M, N) float32
        tl.store(ws + split * M * N, acc, mask=o_ok)
        # Every thread's partial is stored before the arrival counts; acq_rel makes them visible.
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(SPLIT):   # in split order, whichever finished last: deterministic
                acc += tl.load(ws + s * M * N, mask=o_ok, other=0.0, cache_modifier=".cg")
            _epilogue(acc, b_ptr, out_ptr, sk_ptr, sv_ptr, rows_ptr, m, n, m_ok, n_ok, stride_o, BIAS, RESIDUAL,
                      COL, W)
            tl.atomic_xchg(count_ptr + pid_n, 0)   # zero again for the next launch (or graph replay)
    else:
        _epilogue(acc, b_ptr, out_ptr, sk_ptr, sv_ptr, rows_ptr, m, n, m_ok, n_ok, stride_o, BIAS, RESIDUAL, COL, W)


@triton.jit
def _epilogue(acc, b_ptr, out_ptr, sk_ptr, sv_ptr, rows_ptr, m, n, m_ok, n_ok, stride_o, BIAS: tl.constexpr,
              RESIDUAL: tl.constexpr, COL: tl.constexpr, W: tl.constexpr):
    """out = acc (+ bias) (+ out, the residual), rounded once to out's dtype; with W > 0 the
    columns of ``Scatter`` also into their cache rows."""
    o_ok = m_ok[:, None] & n_ok[None, :]
    if BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o = out_ptr + m[:, None].to(tl.int64) * stride_o + n[None, :]
    if RESIDUAL:
        acc += tl.load(o, mask=o_ok, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(o, y, mask=o_ok)
    if W > 0:
        row = tl.load(rows_ptr + m, mask=m_ok, other=0)[:, None]                      # (BLOCK_M, 1) int64
        c = n[None, :] - COL
        tl.store(sk_ptr + row * W + c, y, mask=o_ok & (c >= 0) & (c < W))
        tl.store(sv_ptr + row * W + c - W, y, mask=o_ok & (c >= W) & (c < 2 * W))


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` takes the Triton kernel: CUDA, half precision, a decode's few rows."""
    rows = x.numel() // x.shape[-1]
    return (x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype
            and 0 < rows <= MAX_ROWS and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
           residual: torch.Tensor | None = None, scatter: Scatter | None = None,
           triton_kernel: bool | None = None, launch: Launch | None = None) -> torch.Tensor:
    """``prologue(x) @ weight.T + bias (+ residual)``, one kernel where ``fusable``.

    x (..., K), or (..., 2 K) with ``silu`` (gate, up); weight (N, K); bias (N,) or None.
    norm: (g, eps) -> the input is RMSNorm(x) * g. residual (..., N): added, and the result is
    written into it (it must be contiguous and read by no one else). scatter: two column ranges
    of the output also stored as cache rows (the kernel's epilogue; else two ``index_copy_``).
    triton_kernel: None picks ``fusable``; True forces the kernel (tests run it under the CPU
    interpreter).
    """
    N, K = weight.shape
    if x.shape[-1] != (2 * K if silu else K) or (norm is not None and silu):
        raise ValueError(f"linear: input width {x.shape[-1]} does not fit weight {tuple(weight.shape)} "
                         f"(norm={norm is not None}, silu={silu})")
    if triton_kernel is None:
        triton_kernel = fusable(x, weight)
    if not triton_kernel:
        out = _composed(x, weight, bias, norm, silu, residual)
        if scatter is not None:
            flat, W = out.reshape(-1, N), scatter.k.shape[1]
            scatter.k.index_copy_(0, scatter.rows, flat[:, scatter.col:scatter.col + W])
            scatter.v.index_copy_(0, scatter.rows, flat[:, scatter.col + W:scatter.col + 2 * W])
        return out
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"linear: the Triton kernel takes at most {MAX_ROWS} rows, got {M}")
    out = residual.view(M, N) if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    launch = launch or default_launch(N, K)
    # Split-K: each split walks K_SPLIT columns (whole tiles); the splits left past K are dropped.
    k_split = triton.cdiv(triton.cdiv(K, max(1, launch.split)), launch.block_k) * launch.block_k
    split, n_blocks = triton.cdiv(K, k_split), triton.cdiv(N, launch.block_n)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    counts = arrival_counters(n_blocks, x.device) if split > 1 else out
    pdl = pdl_enabled(x.device)
    g, eps = norm if norm is not None else (weight, 0.0)
    sk, sv, srows, col = scatter if scatter is not None else (out, out, out, 0)
    W = sk.shape[1] if scatter is not None else 0
    if scatter is not None and not (sk.is_contiguous() and sv.is_contiguous() and col + 2 * W <= N):
        raise ValueError(f"linear: scatter needs contiguous (R, W) caches and columns within the {N} outputs")
    prologue = _NORM if norm is not None else _SILU if silu else _NONE
    kernel = _gemv_kernel[(n_blocks, split)]
    args = (rows, weight, g, bias if bias is not None else weight, out, ws, counts, sk, sv, srows,
            M, N, rows.stride(0), weight.stride(0), out.stride(0), float(eps))
    constants = dict(ROWS_P=triton.next_power_of_2(M), K=K, PROLOGUE=prologue, BIAS=bias is not None,
                     RESIDUAL=residual is not None, UPCAST=not x.is_cuda, IEEE=weight.dtype == torch.float32, PDL=pdl,
                     SPLIT=split, K_SPLIT=k_split, COL=col, W=W, BLOCK_M=MAX_ROWS, BLOCK_N=launch.block_n,
                     BLOCK_K=launch.block_k, num_warps=launch.warps, **({"launch_pdl": True} if pdl else {}))
    key = (x.device, N, K, prologue, launch, weight.dtype)
    while True:   # fewer pipeline stages where the device's shared memory cannot hold them
        stages = _STAGES.get(key, launch.stages)
        try:
            kernel(*args, **constants, num_stages=stages)
            break
        except OutOfResources:   # raised before the launch: nothing was written
            if stages <= 1:
                raise
            _STAGES[key] = stages - 1
    return residual if residual is not None else out.view(*x.shape[:-1], N)


# Pipeline stages that fit, per (device, shape, launch), where a launch's own did not: its stages
# were measured for Llama-3-8B on an H200 (228 KB of shared memory an SM); other shapes compile
# to other buffers (the built-in model's down projection asked for 237,568 bytes of 232,448) and
# other GPUs have less (an RTX 4090 or an A10: 100 KB).
_STAGES: dict[tuple, int] = {}


def _composed(x, weight, bias, norm, silu, residual):
    """The same as PyTorch ops (and the repo's elementwise Triton kernels on CUDA)."""
    from .fused import rms_norm_triton, silu_mul_triton

    if norm is not None:
        g, eps = norm
        x = rms_norm_triton(x, g, eps) if x.is_cuda else F.rms_norm(x, g.shape, g, eps)
    elif silu:
        if x.is_cuda:
            x = silu_mul_triton(x)
        else:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is not None:
        return residual.add_(F.linear(x, weight, bias))
    # beta = 1: cuBLAS accumulates into the residual, one kernel and one rounding.
    residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return residual
