"""The Triton backend: the two operations of ``reference.py``, same signatures, same semantics.

  score_chunks  — hierarchical top-1 chunk scores (kernel in ``prune.py``).
  keep_top      — the best chunks of each row in position order, one launch (``select.py``).
  block_geometry — a decode block's positions, one launch (``geometry.py``).
  attend        — block-sparse attention over sink + selected chunks + window: one program per
                  (batch, query rows, kv head) in prefill (``bsa.py``); flash-decoding split-K
                  plus a merge kernel for a few queries (``decode.py``). No host syncs, static
                  shapes: a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import torch
import triton

from ...config import HiPConfig
from ..mask import Geometry, window_slots
from ..pages import KVPages
from ..rope import RoPE
from .bsa import LOG2E, _bsa_kernel
from .decode import combine
from .geometry import block_geometry
from .prune import score_chunks
from .select import keep_top

__all__ = ["score_chunks", "keep_top", "block_geometry", "attend"]

# At most this many queries take the split-K (flash-decoding) path.
DECODE_MAX_QUERIES = 16
BLOCK_N = 64
PREFILL_BLOCK_M = 64


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 4   # the interpreter: a few splits still exercise the merge
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, geo: Geometry,
           config: HiPConfig, rope: RoPE | None, scale: float, pages: KVPages | None = None, *,
           tuning: dict | None = None) -> torch.Tensor:
    """Triton ``reference.attend``: q (B, Tq, H, D), k/v (B, Tk, K, D), starts (B, G, NQB, NSEL).

    Returns (B, Tq, H, D) in q's dtype. ``geo.q_pos`` must be ``geo.p0 + row`` (as ``geometry``
    builds it); rows past Tq are padding. pages: k/v are a page pool read through a block table,
    or FP8 codes with per-page scales (``attention/pages.py``). tuning: prefill launch overrides
    (block_m, num_warps, num_stages) for scripts/sweep_prune.py.
    """
    tuning = tuning or {}
    B, tq, H, D = q.shape
    K = k.shape[2]
    paged = pages is not None and pages.table is not None
    scaled = pages is not None and pages.scaled
    if paged:   # the pool (N, page, K, D) seen as one row of N * page keys that every row reads
        k, v = k.reshape(1, -1, K, D), v.reshape(1, -1, K, D)
    table = pages.table.contiguous() if paged else geo.p0
    k_scale = pages.k_scale if scaled else geo.p0
    v_scale = pages.v_scale if scaled else geo.p0
    if scaled and (k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1):
        raise ValueError("k_scale and v_scale must share strides, with unit stride on the kv heads")
    G, nqb, nsel = starts.shape[1], starts.shape[2], starts.shape[3]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on head_dim")
    if starts.stride(-1) != 1:
        starts = starts.contiguous()
    bq, c = config.block_size_q, config.chunk_size
    hpk = H // K
    heads_p = triton.next_power_of_2(hpk)
    half = D // 2
    n_window = window_slots(config)
    n_tiles = triton.cdiv(config.sink + nsel * c + n_window, BLOCK_N)
    if tq <= DECODE_MAX_QUERIES and nqb == 1:
        block_t = triton.next_power_of_2(tq)
        t_tiles = 1
        # Split the slot list so that about two programs run per multiprocessor.
        want = triton.cdiv(2 * _num_sms(q.device.index or 0), B * K)
        per_split = triton.cdiv(n_tiles, max(1, min(n_tiles, want)))
        nsplit = triton.cdiv(n_tiles, per_split)
    else:
        block_t = min(bq, max(1, tuning.get("block_m", PREFILL_BLOCK_M) // heads_p))
        t_tiles = triton.cdiv(min(bq, tq), block_t)
        per_split, nsplit = n_tiles, 1
    block_m = max(16, block_t * heads_p)
    out = torch.empty_like(q)
    if nsplit > 1:
        part = torch.empty(B, tq, H, nsplit, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, tq, H, nsplit, device=q.device, dtype=torch.float32)
        o, o_split = part, part.stride(3)
    else:
        lse = torch.empty(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        o, o_split = out, 0
    p0, w0 = geo.p0.contiguous(), geo.w0.contiguous()
    exact = geo.exact_attend.view(torch.int8)                     # (B,) bool bytes
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1, device=q.device)).to(q.device, torch.float32)
    grid = (B * nqb * t_tiles, K, nsplit)
    _bsa_kernel[grid](
        q, k, v, starts, p0, w0, exact, inv_freq,
        float(rope.attention_scaling if rope is not None else 1.0), float(scale) * LOG2E,
        o, lse, table, k_scale, v_scale,
        q.stride(0), q.stride(1), q.stride(2),
        0 if paged else k.stride(0), k.stride(1), k.stride(2),
        0 if paged else v.stride(0), v.stride(1), v.stride(2),
        starts.stride(0), starts.stride(1), starts.stride(2),
        p0.stride(0),
        o.stride(0), o.stride(1), o.stride(2), o_split,
        lse.stride(0), lse.stride(1), lse.stride(2),
        table.stride(0),
        k_scale.stride(0) if scaled else 0, k_scale.stride(1) if scaled else 0,
        tq, nqb, t_tiles, K // G,
        TILES_PER_SPLIT=per_split, SINK=config.sink, C=c, NSEL=nsel, NSEL_P=max(2, triton.next_power_of_2(nsel)), N_WINDOW=n_window,
        BQ=bq, HPK=hpk, HEADS_P=heads_p, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        HALF=half, HALF_P=max(16, triton.next_power_of_2(half)), ROPE=rope is not None,
        SPLIT=nsplit > 1, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=not q.is_cuda, FAST=q.is_cuda,
        PAGED=paged, SCALED=scaled, PAGE=pages.page if pages is not None else 1,
        num_warps=tuning.get("num_warps", 4), num_stages=tuning.get("num_stages", 2),
    )
    if nsplit > 1:
        combine(part, lse, out)
    return out
