"""Hierarchical top-1 chunk scoring: the Triton kernel behind ``ops.score_chunks``.

One launch scores every (batch, head group, query block, chunk) in parallel. A program owns
``BLOCK_C`` chunks of one (batch, group, query block) and walks their log2(chunk) levels
together: at each level it gathers the two probe keys of every chunk (the middles of both
halves) in one load, rotates them in registers, scores them against the block's pooled queries
(max over valid rows and over every query head of the group; each query tile is loaded once
for both halves) and keeps the better half of each chunk.

Mirrors ``reference.score_chunks``; see it for the exact semantics (bfloat16 keys are scored
with bfloat16 operands: ``_PRUNE_DOT_PRECISION``). With SCALED the keys are
FP8 codes and each probe is multiplied by its page's scale (``attention/pages.py``): KV offload
prunes over the host store in place; with PROBE_STRIDE a probe at a multiple of it is read from
the store's GPU probe copy instead (the other probes still from the host).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import HiPConfig, descent_levels
from ..mask import NEG_SCORE, SENTINEL, Geometry
from ..pages import KVPages
from ..rope import RoPE
from .pdl import launch_options, release_next, wait_for_previous

# Dot precision of the probes, by key dtype. bfloat16 keys: the rotated probes and pooled queries
# rounded to bfloat16, float32 sums (tensor cores at 16-bit rate, half the shared-memory bytes of
# float32 tiles): a 16K-query prefill chunk at 128K, stages 0/1/2 4.4/5.4/6.8 -> 3.4/4.5/5.5 ms on
# an H200 (scripts/sweep_prune.py, sweep_prune_paired_h200.json); scores then match the float32
# reference to ~1e-2 relative, so near-ties may decide differently. Other 16-bit keys (fp16, whose
# values bfloat16 would round) and FP8 codes: tf32, exact for them, queries rounded to 10 bits
# (3.3x faster than "tf32x3" on an H100, decode 1M stage 0). float32 keys keep float32 accuracy.
_PRUNE_DOT_PRECISION = {torch.float32: "tf32x3", torch.bfloat16: "bf16"}
_SENTINEL = tl.constexpr(SENTINEL)
_NEG_SCORE = tl.constexpr(NEG_SCORE)


# 2*pi in three parts for Cody-Waite range reduction (the first exact in 8 bits).
_TWO_PI_A = tl.constexpr(6.28125)
_TWO_PI_B = tl.constexpr(1.9353071693331003e-3)
_TWO_PI_C = tl.constexpr(1.0253131677018246e-11)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _cos_sin(angle, FAST: tl.constexpr):
    """cos and sin of float32 angles. FAST (GPU): reduce into [-pi, pi] then the hardware
    approximations (abs. error ~1e-6, a few instructions instead of libdevice's ~40)."""
    if FAST:
        n = tl.floor(angle * _INV_TWO_PI + 0.5)
        r = tl.fma(-n, _TWO_PI_A, angle)
        r = tl.fma(-n, _TWO_PI_B, r)
        r = tl.fma(-n, _TWO_PI_C, r)
        cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                        is_pure=True, pack=1)
        sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return cos, sin


