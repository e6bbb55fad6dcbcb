"""Decode over a slot buffer: the keys of a reused mask gathered in slot order and rotated once,
at the mask's refresh (docs/algorithm.md, "Where a reuse step's time goes"). ``hip_attention``
takes this path for one-query decode steps on the GPU; ``scripts/sweep_prune.py --reuse`` times
it against ``ops.attend_reused``, the gather-and-rotate step it replaces.

A reuse step of ``ops.attend_reused`` gathers its keys through the mask and rotates each one
(cos/sin per key and frequency) every step, although between refreshes every slot's key and
position are fixed and only the query moves. As (R(a) q) . (R(b) k) = q . R(b - a) k, a refresh
writes its keys once, in slot order and rotated at p - p_ref (p_ref: the query's position then),
and a step rotates its one query at p0 - p_ref and reads the slots contiguously: no gather, no
per-key trig. The one key a step adds (its own, at p0) goes into its window slot in the same
launch: the program whose tile holds that slot reads it from the cache, rotates it, uses it and
stores it for the steps after.

  build_slots(k, v, mask, kv_len, config, rope, out=None) -> Slots   one launch, at a refresh
  attend_slots(q, k, v, slots, mask, kv_len, config, rope, scale)    one launch per reuse step

Plain caches (B, Tk, K, D), one query per row (Tq = 1). Window slots are causal per step; the
sink's and selected slots' validity is fixed at the build (``Slots.ok``). A row whose RoPE mode
changes between refreshes (crossing the trained context with "auto") rotates the difference into
its sink and selected keys, the one case where a reuse step still rotates keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import HiPConfig
from ..mask import HiPMask, Slots, window_slots
from ..rope import RoPE
from .bsa import LOG2E, _operand, packed_start, slot_keys
from .decode import arrival_counters, arrive_and_merge, split_tile
from .geometry import _exact, block_positions, position_constants
from .ops import DECODE_TUNING, _num_sms
from .prune import _rotate


@triton.jit
def _decode_block(b, kv_len_ptr, anchor_ptr, TK, CONTEXT, SINK: tl.constexpr, LENS: tl.constexpr,
                  ANCHOR: tl.constexpr, WINDOW: tl.constexpr, LOWEST: tl.constexpr, PRUNE_RULE: tl.constexpr,
                  ATTEND_RULE: tl.constexpr):
    """Row b's one-query block: p0, w0, the first window key, exact attention positions."""
    p0, w0, _, exact = block_positions(b, kv_len_ptr, anchor_ptr, anchor_ptr, 1, TK, CONTEXT, LENS, ANCHOR, False,
                                       WINDOW, LOWEST, PRUNE_RULE, ATTEND_RULE)
    return p0, w0, tl.maximum(w0, SINK), exact


