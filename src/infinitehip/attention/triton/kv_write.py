"""A decode step's tokens written into the KV cache in one launch: the plain cache's K and V rows
(``write_rows``, ``KVCache.update``: one launch instead of two ``index_copy_``), and an offloaded
KV store (``OffloadKVCache.update``, T = 1) with the resident copies in its GPU page cache kept
coherent.

One program per (row, kv head), K and V. A plain store gets the token's row, and the unit's
resident copy its row, and the store's probe copy its key when the token is at a multiple of the
probe stride. An FP8 page has one scale per kv head, so writing a token re-encodes its
page: decode the page (from its resident copy in the page cache when it has one: no PCIe read),
put the token in, take the new absolute maximum, encode again, and the resident copy gets the
whole page decoded (the probe copy: the page's codes at the stride's multiples). Where that
changes nothing but the token's row (a fresh slot and a scale the token does not raise: most
decode steps) only the row is written: 128 bytes over PCIe instead of the page's 8 KB. In PyTorch that
is ~30 small kernels per layer per step (gathers, decode, scatter, amax, encode, scatters), ~50
with a page cache (14 for a plain store with one).

Bit for bit the PyTorch path (``offload.fp8_encode`` / ``fp8_decode``): values pass through the
store's dtype where it rounds them, divisions are IEEE (``div_rn``), the cast to e4m3 rounds to
nearest even (tested under the interpreter, in float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_options, release_next, wait_for_previous

_FP8_MAX = tl.constexpr(448.0)
_TINY = tl.constexpr(1.1754943508222875e-38)      # float32's smallest normal: the scale's floor
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rewrite(codes_ptr, scale_ptr, new_ptr, pool_ptr, probe_ptr, page, off, h, slot,
             PAGE: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, DTYPE: tl.constexpr,
             STRIDE: tl.constexpr):
    """Page ``page`` of kv head h, with token ``off`` replaced by new_ptr's D values, re-encoded;
    its decoded values into pool slot ``slot`` when slot >= 0; with STRIDE, the new codes of its
    tokens at multiples of STRIDE into the probe copy too."""
    t = tl.arange(0, PAGE)[:, None]
    d = tl.arange(0, D_P)[None, :]
    m = (d < D) & (t < PAGE)
    at = (page * PAGE + t) * (K * D) + h * D + d                               # (PAGE, D_P)
    # The page decoded into the store dtype: from the unit's resident copy when it has one (GPU
    # memory, the same values: the pool holds exactly this decode), else from the codes (PCIe).
    pool_at = slot * (PAGE * D) + t * D + d
    resident = m & (slot >= 0)
    x = tl.load(codes_ptr + at, mask=m & (slot < 0), other=0.0).to(tl.float32) * tl.load(scale_ptr + page * K + h)
    x = tl.where(resident, tl.load(pool_ptr + pool_at, mask=resident, other=0.0).to(tl.float32),
                 x.to(DTYPE).to(tl.float32))
    new = tl.load(new_ptr + h * D + d, mask=d < D, other=0.0).to(DTYPE).to(tl.float32)
    # Past the token nothing is this sequence's yet (a batch slot's earlier request may have left
    # keys there, whose maximum would set the scale): zeros, as the PyTorch path writes.
    x = tl.where(t == off, new, tl.where(t > off, 0.0, x))
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=1), axis=0), _FP8_MAX), _TINY)
    codes = tl.math.div_rn(x, scale).to(tl.float8e4nv)
    tl.store(codes_ptr + at, codes, mask=m)
    tl.store(scale_ptr + page * K + h, scale)
    if STRIDE > 0:
        g = page * PAGE + t                                                    # (PAGE, 1) global token
        tl.store(probe_ptr + (g // STRIDE) * (K * D) + h * D + d, codes, mask=m & (g % STRIDE == 0))
    if slot >= 0:
        decoded = (codes.to(tl.float32) * scale).to(pool_ptr.dtype.element_ty)
        tl.store(pool_ptr + pool_at, decoded, mask=m)


@triton.jit
def _append(codes_ptr, scale_ptr, new_ptr, pool_ptr, probe_ptr, page, off, h, slot,
            PAGE: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, DTYPE: tl.constexpr,
            STRIDE: tl.constexpr, FAST: tl.constexpr):
    """``_rewrite``'s result, writing only the token's row where that is the same: the row was
    empty (all-zero codes, as a decode step's fresh slot is) and the page's scale would not change.
    The rows after it are then empty too: every write zeroes a page past its token, and a page an
    earlier request left behind holds its old token in the row (its first write re-encodes).
    Then the other rows' codes are unchanged too: an encoded page has a code of +-448 (its maximum;
    below only at the scale's floor), which decodes to the maximum the re-encode would take, and a
    code decoded and divided by the same scale rounds back to itself — in bfloat16 and float32;
    float16 stores (FAST False) always re-encode: their subnormals round small decoded values
    to other codes. Else the whole page."""
    d = tl.arange(0, D_P)
    dm = d < D
    at = (page * PAGE + off) * (K * D) + h * D + d                             # (D_P,)
    pool_at = slot * (PAGE * D) + off * D + d
    if slot >= 0:   # the old row: from the resident copy (GPU memory) when there is one
        old = tl.load(pool_ptr + pool_at, mask=dm & (slot >= 0), other=0.0).to(tl.float32)
    else:
        old = tl.load(codes_ptr + at, mask=dm, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + page * K + h)
    new = tl.load(new_ptr + h * D + d, mask=dm, other=0.0).to(DTYPE).to(tl.float32)
    page_max = (scale * _FP8_MAX).to(DTYPE).to(tl.float32)                     # as _rewrite decodes +-448
    new_scale = tl.maximum(tl.math.div_rn(tl.maximum(page_max, tl.max(tl.abs(new), axis=0)), _FP8_MAX), _TINY)
    if FAST & (tl.max(tl.abs(old), axis=0) == 0.0) & (new_scale == scale):
        codes = tl.math.div_rn(new, scale).to(tl.float8e4nv)
        tl.store(codes_ptr + at, codes, mask=dm)
        if STRIDE > 0:
            g = page * PAGE + off
            tl.store(probe_ptr + (g // STRIDE) * (K * D) + h * D + d, codes, mask=dm & (g % STRIDE == 0))
        if slot >= 0:
            tl.store(pool_ptr + pool_at, (codes.to(tl.float32) * scale).to(pool_ptr.dtype.element_ty), mask=dm)
    else:
        _rewrite(codes_ptr, scale_ptr, new_ptr, pool_ptr, probe_ptr, page, off, h, slot, PAGE, K, D, D_P, DTYPE,
                 STRIDE)


@triton.jit
def _put_row(x_ptr, new_ptr, pool_ptr, probe_ptr, page, off, h, slot, PAGE: tl.constexpr, K: tl.constexpr,
             D: tl.constexpr, D_P: tl.constexpr, STRIDE: tl.constexpr):
    """A plain store's row (page, off, kv head h) = new_ptr's D values; the unit's copy too, and
    with STRIDE the probe copy's row when the token is at a multiple of it."""
    d = tl.arange(0, D_P)
    new = tl.load(new_ptr + h * D + d, mask=d < D)
    g = page * PAGE + off
    tl.store(x_ptr + g * (K * D) + h * D + d, new.to(x_ptr.dtype.element_ty), mask=d < D)
    if STRIDE > 0:
        tl.store(probe_ptr + (g // STRIDE) * (K * D) + h * D + d, new.to(x_ptr.dtype.element_ty),
                 mask=(d < D) & (g % STRIDE == 0))
    if slot >= 0:
        tl.store(pool_ptr + slot * (PAGE * D) + off * D + d, new.to(pool_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _write_kernel(k_store, k_scale, v_store, v_scale, k_new, v_new, k_pool, v_pool, k_probe, slot_of_ptr, pages_ptr,
                  offsets_ptr, PAGE: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                  DTYPE: tl.constexpr, FP8: tl.constexpr, CACHED: tl.constexpr, STRIDE: tl.constexpr,
                  PDL: tl.constexpr):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(pages_ptr + b).to(tl.int64)
    off = tl.load(offsets_ptr + b)
    slot = tl.full((), -1, tl.int64)
    if CACHED:
        slot = tl.load(slot_of_ptr + page * K + h).to(tl.int64)
    row = (b * K).to(tl.int64) * D
    if FP8:
        fast: tl.constexpr = DTYPE != tl.float16
        _append(k_store, k_scale, k_new + row, k_pool, k_probe, page, off, h, slot, PAGE, K, D, D_P, DTYPE, STRIDE,
                fast)
        _append(v_store, v_scale, v_new + row, v_pool, v_pool, page, off, h, slot, PAGE, K, D, D_P, DTYPE, 0, fast)
    else:
        _put_row(k_store, k_new + row, k_pool, k_probe, page, off, h, slot, PAGE, K, D, D_P, STRIDE)
        _put_row(v_store, v_new + row, v_pool, v_pool, page, off, h, slot, PAGE, K, D, D_P, 0)


def write_decode_tokens(store, cache, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One decode token per row into a ``HostKVStore`` (its device alias; plain or FP8; its probe
    copy), and into the resident units of ``cache`` (a ``PageCache`` or None): pages, offsets (B,)
    each row's global page and slot in it; k, v (B, K, D)."""
    _, page, K, D = store.dk.shape
    cached = cache is not None
    k, v = k.contiguous(), v.contiguous()
    scales = (store.dk_scale, store.dv_scale) if store.fp8 else (k, v)
    opts = launch_options(k.device)
    _write_kernel[(k.shape[0], K)](
        store.dk, scales[0], store.dv, scales[1], k, v, cache.k if cached else k, cache.v if cached else v,
        store.dk_probe if store.dk_probe is not None else k, cache.slot_of if cached else pages, pages, offsets,
        PAGE=page, K=K, D=D, D_P=triton.next_power_of_2(D), DTYPE=_TL_DTYPE[store.dtype], FP8=store.fp8,
        CACHED=cached, STRIDE=store.probe_stride, PDL=bool(opts), **opts)


@triton.jit
def _rows_kernel(kc_ptr, vc_ptr, k_ptr, v_ptr, rows_ptr, stride_k, stride_v, N: tl.constexpr, N_P: tl.constexpr,
                 PDL: tl.constexpr):
    """Token i's K and V (N = K * D values each) into cache row rows[i] of both caches."""
    wait_for_previous(PDL)   # k and v are the q/k/v projection's output; the cache may still be read
    release_next(PDL)
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    c = tl.arange(0, N_P)
    ok = c < N
    src = i.to(tl.int64)
    tl.store(kc_ptr + row * N + c, tl.load(k_ptr + src * stride_k + c, mask=ok), mask=ok)
    tl.store(vc_ptr + row * N + c, tl.load(v_ptr + src * stride_v + c, mask=ok), mask=ok)


def write_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k_cache[rows[i]] = k[i] and v_cache[rows[i]] = v[i], one launch: caches (R, K, D) contiguous,
    k, v (n, K, D) with each token's K * D values contiguous (a slice of the fused q/k/v output),
    rows (n,) int64. ``index_copy_`` twice, in one kernel."""
    n, K, D = k.shape
    for name, x in (("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != D:
            raise ValueError(f"write_rows needs each token's {name} values contiguous, got strides {x.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_rows needs contiguous caches")
    opts = launch_options(k.device)
    _rows_kernel[(n,)](k_cache, v_cache, k, v, rows, k.stride(0), v.stride(0), N=K * D,
                       N_P=triton.next_power_of_2(K * D), PDL=bool(opts), num_warps=4, **opts)
