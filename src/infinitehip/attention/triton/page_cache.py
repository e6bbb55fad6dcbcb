"""The GPU page cache's kernels (``cache/gpu_pages.py``): its fetch plan in one launch, and the
masked copy of the missed units (one page of one kv head) from the KV store into the pools.

**Plan** (``plan_fetch_cuda``): ``gpu_pages.plan_fetch`` state for state, in one program: a
few thousand entries are too few to fill a GPU, and in PyTorch the same steps are ~30 launches
(sorts, scans, gathers, scatters) per layer per decode step (a refresh's: the steps that reuse a
mask plan nothing, ``offload_kv.needed_units``). A plan of no entry (all -1) only advances the
step. What replaces the sorts:

- dedupe: each absent unit's table entry takes the smallest marker ``-(2^30 - entry)`` of its
  entries (``atomic_min``), so its first entry alone finds its own marker; a resident unit's
  slot stamp is swapped for this step's (``atomic_xchg``), and only the entry that saw the old
  stamp counts the hit;
- victims: the n_miss smallest (stamp, slot) keys, found by bisecting the stamp value T with
  n_miss slots stamped <= T, then the first of those stamped T in slot order; a scan ranks them.

**Copy** (``copy_units_cuda``): the plan lists its misses compactly with their count on the
device; a few programs per multiprocessor loop over the copies below that count (a step without
misses costs one launch of programs that each read the count), so hits cost nothing (a torch gather of the needed
units would read every one of them over PCIe, its index having a static shape). A unit is
``page`` rows of D contiguous elements, K * D apart in the store. FP8 stores are decoded on the
way (code x the unit's scale, in float32, then the pool's dtype: what ``offload.fp8_decode``
computes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import SENTINEL, lookahead, window_slots
from .ops import num_sms
from .pdl import launch_options, release_next, wait_for_previous

BLOCK = 1024
# Copy programs per multiprocessor: each keeps one unit's K and V loads in flight over PCIe (its
# copies one after another), so ~500 of them overlap ~1 MB of reads; more only wait on the link.
COPY_PROGRAMS_PER_SM = 4
_MARKER = tl.constexpr(1 << 30)      # > any entry count: markers -(2^30 - i) are below -1
_SENTINEL_I = tl.constexpr(SENTINEL)


@triton.jit
def _plan_kernel(flat_ptr, slot_of_ptr, owner_ptr, stamp_ptr, step_ptr, counts_ptr, rank_ptr, src_ptr,
                 dst_ptr, n_ptr, M, S, NUM_UNITS, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    # Every thread holds these scalars: they are stored back only after a barrier, else a warp
    # that runs late would read a value another warp already advanced (step twice, counts twice).
    step = tl.load(step_ptr) + 1
    n_miss = tl.full((), 0, tl.int32)
    i = tl.arange(0, BLOCK_M)
    page = tl.load(flat_ptr + i, mask=i < M, other=-1)                             # (BLOCK_M,) int64
    if tl.max(page, axis=0) >= 0:  # else no entry (all -1): only the step advances
        n_miss = _plan(page, page >= 0, step, slot_of_ptr, owner_ptr, stamp_ptr, counts_ptr, rank_ptr, src_ptr,
                       dst_ptr, S, NUM_UNITS, BLOCK_M, BLOCK_S)
    tl.debug_barrier()
    tl.store(step_ptr, step)
    tl.store(n_ptr, n_miss)


@triton.jit
def _plan(page, valid, step, slot_of_ptr, owner_ptr, stamp_ptr, counts_ptr, rank_ptr, src_ptr, dst_ptr, S, NUM_UNITS,
          BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """The plan of entries ``page`` (BLOCK_M,): state updated, the misses' (unit, slot) written
    in entry order to src/dst; returns their count."""
    i = tl.arange(0, BLOCK_M)
    pg = tl.where(valid, page, NUM_UNITS)                                         # NUM_UNITS: the dump entry
    n_hit, n_missed, n_gone = tl.load(counts_ptr), tl.load(counts_ptr + 1), tl.load(counts_ptr + 2)
    cur = tl.load(slot_of_ptr + pg, mask=valid, other=0)                          # int32, -1 = absent
    # Dedupe. Absent pages: the first entry's marker wins. Resident: the first swap sees an old stamp.
    marker = -(_MARKER - i)
    absent = valid & (cur < 0)
    tl.atomic_min(slot_of_ptr + pg, marker, mask=absent)
    old = tl.atomic_xchg(stamp_ptr + cur, step, mask=valid & (cur >= 0))
    hit = valid & (cur >= 0) & (old != step)
    tl.debug_barrier()
    miss = absent & (tl.load(slot_of_ptr + pg, mask=absent, other=0, volatile=True) == marker)
    n_miss = tl.sum(miss.to(tl.int32), axis=0)
    # Victims: the n_miss slots of smallest (stamp, index). Bisect the stamp T: n_miss of them <= T.
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    st = tl.load(stamp_ptr + s, mask=s_ok, other=0, volatile=True)               # hits restamped above
    lo = tl.full((), -1, tl.int64)
    hi = tl.where(n_miss > 0, step, lo)                                           # no miss: nothing to bisect
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if tl.sum((s_ok & (st <= mid)).to(tl.int32), axis=0) >= n_miss:
            hi = mid
        else:
            lo = mid + 1
    below = s_ok & (st < lo)
    at = s_ok & (st == lo)
    take = n_miss - tl.sum(below.to(tl.int32), axis=0)
    victim = below | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= take))
    tl.store(rank_ptr + tl.cumsum(victim.to(tl.int32), axis=0) - 1, s, mask=victim)   # [r] = r-th victim
    tl.debug_barrier()
    rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
    dst = tl.where(miss, tl.load(rank_ptr + rank, mask=miss, other=0, volatile=True), S)   # S: scratch
    evicted = tl.load(owner_ptr + dst, mask=miss, other=-1)
    gone = miss & (evicted >= 0)
    tl.store(slot_of_ptr + evicted, -1, mask=gone)
    tl.store(owner_ptr + dst, page, mask=miss)
    tl.store(stamp_ptr + dst, step, mask=miss)
    tl.store(slot_of_ptr + pg, dst.to(tl.int32), mask=miss)
    tl.store(src_ptr + rank, page, mask=miss)                                     # the copies, compact
    tl.store(dst_ptr + rank, dst, mask=miss)
    tl.debug_barrier()
    tl.store(counts_ptr, n_hit + tl.sum(hit.to(tl.int64), axis=0))
    tl.store(counts_ptr + 1, n_missed + n_miss)
    tl.store(counts_ptr + 2, n_gone + tl.sum(gone.to(tl.int64), axis=0))
    return n_miss


def plan_fetch_cuda(cache, flat: torch.Tensor):
    """``gpu_pages.plan_fetch(cache, flat)`` in one launch: the same state and copies (src,
    dst, n), except that src and dst past the n copies are left unwritten."""
    m, dev = flat.numel(), flat.device
    src = torch.empty(m, dtype=torch.long, device=dev)
    dst = torch.empty(m, dtype=torch.long, device=dev)
    n = torch.empty(1, dtype=torch.int32, device=dev)
    rank = torch.empty(max(m, 1), dtype=torch.long, device=dev)
    opts = launch_options(dev)
    _plan_kernel[(1,)](flat.contiguous(), cache.slot_of, cache.owner,
                       cache.stamp, cache.step, cache.counts, rank, src, dst, n, m, cache.n_slots, cache.num_units,
                       BLOCK_M=triton.next_power_of_2(max(m, 2)),
                       BLOCK_S=triton.next_power_of_2(max(cache.n_slots, 2)), PDL=bool(opts), num_warps=16, **opts)
    return src, dst, n


@triton.jit
def _load_unit(src_ptr, scale_ptr, p, h, e, m, do, PAGE: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
               SCALED: tl.constexpr):
    """Elements e (flat over (page, D)) of page p, kv head h of src_ptr (pages, page, K, D), decoded, float32."""
    x = tl.load(src_ptr + (p * PAGE + e // D) * (K * D) + h * D + e % D, mask=m, other=0.0).to(tl.float32)
    if SCALED:      # scale (pages, 1, K, 1): one per (page, kv head)
        x = x * tl.load(scale_ptr + p * K + h, mask=do, other=1.0)
    return x


@triton.jit
def _copy_kernel(k_src_ptr, k_scale_ptr, v_src_ptr, v_scale_ptr, k_dst_ptr, v_dst_ptr, src_idx_ptr, dst_idx_ptr,
                 n_ptr, PAGE: tl.constexpr, K: tl.constexpr, D: tl.constexpr, SCALED: tl.constexpr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    # Copies i = program, program + programs, ... below the plan's n: a step without misses
    # launches a few hundred programs that each load n, not one program per possible copy.
    n = tl.load(n_ptr)
    i = tl.program_id(0)
    while i < n:                   # copy i: its unit's K and V (a while: the interpreter's range wants ints)
        unit = tl.load(src_idx_ptr + i).to(tl.int64)
        dst = tl.load(dst_idx_ptr + i).to(tl.int64)
        p = unit // K
        h = unit % K
        do = unit >= 0
        for start in range(0, PAGE * D, BLOCK):
            e = start + tl.arange(0, BLOCK)
            m = (e < PAGE * D) & do
            # Both loads before either store: two PCIe round trips in flight, not one after the other.
            k = _load_unit(k_src_ptr, k_scale_ptr, p, h, e, m, do, PAGE, K, D, SCALED)
            v = _load_unit(v_src_ptr, v_scale_ptr, p, h, e, m, do, PAGE, K, D, SCALED)
            out = dst * (PAGE * D) + e
            tl.store(k_dst_ptr + out, k.to(k_dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
            tl.store(v_dst_ptr + out, v.to(v_dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)
        i += tl.num_programs(0)


def copy_units_cuda(k_src: torch.Tensor, k_scale: torch.Tensor | None, v_src: torch.Tensor,
                    v_scale: torch.Tensor | None, k_dst: torch.Tensor, v_dst: torch.Tensor, src_idx: torch.Tensor,
                    dst_idx: torch.Tensor, n: torch.Tensor, programs: int | None = None):
    """k_dst[dst_idx[i]], v_dst[dst_idx[i]] = decode(unit src_idx[i] of k_src / v_src) for i < n[0],
    in one launch of ``programs`` programs (default: a few per multiprocessor on a GPU), each
    taking every programs-th copy below n: nothing past n is loaded. Stores (pages, page, K, D)
    contiguous, pools (slots, page, 1, D); indices (M,) and n (1,) on the pools' device; scales
    None for a store that is not FP8."""
    _, page, K, D = k_src.shape
    scaled = k_scale is not None
    if programs is None:
        programs = src_idx.numel()
        if k_dst.is_cuda:
            programs = min(programs, COPY_PROGRAMS_PER_SM * num_sms(k_dst.device.index or 0))
    opts = launch_options(k_dst.device)
    _copy_kernel[(max(1, programs),)](k_src, k_scale if scaled else k_dst, v_src, v_scale if scaled else v_dst, k_dst,
                                     v_dst, src_idx, dst_idx, n, page, K, D, SCALED=scaled,
                                     BLOCK=min(BLOCK, triton.next_power_of_2(page * D)), PDL=bool(opts), **opts)


@triton.jit
def _unit(page, h, ok, row, nb, K: tl.constexpr, LIMIT: tl.constexpr):
    """The store's global unit of (page, kv head h) of row ``row``, -1 where not ok."""
    inside = ok & (page >= 0)
    if LIMIT:
        inside = inside & (page < nb)
        unit = (row * nb + page) * K + h
    else:
        unit = page * K + h
    return tl.where(inside, unit, -1)


