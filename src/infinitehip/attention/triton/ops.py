"""The Triton backend: the operations of ``reference.py``, same signatures, same semantics.

  pool_queries  — rotated, pooled pruning queries in one launch (``pool.py``).
  score_chunks  — hierarchical top-1 chunk scores (kernel in ``prune.py``).
  keep_top      — the best chunks of each row in position order, split into the next stage's
                  candidates, one launch (``select.py``).
  block_geometry — a decode block's positions, one launch (``geometry.py``).
  attend        — block-sparse attention over sink + selected chunks + window: one program per
                  (batch, query rows, kv head) in prefill (``bsa.py``); flash-decoding split-K
                  with the merge in the same launch for a few queries (``decode.py``). No host
                  syncs, static shapes: a decode step can be captured in a CUDA graph.
  attend_reused — a decode step that reuses its mask: attention computing its own positions,
                  one launch in all.
"""
from __future__ import annotations

import functools

import torch
import triton

from ...config import HiPConfig
from ..mask import Geometry, HiPMask, window_slots
from ..pages import KVPages, table_strides
from ..rope import RoPE
from . import pdl
from .bsa import LOG2E, _bsa_kernel
from .decode import arrival_counters, split_tile
from .geometry import block_geometry, position_constants
from .pool import pool_queries
from .prune import score_chunks
from .select import keep_top

__all__ = ["pool_queries", "score_chunks", "keep_top", "block_geometry", "attend", "attend_reused"]