@triton.jit
def _rotate(x1, x2, rel, inv_freq, attention_scaling: tl.constexpr, FAST: tl.constexpr):
    """RoPE (rotate_half convention) of rows x = [x1 | x2] at positions rel: (N, HALF_P) each.
    attention_scaling is a compile-time constant: 1.0 (most RoPE types) costs no multiply."""
    cos, sin = _cos_sin(rel.to(tl.float32)[:, None] * inv_freq[None, :], FAST)
    if attention_scaling != 1.0:
        cos = cos * attention_scaling
        sin = sin * attention_scaling
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _bf16(x, FAST: tl.constexpr):
    """x rounded to bfloat16: the tensor-core operand on the GPU; the interpreter's bfloat16 dot
    is unreliable, so there the rounded values stay float32 (their products are exact either way)."""
    y = x.to(tl.bfloat16)
    if not FAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _load_probes(k_ptr, kp_ptr, probe, probe_ok, kvh, stride_kt, stride_kh, stride_pt, stride_ph,
                 HALF: tl.constexpr, HALF_P: tl.constexpr, PROBE_STRIDE: tl.constexpr):
    """The probe keys (BLOCK_C, HALF_P) x 2: both halves of D, loaded separately for rotate_half.
    With PROBE_STRIDE, keys at its multiples come from the device copy kp (a masked-off lane of a
    load moves no bytes, so the host store is read for the other probes only). 64-bit offsets."""
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    k_off = probe.to(tl.int64)[:, None] * stride_kt + kvh.to(tl.int64) * stride_kh + d[None, :]
    k_mask = probe_ok[:, None] & d_ok[None, :]
    if PROBE_STRIDE > 0:
        near = probe_ok & (probe % PROBE_STRIDE == 0)
        p_off = (probe // PROBE_STRIDE).to(tl.int64)[:, None] * stride_pt + kvh.to(tl.int64) * stride_ph + d[None, :]
        p_mask = near[:, None] & d_ok[None, :]
        far = k_mask & ~p_mask
        k1 = tl.where(p_mask, tl.load(kp_ptr + p_off, mask=p_mask, other=0.0), tl.load(k_ptr + k_off, mask=far, other=0.0))
        k2 = tl.where(p_mask, tl.load(kp_ptr + p_off + HALF, mask=p_mask, other=0.0),
                      tl.load(k_ptr + k_off + HALF, mask=far, other=0.0))
    else:
        k1 = tl.load(k_ptr + k_off, mask=k_mask, other=0.0)
        k2 = tl.load(k_ptr + k_off + HALF, mask=k_mask, other=0.0)
    return k1.to(tl.float32), k2.to(tl.float32)


@triton.jit
def _probe_scores(q_ptr, qv_ptr, k_ptr, kp_ptr, ks_ptr, probe, probe_ok, exact, rel, inv_freq,
                  attention_scaling: tl.constexpr, kvh,
                  stride_qr, stride_qh, stride_qvr, stride_kt, stride_kh, stride_pt, stride_ph, stride_ssp,
                  SCALED: tl.constexpr, PAGE: tl.constexpr, PROBE_STRIDE: tl.constexpr, R: tl.constexpr,
                  HPK: tl.constexpr, HPK_P: tl.constexpr, HALF: tl.constexpr,
                  HALF_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                  M_TILES: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST: tl.constexpr):
    """Max over the valid pooled rows and the HPK query heads of kv head ``kvh`` of q . k_probe.

    probe (BLOCK_C,) key positions; returns (BLOCK_C,) float32, -inf where no row is valid.
    """
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    k1, k2 = _load_probes(k_ptr, kp_ptr, probe, probe_ok, kvh, stride_kt, stride_kh, stride_pt, stride_ph,
                          HALF, HALF_P, PROBE_STRIDE)                              # (BLOCK_C, HALF_P)
    if SCALED:   # FP8 codes times their page's scale for this kv head
        k_sc = tl.load(ks_ptr + (probe.to(tl.int64) // PAGE) * stride_ssp + kvh, mask=probe_ok, other=1.0)
        k1 = k1 * k_sc[:, None]
        k2 = k2 * k_sc[:, None]
    if ROPE:
        if exact:
            k1, k2 = _rotate(k1, k2, rel, inv_freq, attention_scaling, FAST)
        elif attention_scaling != 1.0:   # relative mode: every probe at position 0, a rotation by zero
            k1 = k1 * attention_scaling
            k2 = k2 * attention_scaling
    if DOT_PRECISION == "bf16":   # 16-bit operands, float32 accumulation
        k1 = _bf16(k1, FAST)
        k2 = _bf16(k2, FAST)
    best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    # Rows m = r * HPK_P + j (pooled row r, head j of the kv head). Row tiles without a valid
    # row are skipped: in decode only the first pooled row is real.
    for mt in range(M_TILES):
        m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        r = m // HPK_P
        j = m % HPK_P
        row_ok = (r < R) & (j < HPK)
        row_ok = row_ok & (tl.load(qv_ptr + r * stride_qvr, mask=row_ok, other=0) != 0)
        if tl.max(row_ok.to(tl.int32), axis=0) > 0:
            q_off = r[:, None] * stride_qr + (kvh * HPK + j)[:, None] * stride_qh + d[None, :]
            q_mask = row_ok[:, None] & d_ok[None, :]
            q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)                    # (BLOCK_M, HALF_P)
            q2 = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0)
            if DOT_PRECISION == "bf16":   # "ieee": the interpreter's rounded float32 operands, exactly
                s = tl.dot(_bf16(q1, FAST), tl.trans(k1), input_precision="ieee")
                s += tl.dot(_bf16(q2, FAST), tl.trans(k2), input_precision="ieee")  # (BLOCK_M, BLOCK_C)
            else:
                s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
                s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)      # (BLOCK_M, BLOCK_C)
            s = tl.where(row_ok[:, None], s, float("-inf"))
            best = tl.maximum(best, tl.max(s, axis=0))
    return best


