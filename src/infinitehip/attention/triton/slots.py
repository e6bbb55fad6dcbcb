"""Decode over a slot buffer — a prototype for cheaper mask-reuse steps (docs/algorithm.md,
"Where a reuse step's time goes"), timed against ``ops.attend_reused`` by
``scripts/sweep_prune.py --reuse``; not wired into the engine yet.

A reuse step of ``ops.attend_reused`` gathers its keys through the mask and rotates each one
(cos/sin per key and frequency) every step, although between refreshes every slot's key and
position are fixed and only the query moves. As (R(a) q) . (R(b) k) = q . R(b - a) k, a refresh
can instead write its keys once, in slot order and rotated at p - p_ref (p_ref: the query's
position then), and a step rotates its one query at p0 - p_ref and reads the slots contiguously:
no gather, no per-key trig.

  build_slots(k, v, mask, kv_len, config, rope) -> Slots      one launch, at a refresh
  append_slots(slots, k_new, v_new, kv_len, mask, config, rope)  a decoded token into its window slot
  attend_slots(q, slots, mask, kv_len, config, rope, scale)  one decode step, one launch

Plain caches (B, Tk, K, D), one query per row (Tq = 1). Window slots are causal per step; the
sink's and selected slots' validity is fixed at the build (``Slots.ok``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...config import HiPConfig
from ..mask import HiPMask, window_slots
from ..rope import RoPE, apply_rope
from .bsa import LOG2E, _operand, packed_start, slot_keys
from .decode import arrival_counters, arrive_and_merge, split_tile
from .geometry import block_positions, position_constants
from .ops import DECODE_TUNING, _num_sms
from .prune import _rotate


@dataclass
class Slots:
    """k, v (B, S, K, D): the slot list's keys (rotated at p - p_ref) and values; ok (B, K,
    SINK + NSEL * C) int8: which sink and selected slots hold a key; p_ref (B,) int64."""
    k: torch.Tensor
    v: torch.Tensor
    ok: torch.Tensor
    p_ref: torch.Tensor


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
    p0, w0, _, exact = block_positions(b, kv_len_ptr, anchor_ptr, anchor_ptr, 1, TK, CONTEXT, LENS, ANCHOR, False,
                                       WINDOW, LOWEST, PRUNE_RULE, ATTEND_RULE)
    wst = tl.maximum(w0, SINK)
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
    q_ptr, kb_ptr, vb_ptr, ok_ptr, pref_ptr, kv_len_ptr, anchor_ptr, inv_freq_ptr, attention_scaling: tl.constexpr,
    qk_scale, out_ptr, part_ptr, lse_ptr, count_ptr,
    stride_qb, stride_qh,                          # q (B, 1, H, D)
    stride_xb, stride_xt, stride_xh,               # kb, vb (B, S, K, D)
    stride_ob, stride_oh,                          # ok (B, K, SEL_END)
    stride_yb, stride_yh,                          # out (B, 1, H, D)
    stride_pb, stride_ph, stride_ps,               # SPLIT: partials (B, 1, H, NSPLIT, D)
    stride_lb, stride_lh,                          # SPLIT: lse (B, 1, H, NSPLIT)
    NSPLIT, TK, CONTEXT,
    TILES_PER_SPLIT: tl.constexpr, SINK: tl.constexpr, C: tl.constexpr, NSEL: tl.constexpr,
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
    p0, w0, _, _ = block_positions(b, kv_len_ptr, anchor_ptr, anchor_ptr, 1, TK, CONTEXT, LENS, ANCHOR, False,
                                   WINDOW, LOWEST, PRUNE_RULE, ATTEND_RULE)
    wst = tl.maximum(w0, SINK)
    SEL_END: tl.constexpr = SINK + NSEL * C

    j = tl.arange(0, BLOCK_M)                      # rows: the query heads of kv head kvh
    row_ok = j < HPK
    h = kvh * HPK + j
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    q_off = b64 * stride_qb + h[:, None] * stride_qh + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0).to(tl.float32)
    if ROPE:   # the keys sit at p - p_ref: the query at p0 - p_ref
        inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
        rel = tl.zeros((BLOCK_M,), tl.int64) + (p0 - tl.load(pref_ptr + b))
        q1, q2 = _rotate(q1, q2, rel, inv_freq, attention_scaling, FAST)
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
            k1 = _operand(tl.load(kb_ptr + x_off, mask=kv_mask, other=0.0), dtype, UPCAST)
            k2 = _operand(tl.load(kb_ptr + x_off + HALF, mask=kv_mask, other=0.0), dtype, UPCAST)
            v1 = _operand(tl.load(vb_ptr + x_off, mask=kv_mask, other=0.0), dtype, UPCAST)
            v2 = _operand(tl.load(vb_ptr + x_off + HALF, mask=kv_mask, other=0.0), dtype, UPCAST)
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
                rope: RoPE | None) -> Slots:
    """The slot list of ``mask`` for a decode step at kv_len (B,) (its query at kv_len - 1):
    keys rotated at p - p_ref (p_ref = kv_len - 1), values, the fixed slots' validity."""
    _check(k, mask, config)
    B, tk, K, D = k.shape
    G, nsel = mask.starts.shape[1], mask.starts.shape[3]
    sel_end = config.sink + nsel * config.chunk_size
    S = sel_end + window_slots(config)
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


