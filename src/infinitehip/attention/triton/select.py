"""Top-k chunk selection in one launch: the Triton ``reference.keep_top``.

torch's topk + gather + sort cost ~60 us per pruning stage in decode (a radix select, a radix
sort of the winners' scores, a radix sort of their positions and a few elementwise kernels),
more than the scoring itself. Here one program owns one row: it packs every score with its
index into one int64 key (an order-preserving integer image of the float in the high half,
the reversed index in the low half, so ties go to the earlier chunk), takes the top keys with
a bitonic ``tl.topk``, sorts the winners' indices ascending (``tl.sort``) and gathers their
starts: position order, no second pass. With a split it writes the next stage's candidates
directly (each kept chunk cut into SPLIT sub-chunks) instead of four more torch kernels.
From 1,024 candidates a radix-select variant selects the same chunks without sorting (faster
there, measured; ``tuning=dict(radix=...)`` overrides the choice for scripts/sweep_prune.py).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..mask import NEG_SCORE, SENTINEL
from .pdl import launch_options, release_next, wait_for_previous

_SENTINEL = tl.constexpr(SENTINEL)
# Rows longer than this take the torch path: one program holds the row, and the sort's shared
# memory (16 bytes per padded entry) must fit the SM: 16384 entries asked for 256 KiB on an H100
# (228 KiB there) and failed to launch in the 128x eval of the built-in model (stage 0 in chunks of 4).
MAX_ROW = 1 << 13


def _ordered(x: float) -> int:
    """The int32 that ``_ordered_bits`` maps float32 ``x`` to (host side, for thresholds)."""
    bits = struct.unpack("<i", struct.pack("<f", x))[0]
    return bits if bits >= 0 else bits ^ 0x7FFFFFFF


@triton.jit
def _ordered_bits(x):
    """float32 -> int32 with the same order (negative floats: flip the magnitude bits). -0.0 is
    +0.0 first: they tie in the reference's sort, so the earlier chunk must win."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _keep_top_kernel(
    scores_ptr, starts_ptr, out_ptr,
    stride_s, stride_st, stride_o,          # row strides; unit stride along each row
    N, M, ACTIVE_ABOVE,
    N_P: tl.constexpr, K_P: tl.constexpr, PAD_P: tl.constexpr, SPLIT: tl.constexpr, SUB: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, N_P)
    s = tl.load(scores_ptr + row * stride_s + i, mask=i < N, other=float("-inf"))
    key = (_ordered_bits(s).to(tl.int64) << 32) | (N_P - 1 - i).to(tl.int64)
    top = tl.topk(key, K_P)                                                  # (K_P,) best first
    rank = tl.arange(0, K_P)
    chosen = (rank < M) & ((top >> 32).to(tl.int32) > ACTIVE_ABOVE)        # not NEG_SCORE
    idx = tl.where(chosen, N_P - 1 - (top & 0xFFFFFFFF).to(tl.int32), N_P)  # N_P: not chosen
    idx = tl.sort(idx)                                                       # position order
    kept = tl.load(starts_ptr + row * stride_st + idx, mask=idx < N, other=_SENTINEL).to(tl.int64)
    # Kept chunk r becomes out[r * SPLIT + j] = its start + j * SUB (SPLIT = 1: itself).
    j = tl.arange(0, SPLIT)
    sub = tl.where(kept[:, None] == _SENTINEL, _SENTINEL, kept[:, None] + j[None, :] * SUB)   # (K_P, SPLIT)
    o = rank[:, None] * SPLIT + j[None, :]
    tl.store(out_ptr + row * stride_o + o, sub.to(out_ptr.dtype.element_ty), mask=o < M * SPLIT)
    # Rows shorter than M: the rest of the row is padding.
    pad = K_P * SPLIT + tl.arange(0, PAD_P)
    tl.store(out_ptr + row * stride_o + pad, tl.full((PAD_P,), _SENTINEL, out_ptr.dtype.element_ty),
             mask=pad < M * SPLIT)