@triton.jit
def _group_scores(q_base, qv_base, k_base, kp_base, ks_base, probe, probe_ok, exact, rel, inv_freq,
                  attention_scaling: tl.constexpr, g,
                  stride_qr, stride_qh, stride_qvr, stride_kt, stride_kh, stride_pt, stride_ph, stride_ssp,
                  KG: tl.constexpr, SCALED: tl.constexpr, PAGE: tl.constexpr, PROBE_STRIDE: tl.constexpr,
                  R: tl.constexpr, HPK: tl.constexpr, HPK_P: tl.constexpr,
                  HALF: tl.constexpr, HALF_P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
                  M_TILES: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST: tl.constexpr):
    """``_probe_scores`` of the N keys ``probe`` (rotated at ``rel``), max over the KG kv heads of group g."""
    s = tl.full((N,), float("-inf"), tl.float32)
    for kk in range(KG):
        s = tl.maximum(s, _probe_scores(
            q_base, qv_base, k_base, kp_base, ks_base, probe, probe_ok, exact, rel, inv_freq, attention_scaling,
            g * KG + kk, stride_qr, stride_qh, stride_qvr, stride_kt, stride_kh, stride_pt, stride_ph, stride_ssp,
            SCALED, PAGE, PROBE_STRIDE, R, HPK, HPK_P, HALF, HALF_P, N, BLOCK_M, M_TILES, ROPE, DOT_PRECISION, FAST))
    return s


