"""Block-sparse flash attention over sink + selected chunks + sliding window (Triton).

Mirrors ``reference.attend`` / ``reference.slot_indices``. Every (batch, query block, kv head)
sees one list of slots, in order::

    [0, SINK)                      sink keys            idx = slot
    [SINK, SINK + NSEL * C)        selected chunks      idx = starts[j] + i   (j = chunk, i < C)
    [SINK + NSEL * C, S)           window keys          idx = max(w0, SINK) + i

A program owns a tile of BLOCK_M rows = BLOCK_T query rows x HEADS_P query heads of one kv head
(the heads of a GQA group share every key load) and runs one online softmax, exp2 domain with
float32 accumulators, over a range of slot tiles. Keys are rotated on the fly at their RoPE
positions relative to the block's first query p0 (cos/sin computed in registers); the rotate_half
convention means D is loaded as two halves, each padded to HALF_P. With SPLIT the program writes
a partial output and its log2-sum-exp, and the last split to finish merges them into the output
(flash-decoding, ``decode.arrive_and_merge``); otherwise it writes the normalized output.

The block's positions (p0, w0, exact RoPE) come from a ``Geometry``'s tensors, or with POSITIONS
are computed here from the row's length (``geometry.block_positions``: a single decode block),
so a decode step that reuses its mask is this one launch.

Paged reads (``attention/pages.py``): with PAGED, k/v are a pool of pages shared by all rows and
key ``idx`` of row b, kv head h is pool row ``table[b, idx // PAGE, h] * PAGE + idx % PAGE`` (a
table without a head axis has head stride 0; a pool of one-head pages, head stride 0); with SCALED, k/v
are FP8 codes and each loaded row is multiplied by its page's scale for its kv head. Both are
compile-time switches: the plain path compiles exactly as before. With PDL (Hopper+) the launch
may start while the previous kernel drains and waits for it first (``pdl.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..mask import SENTINEL
from .decode import arrive_and_merge
from .geometry import block_positions
from .pdl import release_next, wait_for_previous
from .prune import _rotate

_SENTINEL = tl.constexpr(SENTINEL)
# exp(x) = exp2(x * log2(e)): the softmax scale is folded into q together with log2(e).
LOG2E = 1.4426950408889634
# Running max starts finite so fully masked tiles give exp2(-inf - m) = 0, never nan.
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x as a tl.dot operand: rounded to the inputs' dtype, or kept float32 with UPCAST (the CPU
    interpreter truncates to bfloat16 instead of rounding, and cannot multiply it)."""
    if UPCAST:
        x = x.to(tl.float32)
    else:
        x = x.to(DTYPE)
    return x


