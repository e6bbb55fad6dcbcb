"""Masked page copy from a KV store into a GPU page pool: ``cache/gpu_pages.copy_pages`` on CUDA.

A torch gather of the needed pages would read every one of them over PCIe on every step (the
index has a static shape); here one program per needed entry copies its page only when it is
a miss: masked loads issue no memory traffic, so hits cost nothing. FP8 stores are decoded on
the way (code x the page's per-head scale, in float32, then the pool's dtype: what
``offload.fp8_decode`` computes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _copy_kernel(src_ptr, scale_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, do_ptr,
                 PAGE_ELEMS: tl.constexpr, K: tl.constexpr, D: tl.constexpr,   # src (pages, page, K, D), dst
                 SCALED: tl.constexpr, BLOCK: tl.constexpr):                   # (slots, page, K, D): contiguous
    i = tl.program_id(0)
    do = tl.load(do_ptr + i) != 0
    src = tl.load(src_idx_ptr + i).to(tl.int64)
    dst = tl.load(dst_idx_ptr + i).to(tl.int64)
    for start in range(0, PAGE_ELEMS, BLOCK):
        e = start + tl.arange(0, BLOCK)
        m = (e < PAGE_ELEMS) & do
        x = tl.load(src_ptr + src * PAGE_ELEMS + e, mask=m, other=0.0).to(tl.float32)
        if SCALED:      # scale (pages, 1, K, 1): one per (page, kv head)
            x = x * tl.load(scale_ptr + src * K + (e // D) % K, mask=m, other=1.0)
        tl.store(dst_ptr + dst * PAGE_ELEMS + e, x.to(dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


def copy_pages_cuda(src: torch.Tensor, scale: torch.Tensor | None, dst: torch.Tensor, src_idx: torch.Tensor,
                    dst_idx: torch.Tensor, do: torch.Tensor):
    """dst[dst_idx[i]] = decode(src[src_idx[i]]) where do[i]; indices (M,) on dst's device."""
    _, page, K, D = src.shape
    m = src_idx.numel()
    _copy_kernel[(m,)](src, scale if scale is not None else dst, dst, src_idx, dst_idx, do.to(torch.int8),
                       page * K * D, K, D, SCALED=scale is not None, BLOCK=BLOCK)