@triton.jit
def _keep_top_radix_kernel(
    scores_ptr, starts_ptr, out_ptr,
    stride_s, stride_st, stride_o,          # row strides; unit stride along each row
    N, M, ACTIVE_ABOVE,
    N_P: tl.constexpr, OUT_P: tl.constexpr, SPLIT: tl.constexpr, SUB: tl.constexpr,
    PDL: tl.constexpr,
):
    """``_keep_top_kernel``'s selection without sorting (the default from 1,024 candidates): a
    radix select finds the M-th best score a byte at a time (four histograms of 256 bins), ties at
    it go to the earlier chunks (a cumulative count), and a cumulative count of the chosen gives
    each its place in position order. Bitonic top-k and sort take ~55 and ~28 compare-exchange
    rounds."""
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, N_P)
    valid = i < N
    s = tl.load(scores_ptr + row * stride_s + i, mask=valid, other=float("-inf"))
    o = _ordered_bits(s)                          # int32, same order as the scores
    u = o ^ (-2147483648)                         # sign bit flipped: unsigned byte order = score order
    bins = tl.arange(0, 256)
    cand = valid                                  # still tied with the M-th best on the bytes so far
    taken = i < 0                                 # strictly better than the M-th best
    need = M                                      # how many of ``cand`` are still to be taken
    # Settled: every candidate left is to be taken, or none is, so the lower bytes cannot change
    # the choice. After 2 of the 4 bytes about a third of the rows are, after 3 nearly all
    # (1,024 normal scores, 256 kept): a round less, or two, per row.
    settled = need == 0
    for shift in tl.static_range(24, -1, -8):
        if not settled:
            digit = (u >> shift) & 0xFF
            hist = tl.histogram(digit, 256, mask=cand)                     # (256,)
            at_least = tl.cumsum(hist, 0, reverse=True)                    # cands with digit >= bin
            best = tl.max(tl.where(at_least >= need, bins, 0), axis=0)      # the M-th best's digit
            above = tl.sum(tl.where(bins == best, at_least - hist, 0), axis=0)
            tied = tl.sum(tl.where(bins == best, hist, 0), axis=0)          # cands left after this byte
            taken = taken | (cand & (digit > best))
            need = need - above
            cand = cand & (digit == best)
            settled = (need == 0) | (need == tied)
    ties = tl.cumsum(cand.to(tl.int32), 0)                                 # earlier chunks first
    chosen = (taken | (cand & (ties <= need))) & (o > ACTIVE_ABOVE)
    rank = tl.cumsum(chosen.to(tl.int32), 0) - 1                           # position order
    kept = tl.load(starts_ptr + row * stride_st + i, mask=chosen, other=0).to(tl.int64)
    j = tl.arange(0, SPLIT)
    o_off = rank[:, None] * SPLIT + j[None, :]
    tl.store(out_ptr + row * stride_o + o_off, (kept[:, None] + j[None, :] * SUB).to(out_ptr.dtype.element_ty),
             mask=chosen[:, None])
    pad = tl.arange(0, OUT_P)                                              # the rest: no chunk
    n_out = tl.sum(chosen.to(tl.int32), axis=0) * SPLIT
    tl.store(out_ptr + row * stride_o + pad, tl.full((OUT_P,), _SENTINEL, out_ptr.dtype.element_ty),
             mask=(pad >= n_out) & (pad < M * SPLIT))


def keep_top(starts: torch.Tensor, scores: torch.Tensor, m: int, split: tuple[int, int] | None = None, *,
             tuning: dict | None = None) -> torch.Tensor:
    """Triton ``reference.keep_top``: starts (..., n) int, scores (..., n) float32 -> (..., m) in
    starts' dtype, or with ``split`` (chunk, sub) the next stage's candidates (..., m * chunk // sub).
    tuning: launch overrides (num_warps, radix) for scripts/sweep_prune.py."""
    from .. import reference

    n = scores.shape[-1]
    if n == 0 or n > MAX_ROW:
        return reference.keep_top(starts, scores, m, split)
    chunk, sub = split or (1, 1)
    f = chunk // sub
    lead = scores.shape[:-1]
    s2, st2 = scores.reshape(-1, n), starts.reshape(-1, n)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    if st2.stride(-1) != 1:
        st2 = st2.contiguous()
    out = torch.empty(s2.shape[0], m * f, dtype=starts.dtype, device=scores.device)
    tuning = tuning or {}
    n_p = triton.next_power_of_2(n)
    args = (s2, st2, out, s2.stride(0), st2.stride(0), out.stride(0), n, m, _ordered(NEG_SCORE / 2))
    num_warps = tuning.get("num_warps", max(4, min(16, n_p // 256)))
    opts = launch_options(scores.device)
    # Radix select from 1,024 candidates (stages 1-2 of the paper preset), measured on an H200
    # (scripts/sweep_prune.py, sweep_keep_top_h200.json, 4 warps): decode 12.8 -> 11.7 us, a
    # 16K-query prefill chunk 95 -> 58 us; from 512 (stage 0) the bitonic top-k: 8.4 vs 9.9 us.
    if tuning.get("radix", n_p >= 1024):
        _keep_top_radix_kernel[(s2.shape[0],)](*args, N_P=n_p, OUT_P=triton.next_power_of_2(m * f), SPLIT=f,
                                               SUB=sub, PDL=bool(opts), num_warps=num_warps, **opts)
    else:
        # At least 2: tl.topk(x, 1) reduces its hypercube to a scalar and fails to build (interpreter
        # and GPU alike), and one kept chunk is legal (a budget or stage budget of one chunk).
        k_p = min(max(2, triton.next_power_of_2(m)), n_p)
        _keep_top_kernel[(s2.shape[0],)](*args, N_P=n_p, K_P=k_p, SPLIT=f, SUB=sub, PDL=bool(opts), num_warps=num_warps,
                                         **opts,
                                         PAD_P=max(1, triton.next_power_of_2(max((m - k_p) * f, 1))))
    return out.view(*lead, m * f)