def append_slots(slots: Slots, k_new: torch.Tensor, v_new: torch.Tensor, kv_len: torch.Tensor, mask: HiPMask,
                 config: HiPConfig, rope: RoPE | None):
    """Put each row's newest key (at kv_len - 1) and value, k_new / v_new (B, K, D), into its
    window slot, the key rotated at p - p_ref (PyTorch: the prototype's write, not graph-fused)."""
    from .. import reference

    geo = reference.block_geometry(kv_len, 1, config, mask)
    p = kv_len.long() - 1
    slot = config.sink + mask.starts.shape[3] * config.chunk_size + (p - geo.w0[:, 0].clamp(min=config.sink))
    if rope is not None:
        cos, sin = rope.cos_sin((p - slots.p_ref)[:, None])                          # (B, 1, D/2)
        k_new = apply_rope(k_new, cos, sin)
    rows = torch.arange(k_new.shape[0], device=k_new.device)
    slots.k[rows, slot] = k_new.to(slots.k.dtype)
    slots.v[rows, slot] = v_new.to(slots.v.dtype)


def attend_slots(q: torch.Tensor, slots: Slots, mask: HiPMask, kv_len: torch.Tensor, config: HiPConfig,
                 rope: RoPE | None, scale: float, tuning: dict | None = None) -> torch.Tensor:
    """One decode step over ``slots`` (built for ``mask``): q (B, 1, H, D) -> (B, 1, H, D);
    ``ops.attend_reused`` up to rounding, without gathers or per-key rotation."""
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
    _attend_kernel[(B, K, nsplit)](
        q, slots.k, slots.v, slots.ok, slots.p_ref, inv_freq_ptr=inv_freq,
        attention_scaling=float(rope.attention_scaling if rope else 1.0), qk_scale=float(scale) * LOG2E,
        out_ptr=out, part_ptr=part, lse_ptr=lse, count_ptr=counts,
        stride_qb=q.stride(0), stride_qh=q.stride(2),
        stride_xb=slots.k.stride(0), stride_xt=slots.k.stride(1), stride_xh=slots.k.stride(2),
        stride_ob=slots.ok.stride(0), stride_oh=slots.ok.stride(1),
        stride_yb=out.stride(0), stride_yh=out.stride(2),
        stride_pb=part.stride(0), stride_ph=part.stride(2), stride_ps=part.stride(3),
        stride_lb=lse.stride(0), stride_lh=lse.stride(2),
        NSPLIT=nsplit, TK=0, TILES_PER_SPLIT=per_split, SINK=config.sink, C=config.chunk_size,
        NSEL=mask.starts.shape[3], N_WINDOW=window_slots(config), HPK=hpk, BLOCK_M=block_m, BLOCK_N=block_n,
        HALF=half, HALF_P=half_p, ROPE=rope is not None, SPLIT=nsplit > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=not q.is_cuda, FAST=q.is_cuda,
        NSPLIT_P=nsplit_p, SPLIT_TILE=split_tile(block_m, nsplit_p, half_p),
        **_geometry_args(mask, kv_len, config), num_warps=tuning["num_warps"],
    )
    return out