@triton.jit
def _score_chunks_kernel(
    q_ptr, qv_ptr, k_ptr, kp_ptr, ks_ptr, starts_ptr, out_ptr, p0_ptr, w0_ptr, exact_ptr, inv_freq_ptr,
    attention_scaling: tl.constexpr,
    stride_qb, stride_qq, stride_qr, stride_qh,         # qp (B, NQB, R, H, D), unit stride on D
    stride_qvb, stride_qvq, stride_qvr,                 # q_valid (B, NQB, R)
    stride_kb, stride_kt, stride_kh,                    # k (B, Tk, K, D), unit stride on D
    stride_pb, stride_pt, stride_ph,                    # PROBE_STRIDE: probe copy (B, Tk / stride, K, D)
    stride_sb, stride_sg, stride_sq, stride_sn,         # starts (B, G, NQB, n)
    stride_ob, stride_og, stride_oq,                    # out (B, G, NQB, n), unit stride on n
    stride_gb,                                          # p0 / w0 (B, NQB), unit stride on NQB
    stride_ssb, stride_ssp,                             # FP8 scales (B, NB, K), unit stride on K
    G, NQB, N, TILES, NPROG,                            # tiles in all, programs
    ITERS: tl.constexpr,                                # tiles a program (1 unless max_programs caps the grid)
    SINK: tl.constexpr, CHUNK: tl.constexpr, LEVELS: tl.constexpr,
    KG: tl.constexpr, R: tl.constexpr, HPK: tl.constexpr, HPK_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    M_TILES: tl.constexpr, ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST: tl.constexpr,
    SCALED: tl.constexpr, PAGE: tl.constexpr, PROBE_STRIDE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    # A program scores BLOCK_C chunks of one (batch, group, query block) -- tiles fastest in a 1-D
    # grid -- or, in a grid of fewer programs (``tuning['max_programs']``: pruning beside decode,
    # which must leave the SMs room for decode's kernels), every num_programs-th tile in turn.
    n_tiles = tl.cdiv(N, BLOCK_C)
    for it in range(ITERS):   # past the last tile a program redoes it (the same values): no bounds test
        pid = tl.minimum(tl.program_id(0) + it * NPROG, TILES - 1)
        tile = pid % n_tiles
        bgq = pid // n_tiles
        qb = bgq % NQB
        g = (bgq // NQB) % G
        b = bgq // (NQB * G)

        c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < N
        st = tl.load(starts_ptr + b.to(tl.int64) * stride_sb + g * stride_sg + qb * stride_sq + c * stride_sn,
                     mask=c_ok, other=_SENTINEL).to(tl.int64)
        p0 = tl.load(p0_ptr + b * stride_gb + qb)
        w0 = tl.load(w0_ptr + b * stride_gb + qb)
        lo = tl.maximum(st, SINK)
        hi = tl.minimum(st + CHUNK, w0)
        active = c_ok & (st != _SENTINEL) & (lo < hi)

        best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            exact = tl.load(exact_ptr + b) != 0
            inv_freq = tl.load(inv_freq_ptr + tl.arange(0, HALF_P), mask=tl.arange(0, HALF_P) < HALF, other=0.0)
            q_base = q_ptr + b.to(tl.int64) * stride_qb + qb * stride_qq
            qv_base = qv_ptr + b * stride_qvb + qb * stride_qvq
            k_base = k_ptr + b.to(tl.int64) * stride_kb
            kp_base = kp_ptr + b.to(tl.int64) * stride_pb
            ks_base = ks_ptr + b.to(tl.int64) * stride_ssb
            a = tl.where(active, st, 0)
            for level in tl.static_range(LEVELS):
                half = CHUNK >> (level + 1)
                # Probe the middle of each half, clamped into the chunk's selectable part [lo, hi).
                left = tl.maximum(tl.minimum(a + half // 2, hi - 1), lo)
                right = tl.maximum(tl.minimum(a + half + half // 2, hi - 1), lo)
                left = tl.where(active, left, 0)
                right = tl.where(active, right, 0)
                # Both halves' probes gathered at once (interleaved): each query tile loaded once.
                pair = tl.reshape(tl.join(left, right), (2 * BLOCK_C,))
                pair_ok = tl.reshape(tl.join(active.to(tl.int32), active.to(tl.int32)), (2 * BLOCK_C,)) != 0
                # Exact pruning rotates probes at their offset from the block start; relative at 0.
                s_pair = _group_scores(q_base, qv_base, k_base, kp_base, ks_base, pair, pair_ok, exact,
                                       tl.where(exact, pair - p0, 0), inv_freq, attention_scaling, g, stride_qr,
                                       stride_qh, stride_qvr, stride_kt, stride_kh, stride_pt, stride_ph, stride_ssp,
                                       KG, SCALED, PAGE, PROBE_STRIDE, R, HPK, HPK_P, HALF, HALF_P, 2 * BLOCK_C,
                                       BLOCK_M, M_TILES, ROPE, DOT_PRECISION, FAST)
                s_l, s_r = tl.split(tl.reshape(s_pair, (BLOCK_C, 2)))
                best = tl.maximum(best, tl.maximum(s_l, s_r))
                a = a + tl.where(s_r > s_l, half, 0)     # keep the better half (ties: the left one)
        out = tl.where(active, best, _NEG_SCORE)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + g * stride_og + qb * stride_oq + c, out, mask=c_ok)


def score_chunks(qp: torch.Tensor, q_valid: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, chunk: int,
                 geo: Geometry, config: HiPConfig, rope: RoPE | None, pages: KVPages | None = None, *,
                 levels: int | None = None, tuning: dict | None = None) -> torch.Tensor:
    """Triton ``reference.score_chunks``: (B, G, NQB, n) float32 scores, NEG_SCORE if inactive.

    qp (B, NQB, R, H, D) float32 pooled rotated queries, q_valid (B, NQB, R) bool,
    k (B, Tk, K, D) un-rotated keys, starts (B, G, NQB, n) int (SENTINEL = no chunk).
    pages: FP8 codes with per-page scales and / or a probe copy (a block table is not supported
    here: pruning reads the logical layout, in place). levels: stop the descent after this many
    levels (None: down to one token). tuning: launch overrides (block_c, block_m, num_warps,
    precision, q16) for scripts/sweep_prune.py.
    """
    if pages is not None and pages.table is not None:
        raise ValueError("score_chunks reads keys in their logical layout; a block table is not supported")
    scaled = pages is not None and pages.scaled
    B, nqb, R, H, D = qp.shape
    K = k.shape[2]
    G, n = starts.shape[1], starts.shape[3]
    if qp.dtype != torch.float32 or qp.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("score_chunks needs float32 pooled queries and keys with unit stride on D")
    hpk = H // K
    hpk_p = triton.next_power_of_2(hpk)
    precision = (tuning or {}).get("precision", _PRUNE_DOT_PRECISION.get(k.dtype, "tf32"))
    tuning = {**_launch_defaults(R * hpk_p, n, precision, prefill=nqb > 1), **(tuning or {})}
    if tuning["q16"]:   # the pooled queries stored in bfloat16: half the bytes of every query tile
        if precision != "bf16":
            raise ValueError("tuning q16 (bfloat16 pooled queries) needs precision='bf16'")
        qp = qp.to(torch.bfloat16)
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two >= 2")
    out = torch.empty(B, G, nqb, n, device=k.device, dtype=torch.float32)
    if n == 0:
        return out
    half = D // 2
    half_p = max(16, triton.next_power_of_2(half))
    block_m, block_c = tuning["block_m"], tuning["block_c"]
    m_tiles = triton.cdiv(R * hpk_p, block_m)
    p0, w0 = geo.p0.contiguous(), geo.w0.contiguous()
    qv = q_valid.view(torch.int8)                                 # bool bytes, read as int8
    exact = geo.exact_prune.view(torch.int8)
    inv_freq = (rope.inv_freq if rope is not None else torch.zeros(1, device=k.device)).to(k.device, torch.float32)
    scaling = rope.attention_scaling if rope is not None else 1.0
    k_scale = pages.k_scale if scaled else p0
    if scaled and k_scale.stride(-1) != 1:
        raise ValueError("k_scale must have unit stride on the kv heads")
    stride = pages.probe_stride if pages is not None else 0
    kp = pages.probes if stride else k
    if stride and (kp.dtype != k.dtype or kp.shape[0] != B or kp.shape[1] * stride < k.shape[1]
                   or kp.shape[2:] != k.shape[2:] or kp.stride(-1) != 1):
        raise ValueError(f"the probe copy {tuple(kp.shape)} {kp.dtype} must hold the keys {tuple(k.shape)} {k.dtype} "
                         f"at every multiple of {stride} (B, ceil(Tk / {stride}), K, D), unit stride on D")
    tiles = triton.cdiv(n, block_c) * B * G * nqb
    grid = (min(tiles, tuning.get("max_programs") or tiles),)
    iters = triton.cdiv(tiles, grid[0])
    opts = launch_options(qp.device)
    _score_chunks_kernel[grid](
        qp, qv, k, kp, k_scale, starts, out, p0, w0, exact, inv_freq, float(scaling),
        qp.stride(0), qp.stride(1), qp.stride(2), qp.stride(3),
        qv.stride(0), qv.stride(1), qv.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        kp.stride(0), kp.stride(1), kp.stride(2),
        starts.stride(0), starts.stride(1), starts.stride(2), starts.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        p0.stride(0),
        k_scale.stride(0) if scaled else 0, k_scale.stride(1) if scaled else 0,
        G, nqb, n, tiles, grid[0], ITERS=iters,
        SINK=config.sink, CHUNK=chunk, LEVELS=descent_levels(chunk, levels),
        KG=K // G, R=R, HPK=hpk, HPK_P=hpk_p, HALF=half, HALF_P=half_p,
        BLOCK_C=block_c, BLOCK_M=block_m, M_TILES=m_tiles, ROPE=rope is not None,
        DOT_PRECISION=precision, FAST=k.is_cuda,
        SCALED=scaled, PAGE=pages.page if pages is not None else 1, PROBE_STRIDE=stride,
        PDL=bool(opts), num_warps=tuning["num_warps"], **opts,
    )
    return out


def _launch_defaults(rows: int, n: int, precision: str, prefill: bool) -> dict:
    """Launch settings of ``score_chunks`` for ``rows`` query rows (pooled rows x the kv head's
    query heads, padded) and ``n`` chunks (``prefill``: several query blocks), measured with
    ``scripts/sweep_prune.py`` on an H200 (16K queries against 128K keys, sweep_prune_q16_h200.json).

    A level reloads every query tile per set of probes, and the kernel is bound by on-chip
    memory at 12.5% occupancy (247 registers a thread, Nsight Compute), so with bfloat16 operands
    the pooled queries are stored in bfloat16 (q16: half the tile bytes) and prefill's pooled
    stages (64 rows) take 32-row tiles: stage 0 3.4 -> 2.1 ms, stage 1 4.5 -> 2.7 ms. Prefill's last
    stage (stride 1: 256 rows, several tiles) wants more probes per tile load: 64 chunks a program,
    5.5 -> 4.6 ms with q16. Decode (one query block) keeps float32 pooled queries: its few rows
    are one small tile, and the cast would be a launch more in every refresh.
    float32 operands (tf32 for FP8 codes, tf32x3 for float32 keys) keep the settings they were
    measured with: 64-row tiles, 64 chunks where there are several tiles.
    """
    q16 = precision == "bf16" and prefill
    if q16:
        block_m, wide = (32, False) if rows <= 64 else (64, True)
    else:
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        wide = rows > block_m
    block_c = 64 if wide and n >= 64 else 32 if n >= 32 else 16
    return dict(q16=q16, block_m=block_m, block_c=block_c, num_warps=4)
