"""Flash-decoding: the split-K partial outputs of ``bsa._bsa_kernel`` merged in the same launch.

Each split of the slot list writes an output normalized over its own keys and its log2-sum-exp,
then counts itself in the arrival counter of its (batch row, kv head). The split that arrives
last merges them all (weight of split i: 2^(lse_i - max lse); a split that saw no valid key has
lse = -inf and weight 0) and resets the counter to zero. The merge reads the splits in index
order whichever split arrived last, so results are deterministic.

Why in the same launch: a separate merge kernel cost ~2.7 us plus a ~3 us dependency gap in a
CUDA graph (H100, 128K keys), a quarter of a decode step that reuses its mask.

The counters live in one zeroed buffer per device that every merge leaves zeroed, so a CUDA
graph replays without a memset. The split-K GEMV (``models/gemv.py``) and greedy decoding's
argmax (``models/fused.py``) count in it too. That assumes these launches of one device do not
run concurrently (one decode stream, as the engine and the benchmarks run them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Arrival counters cached per device (int32, 256 KB); a launch that needs more gets its own.
COUNTER_SLOTS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters that the merge leaves zeroed.

    The cached buffer is made outside CUDA graph capture only (during capture nothing runs, so
    it would hold garbage until the first replay); a capture without an eager call before it
    gets a fresh buffer, whose zeroing the graph then replays (one memset).
    """
    buf = _COUNTERS.get(device)
    if buf is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        buf = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    if buf is not None and buf.numel() >= n:
        return buf
    return torch.zeros(n, dtype=torch.int32, device=device)


@triton.jit
def arrive_and_merge(count_ptr, slot, part_ptr, lse_ptr, out_ptr, part_row, lse_row, out_row, row_ok,
                     stride_ps, NSPLIT, HALF: tl.constexpr, HALF_P: tl.constexpr, MERGE_M: tl.constexpr,
                     NSPLIT_P: tl.constexpr, SPLIT_TILE: tl.constexpr):
    """Count this split in; the last of the NSPLIT splits of counter ``slot`` merges their
    partials into ``out`` and resets the counter.

    part_row / lse_row / out_row (MERGE_M,) int64: each merged row's split-0 partial offset (in
    partials (..., NSPLIT, D) float32), split-0 lse offset (unit stride over splits) and output
    offset (unit stride over D); row_ok (MERGE_M,) masks rows that are not real queries.
    """
    # Every thread's partial stores happen before the arrival is counted (the barrier), and the
    # release/acquire atomic makes them visible to the merging program on another multiprocessor.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
    if arrived == NSPLIT - 1:
        d = tl.arange(0, HALF_P)
        o1 = tl.zeros((MERGE_M, HALF_P), tl.float32)
        o2 = tl.zeros((MERGE_M, HALF_P), tl.float32)
        w_sum = tl.zeros((MERGE_M,), tl.float32)
        top = tl.full((MERGE_M,), float("-inf"), tl.float32)
        # SPLIT_TILE splits per load, merged online (a running max of the lse, the sums rescaled when
        # it grows): one memory round trip per tile and no pass over the lse first. A loop over the
        # constexpr bound (tiles past NSPLIT load nothing), not unrolled: unrolled, the compiler
        # hoists every tile's loads and spills.
        for s0 in range(0, NSPLIT_P, SPLIT_TILE):
            s = s0 + tl.arange(0, SPLIT_TILE)
            ok = row_ok[:, None] & (s[None, :] < NSPLIT)                                # (MERGE_M, SPLIT_TILE)
            lse = tl.load(lse_ptr + lse_row[:, None] + s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
            off = part_row[:, None, None] + s[None, :, None] * stride_ps + d[None, None, :]
            ld = ok[:, :, None] & (d < HALF)[None, None, :]
            p1 = tl.load(part_ptr + off, mask=ld, other=0.0, cache_modifier=".cg")     # (MERGE_M, SPLIT_TILE, HALF_P)
            p2 = tl.load(part_ptr + off + HALF, mask=ld, other=0.0, cache_modifier=".cg")
            new_top = tl.maximum(top, tl.max(lse, axis=1))
            ref = tl.where(new_top > float("-inf"), new_top, 0.0)    # no split with a key yet: weights 0
            scale = tl.math.exp2(tl.where(top > float("-inf"), top, ref) - ref)
            w = tl.math.exp2(lse - ref[:, None])
            o1 = o1 * scale[:, None] + tl.sum(p1 * w[:, :, None], axis=1)
            o2 = o2 * scale[:, None] + tl.sum(p2 * w[:, :, None], axis=1)
            w_sum = w_sum * scale + tl.sum(w, axis=1)
            top = new_top
        w_sum = tl.where(w_sum > 0, w_sum, 1.0)
        o_off = out_row[:, None] + d[None, :]
        o_mask = row_ok[:, None] & (d < HALF)[None, :]
        tl.store(out_ptr + o_off, (o1 / w_sum[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        tl.store(out_ptr + o_off + HALF, (o2 / w_sum[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        tl.atomic_xchg(count_ptr + slot, 0)      # zero again for the next launch (or graph replay)


def split_tile(merge_rows: int, nsplit_p: int, half_p: int) -> int:
    """Splits merged per load: about 4096 partial elements per half (32 registers a thread at
    4 warps); a power of two, so it divides ``nsplit_p``."""
    return max(1, min(nsplit_p, 4096 // (merge_rows * half_p)))