# At most this many queries take the split-K (flash-decoding) path.
DECODE_MAX_QUERIES = 16
BLOCK_N = 64
# Decode launch settings, by graph replay of a mask-reuse step at 128K keys (H100, 8 KV heads,
# scripts/sweep_prune.py --reuse 128K): 2 warps, ~4 programs per SM 18.8 us vs 19.5 us for 4 warps, 2.
DECODE_TUNING = dict(num_warps=2, programs_per_sm=4)
# Prefill tile: query rows x heads of one program. 128 was 11% faster for one 16K-query chunk against
# 128K keys (sweep_prune_h100.json) but the engine's 256K prefill took 25.9 s with it vs 22.7 s with 64.
PREFILL_BLOCK_M = 64


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Multiprocessors of CUDA device ``device_index`` (launch sizes are set per SM)."""
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
    p0, w0 = geo.p0.contiguous(), geo.w0.contiguous()
    positions = dict(p0_ptr=p0, w0_ptr=w0, exact_ptr=geo.exact_attend.view(torch.int8), stride_pb=p0.stride(0),
                     kv_len_ptr=p0, anchor_ptr=p0, TK=0, CONTEXT=0, POSITIONS=False, LENS=False, ANCHOR=False,
                     **position_constants(config))
    return _launch(q, k, v, starts, positions, config, rope, scale, pages, tuning or {})


def attend_reused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HiPMask,
                  cache_seqlens: torch.Tensor | None, config: HiPConfig, rope: RoPE | None,
                  scale: float, tuning: dict | None = None, pages: KVPages | None = None) -> torch.Tensor:
    """A decode step that reuses ``mask`` as is: ``attend(q, k, v, mask.starts, block_geometry(
    kv_len, Tq, config, mask), ...)`` in one launch, the positions computed inside attention.

    q (B, Tq, H, D) with Tq <= block_size_q (one query block); cache_seqlens (B,) valid keys per
    row, or None when every row has all Tk keys (no length tensor to fill then); pages: FP8
    scales of k/v (an offloaded store read in place), or None.
    """
    if q.shape[1] > config.block_size_q:
        raise ValueError(f"attend_reused takes one query block (Tq <= {config.block_size_q}), got Tq={q.shape[1]}")
    if cache_seqlens is None and pages is not None and pages.table is not None:
        raise ValueError("attend_reused through a page pool needs cache_seqlens: the pool's shape is not the keys'")
    anchor = mask.w0 is not None
    w0 = mask.w0.contiguous() if anchor else q
    lens = q if cache_seqlens is None else cache_seqlens.to(q.device).contiguous()
    positions = dict(p0_ptr=w0, w0_ptr=w0, exact_ptr=w0, stride_pb=0,
                     kv_len_ptr=lens, anchor_ptr=w0, TK=k.shape[1], CONTEXT=config.model_context_length or 0,
                     POSITIONS=True, LENS=cache_seqlens is not None, ANCHOR=anchor, **position_constants(config))
    return _launch(q, k, v, mask.starts, positions, config, rope, scale, pages, tuning or {})


def _launch(q, k, v, starts, positions: dict, config: HiPConfig, rope: RoPE | None, scale: float,
            pages: KVPages | None, tuning: dict) -> torch.Tensor:
    """The attention kernel; ``positions``: its position arguments (from a Geometry's tensors,
    or computed in the kernel from the row lengths)."""
    B, tq, H, D = q.shape
    paged = pages is not None and pages.table is not None
    scaled = pages is not None and pages.scaled
    # kv heads: a per-head table's (its pool holds one-head pages), else the keys'
    K = pages.table.shape[2] if paged and pages.table.dim() == 3 else k.shape[2]
    if paged:   # the pool (N, page, K or 1, D) seen as one row of N * page keys that every row reads
        k, v = k.reshape(1, -1, *k.shape[2:]), v.reshape(1, -1, *v.shape[2:])
    table = pages.table if paged else q
    tb, tp, th = table_strides(table) if paged else (0, 0, 0)
    stride_kh, stride_vh = (k.stride(2), v.stride(2)) if k.shape[2] == K else (0, 0)   # one-head pages: 0
    k_scale = pages.k_scale if scaled else q
    v_scale = pages.v_scale if scaled else q
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
    half_p = max(16, triton.next_power_of_2(half))
    n_window = window_slots(config)
    block_n = tuning.get("block_n", BLOCK_N)
    n_tiles = triton.cdiv(config.sink + nsel * c + n_window, block_n)
    if tq <= DECODE_MAX_QUERIES and nqb == 1:
        tuning = {**DECODE_TUNING, **tuning}
        # One compiled variant for every short tail (2-16 queries; BLOCK_T is compile-time), as
        # for pooled_rows: first uses of new lengths had each compiled anew.
        block_t = 1 if tq == 1 else DECODE_MAX_QUERIES
        t_tiles = 1
        # Split the slot list so that a few programs run per multiprocessor.
        want = triton.cdiv(tuning["programs_per_sm"] * num_sms(q.device.index or 0), B * K)
        per_split = triton.cdiv(n_tiles, max(1, min(n_tiles, want)))
        nsplit = triton.cdiv(n_tiles, per_split)
    else:
        block_t = min(bq, max(1, tuning.get("block_m", PREFILL_BLOCK_M) // heads_p))
        t_tiles = triton.cdiv(min(bq, tq), block_t)
        per_split, nsplit = n_tiles, 1
    block_m = max(16, block_t * heads_p)
    out = torch.empty_like(q)
    grid = (B * nqb * t_tiles, K, nsplit)
    if nsplit > 1:   # partials, their log2-sum-exps and one arrival counter per (row tile, kv head)
        part = torch.empty(B, tq, H, nsplit, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, tq, H, nsplit, device=q.device, dtype=torch.float32)
        counts = arrival_counters(grid[0] * K, q.device)
    else:
        part = lse = counts = torch.empty(1, 1, 1, 1, device=q.device, dtype=torch.float32)
    nsplit_p = max(2, triton.next_power_of_2(nsplit))
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1, device=q.device)).to(q.device, torch.float32)
    use_pdl = tuning.get("pdl", True) and pdl.enabled(q.device)
    _bsa_kernel[grid](
        q, k, v, starts, inv_freq_ptr=inv_freq,
        attention_scaling=float(rope.attention_scaling if rope is not None else 1.0), qk_scale=float(scale) * LOG2E,
        out_ptr=out, part_ptr=part, lse_ptr=lse, count_ptr=counts, table_ptr=table, ks_ptr=k_scale, vs_ptr=v_scale,
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2),
        stride_kb=0 if paged else k.stride(0), stride_kt=k.stride(1), stride_kh=stride_kh,
        stride_vb=0 if paged else v.stride(0), stride_vt=v.stride(1), stride_vh=stride_vh,
        stride_sb=starts.stride(0), stride_sg=starts.stride(1), stride_sq=starts.stride(2),
        stride_ob=out.stride(0), stride_ot=out.stride(1), stride_oh=out.stride(2),
        stride_xb=part.stride(0), stride_xt=part.stride(1), stride_xh=part.stride(2), stride_xs=part.stride(3),
        stride_lb=lse.stride(0), stride_lt=lse.stride(1), stride_lh=lse.stride(2),
        stride_tb=tb, stride_tp=tp, stride_th=th,
        stride_ssb=k_scale.stride(0) if scaled else 0, stride_ssp=k_scale.stride(1) if scaled else 0,
        TQ=tq, NQB=nqb, T_TILES=t_tiles, KG=K // G, NSPLIT=nsplit,
        TILES_PER_SPLIT=per_split, SINK=config.sink, C=c, NSEL=nsel, NSEL_P=max(2, triton.next_power_of_2(nsel)),
        N_WINDOW=n_window, BQ=bq, HPK=hpk, HEADS_P=heads_p, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=block_n,
        HALF=half, HALF_P=half_p, ROPE=rope is not None,
        SPLIT=nsplit > 1, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=not q.is_cuda, FAST=q.is_cuda,
        PAGED=paged, SCALED=scaled, PAGE=pages.page if pages is not None else 1,
        NSPLIT_P=nsplit_p, SPLIT_TILE=split_tile(block_t * heads_p, nsplit_p, half_p),
        **positions, Q_AT_P0=tq == 1, PDL=use_pdl,
        num_warps=tuning.get("num_warps", 4), num_stages=tuning.get("num_stages", 2),
        **({"launch_pdl": True} if use_pdl else {}),
    )
    return out