@triton.jit
def _needed_kernel(starts_ptr, w0_ptr, qpos_ptr, qvalid_ptr, out_ptr, row0, nb,
                   stride_sb, stride_sg, stride_sq,                 # starts (B, G, NQB, NSEL), unit stride on NSEL
                   SINK: tl.constexpr, PAGE: tl.constexpr, K: tl.constexpr, KG: tl.constexpr, NQB: tl.constexpr,
                   BQ: tl.constexpr, NSEL: tl.constexpr, PER: tl.constexpr, NS: tl.constexpr, NW: tl.constexpr,
                   N_SEL: tl.constexpr, M: tl.constexpr, LIMIT: tl.constexpr, AHEAD: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)   # PDL: nothing before this reads or writes what earlier kernels touch
    release_next(PDL)
    b = tl.program_id(0)
    row = (row0 + b).to(tl.int64)
    out = out_ptr + b.to(tl.int64) * M
    _needed(starts_ptr, w0_ptr, qpos_ptr, qvalid_ptr, out, b, row, nb, stride_sb, stride_sg, stride_sq, SINK, PAGE,
            K, KG, NQB, BQ, NSEL, PER, NS, NW, N_SEL, LIMIT, AHEAD, BLOCK)


@triton.jit
def _needed(starts_ptr, w0_ptr, qpos_ptr, qvalid_ptr, out, b, row, nb, stride_sb, stride_sg, stride_sq,
            SINK: tl.constexpr, PAGE: tl.constexpr, K: tl.constexpr, KG: tl.constexpr, NQB: tl.constexpr,
            BQ: tl.constexpr, NSEL: tl.constexpr, PER: tl.constexpr, NS: tl.constexpr, NW: tl.constexpr,
            N_SEL: tl.constexpr, LIMIT: tl.constexpr, AHEAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row b's units into ``out`` (M,): sink, window per query block (AHEAD tokens past its last
    query), each group's selected chunks."""
    for start in range(0, NS * K, BLOCK):                          # every head's sink pages
        e = start + tl.arange(0, BLOCK)
        tl.store(out + e, _unit((e // K).to(tl.int64), e % K, e >= 0, row, nb, K, LIMIT), mask=e < NS * K)
    r = tl.arange(0, BQ)
    for qb in tl.static_range(NQB):                                 # every head's window pages, per block
        q_pos = tl.load(qpos_ptr + (b * NQB + qb) * BQ + r)
        valid = tl.load(qvalid_ptr + (b * NQB + qb) * BQ + r) != 0
        last = tl.max(tl.where(valid, q_pos, -1), axis=0)
        last_page = tl.where(last >= 0, (last + AHEAD) // PAGE, -1)
        first = tl.maximum(tl.load(w0_ptr + b * NQB + qb), SINK) // PAGE
        for start in range(0, NW * K, BLOCK):
            e = start + tl.arange(0, BLOCK)
            page = first + e // K
            unit = _unit(page, e % K, page <= last_page, row, nb, K, LIMIT)
            tl.store(out + NS * K + qb * NW * K + e, unit, mask=e < NW * K)
    for start in range(0, N_SEL, BLOCK):                            # each group's chunks, its heads
        e = start + tl.arange(0, BLOCK)
        kk = e % KG
        p = (e // KG) % PER
        n = (e // (KG * PER)) % NSEL
        qi = (e // (KG * PER * NSEL)) % NQB                          # not `qb`: the loop above made it a constexpr
        g = e // (KG * PER * NSEL * NQB)
        st = tl.load(starts_ptr + b.to(tl.int64) * stride_sb + g * stride_sg + qi * stride_sq + n,
                     mask=e < N_SEL, other=_SENTINEL_I).to(tl.int64)
        unit = _unit(tl.where(st >= 0, st // PAGE, 0) + p, g * KG + kk, st != _SENTINEL_I, row, nb, K, LIMIT)
        tl.store(out + NS * K + NQB * NW * K + e, unit, mask=e < N_SEL)


def needed_units_cuda(starts: torch.Tensor, geo, config, page: int, K: int, row0: int = 0, nb: int | None = None):
    """``offload_kv.needed_units`` in one launch: the same (B, M) units, in the same order."""
    B, G, nqb, nsel = starts.shape
    per = max(1, config.chunk_size // page)
    ns, nw = -(-config.sink // page), -(-window_slots(config) // page) + 1
    n_sel = G * nqb * nsel * per * (K // G)
    m = ns * K + nqb * nw * K + n_sel
    out = torch.empty(B, m, dtype=torch.long, device=starts.device)
    starts = starts if starts.stride(-1) == 1 else starts.contiguous()
    q_valid = geo.q_valid.contiguous().view(torch.int8)
    opts = launch_options(out.device)
    _needed_kernel[(B,)](starts, geo.w0.contiguous(), geo.q_pos.contiguous(), q_valid, out, row0, nb or 0,
                         starts.stride(0), starts.stride(1), starts.stride(2),
                         SINK=config.sink, PAGE=page, K=K, KG=K // G, NQB=nqb, BQ=geo.q_pos.shape[-1], NSEL=nsel,
                         PER=per, NS=ns, NW=nw, N_SEL=n_sel, M=m, LIMIT=nb is not None, AHEAD=lookahead(config),
                         BLOCK=BLOCK, PDL=bool(opts), **opts)
    return out