@triton.jit
def _bsa_kernel(
    q_ptr, k_ptr, v_ptr, starts_ptr, p0_ptr, w0_ptr, exact_ptr, kv_len_ptr, anchor_ptr,
    inv_freq_ptr, attention_scaling: tl.constexpr, qk_scale,
    out_ptr, part_ptr, lse_ptr, count_ptr, table_ptr, ks_ptr, vs_ptr,
    stride_qb, stride_qt, stride_qh,            # q (B, Tq, H, D), unit stride on D
    stride_kb, stride_kt, stride_kh,            # k (B, Tk, K, D)
    stride_vb, stride_vt, stride_vh,            # v (B, Tk, K, D)
    stride_sb, stride_sg, stride_sq,            # starts (B, G, NQB, NSEL), unit stride on NSEL
    stride_pb,                                  # p0 / w0 (B, NQB)
    stride_ob, stride_ot, stride_oh,            # out (B, Tq, H, D), unit stride on D
    stride_xb, stride_xt, stride_xh, stride_xs,  # SPLIT: partials (B, Tq, H, NSPLIT, D) float32
    stride_lb, stride_lt, stride_lh,            # SPLIT: lse (B, Tq, H, NSPLIT), unit stride on NSPLIT
    stride_tb, stride_tp, stride_th,            # table (B, NB, K or 1) int32
    stride_ssb, stride_ssp,                     # scales (B, NB, K) float32, unit stride on K
    TQ, NQB, T_TILES, KG, NSPLIT, TK, CONTEXT,
    TILES_PER_SPLIT: tl.constexpr, SINK: tl.constexpr, C: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr, N_WINDOW: tl.constexpr,
    BQ: tl.constexpr, HPK: tl.constexpr, HEADS_P: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    ROPE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FAST: tl.constexpr, PAGED: tl.constexpr, SCALED: tl.constexpr, PAGE: tl.constexpr,
    NSPLIT_P: tl.constexpr, SPLIT_TILE: tl.constexpr,
    POSITIONS: tl.constexpr, LENS: tl.constexpr, ANCHOR: tl.constexpr, WINDOW: tl.constexpr,
    LOWEST: tl.constexpr, PRUNE_RULE: tl.constexpr, ATTEND_RULE: tl.constexpr, Q_AT_P0: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)   # q and the cache are the previous kernels' outputs
    release_next(PDL)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tt = pid % T_TILES
    qb = (pid // T_TILES) % NQB
    b = pid // (T_TILES * NQB)
    g = kvh // KG
    b64 = b.to(tl.int64)

    if POSITIONS:   # one decode block (qb = 0): the Triton block_geometry, in registers
        p0, w0, _, exact = block_positions(b, kv_len_ptr, anchor_ptr, anchor_ptr, TQ, TK, CONTEXT, LENS, ANCHOR,
                                           False, WINDOW, LOWEST, PRUNE_RULE, ATTEND_RULE)
    else:
        p0 = tl.load(p0_ptr + b * stride_pb + qb)
        w0 = tl.load(w0_ptr + b * stride_pb + qb)
        exact = tl.load(exact_ptr + b) != 0
    wst = tl.maximum(w0, SINK)                              # first window key
    s_row = starts_ptr + b64 * stride_sb + g * stride_sg + qb * stride_sq
    # Streaming positions pack sink + the selectable keys [SINK, w0) of the selected chunks just
    # before the window (the first chunk may start below the sink, the last run into the window:
    # their masked keys take no position; ``lead`` of them come before the first valid one).
    st_all = tl.load(s_row + tl.arange(0, NSEL_P), mask=tl.arange(0, NSEL_P) < NSEL, other=_SENTINEL).to(tl.int64)
    st_ok = st_all != _SENTINEL
    st_all = tl.where(st_ok, st_all, 0)
    n_keys = tl.minimum(tl.maximum(tl.minimum(st_all + C, w0) - tl.maximum(st_all, SINK), 0), C)
    packed = wst - tl.sum(tl.where(st_ok, n_keys, 0), axis=0)
    lead = tl.sum(tl.where(st_ok, tl.minimum(tl.maximum(SINK - st_all, 0), C), 0), axis=0)

    # Rows: m = t * HEADS_P + j -> query row t of the block, head j of the kv head's group.
    m = tl.arange(0, BLOCK_M)
    t = tt * BLOCK_T + m // HEADS_P
    j = m % HEADS_P
    q_row = qb * BQ + t
    row_ok = (m // HEADS_P < BLOCK_T) & (t < BQ) & (q_row < TQ) & (j < HPK)
    h = kvh * HPK + j
    p_row = p0 + t                                          # (BLOCK_M,) position of each row
    p_max = tl.max(tl.where(row_ok, p_row, -1), axis=0)

    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    inv_freq = tl.load(inv_freq_ptr + d, mask=d_ok, other=0.0)
    # q stays in registers throughout: rotated at its offset t from p0, scaled by scale * log2(e).
    q_off = b64 * stride_qb + q_row.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)              # (BLOCK_M, HALF_P)
    q2 = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0).to(tl.float32)
    if ROPE:
        if Q_AT_P0:   # one query, at p0 itself (decode): its rotation is by zero
            if attention_scaling != 1.0:
                q1 = q1 * attention_scaling
                q2 = q2 * attention_scaling
        else:
            q1, q2 = _rotate(q1, q2, t, inv_freq, attention_scaling, FAST)
    dtype = q_ptr.dtype.element_ty
    q1 = _operand(q1 * qk_scale, dtype, UPCAST)
    q2 = _operand(q2 * qk_scale, dtype, UPCAST)

    m_i = tl.full((BLOCK_M,), _M_INIT, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF_P), tl.float32)
    acc2 = tl.zeros((BLOCK_M, HALF_P), tl.float32)

    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    SEL_END: tl.constexpr = SINK + NSEL * C
    S: tl.constexpr = SEL_END + N_WINDOW
    for i in range(TILES_PER_SPLIT):
        # (BLOCK_N,) slots; a tile past the end (last split) has no valid column and is skipped.
        s = (split * TILES_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_sink = s < SINK
        in_sel = (s >= SINK) & (s < SEL_END)
        in_win = (s >= SEL_END) & (s < S)
        u = tl.where(in_sel, s - SINK, 0)
        st = tl.load(s_row + u // C, mask=in_sel, other=_SENTINEL).to(tl.int64)
        sel_idx = st + u % C
        idx = tl.where(in_sink, s, tl.where(in_sel, sel_idx, wst + (s - SEL_END)))
        sel_ok = in_sel & (st != _SENTINEL) & (sel_idx >= SINK) & (sel_idx < w0)
        causal = in_sink | in_win                           # valid for rows at positions >= idx
        col_ok = sel_ok | (causal & (idx <= p_max))
        if tl.max(col_ok.to(tl.int32), axis=0) > 0:
            row = tl.where(col_ok, idx, 0).to(tl.int64)      # key row to load (0 when unused)
            if PAGED:   # logical row -> row of the page pool
                pg = tl.load(table_ptr + b64 * stride_tb + (row // PAGE) * stride_tp + kvh * stride_th,
                             mask=col_ok, other=0).to(tl.int64)
                # A page not resident (-1) reads slot 0, as the reference does: a batch runner's
                # row parked in a decode step while it prefills reuses its mask at a position past
                # its last fetch (its output is discarded). -1 read the PAGE rows before the pool.
                row = tl.maximum(pg, 0) * PAGE + row % PAGE
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k_off = row[:, None] * stride_kt + d[None, :]
            k1 = tl.load(k_base + k_off, mask=kv_mask, other=0.0)                   # (BLOCK_N, HALF_P)
            k2 = tl.load(k_base + k_off + HALF, mask=kv_mask, other=0.0)
            if SCALED:  # FP8 codes times their page's scale (logical pages: no table here)
                s_off = b64 * stride_ssb + (row // PAGE) * stride_ssp + kvh
                k_sc = tl.load(ks_ptr + s_off, mask=col_ok, other=1.0)
                k1 = k1.to(tl.float32) * k_sc[:, None]
                k2 = k2.to(tl.float32) * k_sc[:, None]
            if ROPE:
                pos = tl.where(exact | in_win, idx, packed - SINK + s - tl.where(in_sel, lead, 0))
                k1, k2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), pos - p0, inv_freq, attention_scaling,
                                 FAST)
            k1 = _operand(k1, dtype, UPCAST)
            k2 = _operand(k2, dtype, UPCAST)
            qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)            # (BLOCK_M, BLOCK_N)
            valid = sel_ok[None, :] | (causal[None, :] & (idx[None, :] <= p_row[:, None]))
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_off = row[:, None] * stride_vt + d[None, :]
            v1 = tl.load(v_base + v_off, mask=kv_mask, other=0.0)
            v2 = tl.load(v_base + v_off + HALF, mask=kv_mask, other=0.0)
            if SCALED:
                v_sc = tl.load(vs_ptr + s_off, mask=col_ok, other=1.0)
                v1 = v1.to(tl.float32) * v_sc[:, None]
                v2 = v2.to(tl.float32) * v_sc[:, None]
            p = _operand(p, dtype, UPCAST)
            v1 = _operand(v1, dtype, UPCAST)
            v2 = _operand(v2, dtype, UPCAST)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PRECISION)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=DOT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o1 = acc1 / l_safe[:, None]
    o2 = acc2 / l_safe[:, None]
    if SPLIT:
        x_off = (b64 * stride_xb + q_row.to(tl.int64)[:, None] * stride_xt + h[:, None] * stride_xh
                 + split * stride_xs + d[None, :])
        tl.store(part_ptr + x_off, o1, mask=q_mask)
        tl.store(part_ptr + x_off + HALF, o2, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b64 * stride_lb + q_row * stride_lt + h * stride_lh + split, lse, mask=row_ok)
        # Merge rows: the real (query row, head) pairs of this tile, without the padding to 16
        # rows that tl.dot needed.
        MERGE_M: tl.constexpr = BLOCK_T * HEADS_P
        mm = tl.arange(0, MERGE_M)
        t_m = tt * BLOCK_T + mm // HEADS_P
        q_row_m = (qb * BQ + t_m).to(tl.int64)
        h_m = kvh * HPK + mm % HEADS_P
        ok_m = (t_m < BQ) & (q_row_m < TQ) & (mm % HEADS_P < HPK)
        arrive_and_merge(count_ptr, pid * tl.num_programs(1) + kvh, part_ptr, lse_ptr, out_ptr,
                         b64 * stride_xb + q_row_m * stride_xt + h_m * stride_xh,
                         b64 * stride_lb + q_row_m * stride_lt + h_m * stride_lh,
                         b64 * stride_ob + q_row_m * stride_ot + h_m * stride_oh,
                         ok_m, stride_xs, NSPLIT, HALF, HALF_P, MERGE_M, NSPLIT_P, SPLIT_TILE)
    else:
        o_off = b64 * stride_ob + q_row.to(tl.int64)[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, o1.to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(out_ptr + o_off + HALF, o2.to(out_ptr.dtype.element_ty), mask=q_mask)