@triton.jit
def _build_kernel(
    k_ptr, v_ptr, starts_ptr, kv_len_ptr, anchor_ptr, inv_freq_ptr, attention_scaling: tl.constexpr,
    kb_ptr, vb_ptr, ok_ptr, pref_ptr,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,   # k, v (B, Tk, K, D)
    stride_sb, stride_sg,                                               # starts (B, G, 1, NSEL)
    stride_xb, stride_xt, stride_xh,                                    # kb, vb (B, S, K, D) contiguous
    stride_ob, stride_oh,                                               # ok (B, K, SEL_END)
    TK, CONTEXT, KG,
    SINK: tl.constexpr, C: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr, N_WINDOW: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, FAST: tl.constexpr,
    LENS: tl.constexpr, ANCHOR: tl.constexpr, WINDOW: tl.constexpr, LOWEST: tl.constexpr,
    PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    b64 = b.to(tl.int64)
    p0, w0, wst, exact = _decode_block(b, kv_len_ptr, anchor_ptr, TK, CONTEXT, SINK, LENS, ANCHOR, WINDOW, LOWEST,
                                       PRUNE_RULE, ATTEND_RULE)
    s_row = starts_ptr + b64 * stride_sb + (kvh // KG) * stride_sg
    s = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    idx, sel_ok, causal, in_win = slot_keys(s, s_row, w0, wst, SINK, C, NSEL, N_WINDOW)
    ok = sel_ok | (causal & (idx <= p0))                   # the keys that exist now
    SEL_END: tl.constexpr = SINK + NSEL * C
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    m = ok[:, None] & d_ok[None, :]
    row = tl.where(ok, idx, 0).to(tl.int64)
    k_off = b64 * stride_kb + row[:, None] * stride_kt + kvh.to(tl.int64) * stride_kh + d[None, :]
    v_off = b64 * stride_vb + row[:, None] * stride_vt + kvh.to(tl.int64) * stride_vh + d[None, :]
    k1 = tl.load(k_ptr + k_off, mask=m, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + k_off + HALF, mask=m, other=0.0).to(tl.float32)
    if ROPE:   # the position the attention kernel would give it, relative to this step's query
        packed = packed_start(s_row, wst, C, NSEL, NSEL_P)
        pos = tl.where(exact | in_win, idx, packed - SINK + s)
        inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
        k1, k2 = _rotate(k1, k2, pos - p0, inv_freq, attention_scaling, FAST)
    x_off = b64 * stride_xb + s.to(tl.int64)[:, None] * stride_xt + kvh * stride_xh + d[None, :]
    in_buf = (s < SEL_END + N_WINDOW)[:, None] & d_ok[None, :]
    dtype = kb_ptr.dtype.element_ty
    tl.store(kb_ptr + x_off, k1.to(dtype), mask=in_buf)
    tl.store(kb_ptr + x_off + HALF, k2.to(dtype), mask=in_buf)
    tl.store(vb_ptr + x_off, tl.load(v_ptr + v_off, mask=m, other=0.0), mask=in_buf)
    tl.store(vb_ptr + x_off + HALF, tl.load(v_ptr + v_off + HALF, mask=m, other=0.0), mask=in_buf)
    tl.store(ok_ptr + b64 * stride_ob + kvh * stride_oh + s, ok.to(tl.int8), mask=s < SEL_END)
    if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
        tl.store(pref_ptr + b, p0)


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, kb_ptr, vb_ptr, ok_ptr, pref_ptr, starts_ptr, kv_len_ptr, anchor_ptr, inv_freq_ptr,
    attention_scaling: tl.constexpr, qk_scale, out_ptr, part_ptr, lse_ptr, count_ptr,
    stride_qb, stride_qh,                          # q (B, 1, H, D)
    stride_sb, stride_sg, KG,                      # starts (B, G, 1, NSEL)
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,   # the cache k, v (B, Tk, K, D)
    stride_xb, stride_xt, stride_xh,               # kb, vb (B, S, K, D)
    stride_ob, stride_oh,                          # ok (B, K, SEL_END)
    stride_yb, stride_yh,                          # out (B, 1, H, D)
    stride_pb, stride_ph, stride_ps,               # SPLIT: partials (B, 1, H, NSPLIT, D)
    stride_lb, stride_lh,                          # SPLIT: lse (B, 1, H, NSPLIT)
    NSPLIT, TK, CONTEXT,
    TILES_PER_SPLIT: tl.constexpr, SINK: tl.constexpr, C: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr,
    N_WINDOW: tl.constexpr, HPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FAST: tl.constexpr, LENS: tl.constexpr, ANCHOR: tl.constexpr, WINDOW: tl.constexpr,
    LOWEST: tl.constexpr, PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr, NSPLIT_P: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)
    p0, w0, wst, exact = _decode_block(b, kv_len_ptr, anchor_ptr, TK, CONTEXT, SINK, LENS, ANCHOR, WINDOW, LOWEST,
                                       PRUNE_RULE, ATTEND_RULE)
    SEL_END: tl.constexpr = SINK + NSEL * C
    p_ref = tl.load(pref_ptr + b)
    # A row that crossed the trained context since the build ("auto" RoPE) moved its sink and
    # selected keys from exact to streaming positions: those slots get the difference rotated in.
    moved = exact != _exact(p_ref + 1, ATTEND_RULE, CONTEXT)
    s_row = starts_ptr + b64 * stride_sb + (kvh // KG) * stride_sg
    packed = p0 * 0
    if ROPE:
        if moved:
            packed = packed_start(s_row, wst, C, NSEL, NSEL_P)

    j = tl.arange(0, BLOCK_M)                      # rows: the query heads of kv head kvh
    row_ok = j < HPK
    h = kvh * HPK + j
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    q_off = b64 * stride_qb + h[:, None] * stride_qh + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0).to(tl.float32)
    rel = p0 - p_ref
    if ROPE:   # the keys sit at p - p_ref: the query at p0 - p_ref
        inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
        q1, q2 = _rotate(q1, q2, tl.zeros((BLOCK_M,), tl.int64) + rel, inv_freq, attention_scaling, FAST)
    # This step's own key (at p0): its window slot, filled from the cache by the tile that holds it.
    s_new = SEL_END + (p0 - wst)
    first = split * TILES_PER_SPLIT * BLOCK_N
    mine = d_ok & (s_new >= first) & (s_new < first + TILES_PER_SPLIT * BLOCK_N)    # only its split reads it
    n_off = b64 * stride_kb + p0 * stride_kt + kvh.to(tl.int64) * stride_kh + d
    kn1 = tl.load(k_ptr + n_off, mask=mine, other=0.0).to(tl.float32)[None, :]                 # (1, HALF_P)
    kn2 = tl.load(k_ptr + n_off + HALF, mask=mine, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        kn1, kn2 = _rotate(kn1, kn2, tl.zeros((1,), tl.int64) + rel, inv_freq, attention_scaling, FAST)
    vn_off = b64 * stride_vb + p0 * stride_vt + kvh.to(tl.int64) * stride_vh + d
    vn1 = tl.load(v_ptr + vn_off, mask=mine, other=0.0)[None, :]
    vn2 = tl.load(v_ptr + vn_off + HALF, mask=mine, other=0.0)[None, :]
    dtype = q_ptr.dtype.element_ty
    q1 = _operand(q1 * qk_scale, dtype, UPCAST)
    q2 = _operand(q2 * qk_scale, dtype, UPCAST)

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF_P), tl.float32)
    acc2 = tl.zeros((BLOCK_M, HALF_P), tl.float32)
    x_base = b64 * stride_xb + kvh * stride_xh
    for i in range(TILES_PER_SPLIT):
        s = (split * TILES_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        fixed = s < SEL_END
        ok = tl.load(ok_ptr + b64 * stride_ob + kvh * stride_oh + s, mask=fixed, other=0) != 0
        col_ok = tl.where(fixed, ok, (s < SEL_END + N_WINDOW) & (wst + (s - SEL_END) <= p0))
        if tl.max(col_ok.to(tl.int32), axis=0) > 0:
            x_off = x_base + s.to(tl.int64)[:, None] * stride_xt + d[None, :]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k1 = tl.load(kb_ptr + x_off, mask=kv_mask, other=0.0)
            k2 = tl.load(kb_ptr + x_off + HALF, mask=kv_mask, other=0.0)
            v1 = tl.load(vb_ptr + x_off, mask=kv_mask, other=0.0)
            v2 = tl.load(vb_ptr + x_off + HALF, mask=kv_mask, other=0.0)
            new = (s == s_new)[:, None]
            if tl.max(new.to(tl.int32)) > 0:   # the tile with this step's key: from registers, then stored
                kn1s, kn2s = kn1.to(k1.dtype), kn2.to(k1.dtype)
                k1 = tl.where(new, kn1s, k1)
                k2 = tl.where(new, kn2s, k2)
                v1 = tl.where(new, vn1, v1)
                v2 = tl.where(new, vn2, v2)
                st = new & d_ok[None, :]
                tl.store(kb_ptr + x_off, k1, mask=st)
                tl.store(kb_ptr + x_off + HALF, k2, mask=st)
                tl.store(vb_ptr + x_off, v1, mask=st)
                tl.store(vb_ptr + x_off + HALF, v2, mask=st)
            if ROPE:
                if moved:   # rotate in (position now) - (position at the build); window keys: 0
                    idx, _sel_ok, _causal, in_win = slot_keys(s, s_row, w0, wst, SINK, C, NSEL, N_WINDOW)
                    stream = packed - SINK + s
                    delta = tl.where(in_win, 0, tl.where(exact, idx, stream) - tl.where(exact, stream, idx))
                    r1, r2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), delta, inv_freq, 1.0, FAST)
                    k1, k2 = r1.to(k1.dtype), r2.to(k2.dtype)
            k1 = _operand(k1, dtype, UPCAST)
            k2 = _operand(k2, dtype, UPCAST)
            v1 = _operand(v1, dtype, UPCAST)
            v2 = _operand(v2, dtype, UPCAST)
            qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)            # (BLOCK_M, BLOCK_N)
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = _operand(p, dtype, UPCAST)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PRECISION)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=DOT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if SPLIT:
        p_off = b64 * stride_pb + h[:, None] * stride_ph + split * stride_ps + d[None, :]
        tl.store(part_ptr + p_off, acc1 / l_safe[:, None], mask=q_mask)
        tl.store(part_ptr + p_off + HALF, acc2 / l_safe[:, None], mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b64 * stride_lb + h * stride_lh + split, lse, mask=row_ok)
        MERGE_M: tl.constexpr = BLOCK_M
        arrive_and_merge(count_ptr, b * tl.num_programs(1) + kvh, part_ptr, lse_ptr, out_ptr,
                         b64 * stride_pb + h.to(tl.int64) * stride_ph, b64 * stride_lb + h.to(tl.int64) * stride_lh,
                         b64 * stride_yb + h.to(tl.int64) * stride_yh, row_ok, stride_ps, NSPLIT, HALF, HALF_P,
                         MERGE_M, NSPLIT_P, SPLIT_TILE)
    else:
        o_off = b64 * stride_yb + h[:, None] * stride_yh + d[None, :]
        tl.store(out_ptr + o_off, (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(out_ptr + o_off + HALF, (acc2 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


def usable(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> bool:
    """Whether a decode call (Triton backend) can read a slot buffer: one query per row, keys
    with unit stride on head_dim."""
    return q.shape[1] == 1 and k.stride(-1) == 1


def _geometry_args(mask: HiPMask, kv_len: torch.Tensor, config: HiPConfig) -> dict:
    anchor = mask.w0 is not None
    return dict(kv_len_ptr=kv_len, anchor_ptr=mask.w0.contiguous() if anchor else kv_len, CONTEXT=config.model_context_length or 0,
                LENS=True, ANCHOR=anchor, **position_constants(config))


def _check(k: torch.Tensor, mask: HiPMask, config: HiPConfig):
    if mask.starts.shape[2] != 1:
        raise ValueError("slot buffers are for decode: one query block per row")
    if k.stride(-1) != 1:
        raise ValueError("keys and values need unit stride on head_dim")


def build_slots(k: torch.Tensor, v: torch.Tensor, mask: HiPMask, kv_len: torch.Tensor, config: HiPConfig,
                rope: RoPE | None, out: Slots | None = None) -> Slots:
    """The slot list of ``mask`` for a decode step at kv_len (B,) (its query at kv_len - 1):
    keys rotated at p - p_ref (p_ref = kv_len - 1), values, the fixed slots' validity; written
    into ``out`` when given (the static buffers of a CUDA graph)."""
    _check(k, mask, config)
    B, tk, K, D = k.shape
    G, nsel = mask.starts.shape[1], mask.starts.shape[3]
    sel_end = config.sink + nsel * config.chunk_size
    S = sel_end + window_slots(config)
    if out is not None and out.k.shape == (B, S, K, D) and out.k.dtype == k.dtype:
        kb, vb, ok, p_ref = out.k, out.v, out.ok, out.p_ref
    else:
        kb = torch.empty(B, S, K, D, dtype=k.dtype, device=k.device)
        vb = torch.empty_like(kb)
        ok = torch.empty(B, K, sel_end, dtype=torch.int8, device=k.device)
        p_ref = torch.empty(B, dtype=torch.int64, device=k.device)
    kv_len = kv_len.to(k.device).long().contiguous()
    starts = mask.starts.contiguous()
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1)).to(k.device, torch.float32)
    block_n = 64
    _build_kernel[(B, K, triton.cdiv(S, block_n))](
        k, v, starts, inv_freq_ptr=inv_freq, attention_scaling=float(rope.attention_scaling if rope else 1.0),
        kb_ptr=kb, vb_ptr=vb, ok_ptr=ok, pref_ptr=p_ref,
        stride_kb=k.stride(0), stride_kt=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vt=v.stride(1), stride_vh=v.stride(2),
        stride_sb=starts.stride(0), stride_sg=starts.stride(1),
        stride_xb=kb.stride(0), stride_xt=kb.stride(1), stride_xh=kb.stride(2),
        stride_ob=ok.stride(0), stride_oh=ok.stride(1),
        TK=tk, KG=K // G, SINK=config.sink, C=config.chunk_size, NSEL=nsel,
        NSEL_P=max(2, triton.next_power_of_2(nsel)), N_WINDOW=window_slots(config), HALF=D // 2,
        HALF_P=max(16, triton.next_power_of_2(D // 2)), BLOCK_N=block_n, ROPE=rope is not None,
        FAST=k.is_cuda, **_geometry_args(mask, kv_len, config), num_warps=4,
    )
    return Slots(kb, vb, ok, p_ref)


def attend_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: Slots, mask: HiPMask,
                 kv_len: torch.Tensor, config: HiPConfig, rope: RoPE | None, scale: float,
                 tuning: dict | None = None) -> torch.Tensor:
    """One decode step over ``slots`` (built for ``mask``): q (B, 1, H, D) -> (B, 1, H, D);
    ``ops.attend_reused`` up to rounding, without gathers or per-key rotation. k, v: the cache,
    whose key and value at kv_len - 1 (this step's) go into their window slot."""
    B, tq, H, D = q.shape
    if tq != 1:
        raise ValueError(f"attend_slots takes one query per row, got Tq={tq}")
    _, S, K, _ = slots.k.shape
    tuning = {**DECODE_TUNING, **(tuning or {})}
    block_n = tuning.get("block_n", 64)
    hpk = H // K
    block_m = max(16, triton.next_power_of_2(hpk))
    n_tiles = triton.cdiv(S, block_n)
    want = triton.cdiv(tuning["programs_per_sm"] * _num_sms(q.device.index or 0), B * K)
    per_split = triton.cdiv(n_tiles, max(1, min(n_tiles, want)))
    nsplit = triton.cdiv(n_tiles, per_split)
    half, half_p = D // 2, max(16, triton.next_power_of_2(D // 2))
    nsplit_p = max(2, triton.next_power_of_2(nsplit))
    out = torch.empty_like(q)
    if nsplit > 1:
        part = torch.empty(B, 1, H, nsplit, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, 1, H, nsplit, device=q.device, dtype=torch.float32)
        counts = arrival_counters(B * K, q.device)
    else:
        part = lse = counts = torch.empty(1, 1, 1, 1, 1, device=q.device, dtype=torch.float32)
    kv_len = kv_len.to(q.device).long().contiguous()
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1)).to(q.device, torch.float32)
    starts = mask.starts.contiguous()
    _attend_kernel[(B, K, nsplit)](
        q, k, v, slots.k, slots.v, slots.ok, slots.p_ref, starts, inv_freq_ptr=inv_freq,
        attention_scaling=float(rope.attention_scaling if rope else 1.0), qk_scale=float(scale) * LOG2E,
        out_ptr=out, part_ptr=part, lse_ptr=lse, count_ptr=counts,
        stride_qb=q.stride(0), stride_qh=q.stride(2),
        stride_sb=starts.stride(0), stride_sg=starts.stride(1), KG=K // starts.shape[1],
        stride_kb=k.stride(0), stride_kt=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vt=v.stride(1), stride_vh=v.stride(2),
        stride_xb=slots.k.stride(0), stride_xt=slots.k.stride(1), stride_xh=slots.k.stride(2),
        stride_ob=slots.ok.stride(0), stride_oh=slots.ok.stride(1),
        stride_yb=out.stride(0), stride_yh=out.stride(2),
        stride_pb=part.stride(0), stride_ph=part.stride(2), stride_ps=part.stride(3),
        stride_lb=lse.stride(0), stride_lh=lse.stride(2),
        NSPLIT=nsplit, TK=0, TILES_PER_SPLIT=per_split, SINK=config.sink, C=config.chunk_size,
        NSEL=mask.starts.shape[3], NSEL_P=max(2, triton.next_power_of_2(mask.starts.shape[3])),
        N_WINDOW=window_slots(config), HPK=hpk, BLOCK_M=block_m, BLOCK_N=block_n,
        HALF=half, HALF_P=half_p, ROPE=rope is not None, SPLIT=nsplit > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=not q.is_cuda, FAST=q.is_cuda,
        NSPLIT_P=nsplit_p, SPLIT_TILE=split_tile(block_m, nsplit_p, half_p),
        **_geometry_args(mask, kv_len, config), num_warps=tuning["num_warps"],
    )
    return out
