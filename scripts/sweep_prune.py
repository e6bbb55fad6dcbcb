"""Launch settings of the kernels (GPU): time ``score_chunks`` per stage over a grid of tile
sizes, warps, dot precisions and query storage (q16), at decode (1 query) and prefill (a
16K-query chunk); and the prefill attention kernel over tile rows, warps and pipeline stages.

    python scripts/sweep_prune.py --decode 1M --prefill 128K --out sweep_prune.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
import triton.testing

from infinitehip.attention.mask import geometry
from infinitehip.attention.rope import RoPE
from infinitehip.attention.reference import pool_queries
from infinitehip.attention.stages import first_stage_starts, run_stages
from infinitehip.attention.triton import ops
from infinitehip.bench import parse_contexts
from infinitehip.config import HiPConfig

H, K, D = 32, 8, 128
# Measured 2026-11-25 (H100, decode 1M stage 0): tf32 3.3x faster than tf32x3, ieee slowest;
# 32 chunks x 4 warps best of block_c 16/32 x warps 2/4/8. Each setting compiles once (~5 s).
# Measured 2026-11-29 (H200, sweep_prune_h200.json): 4 warps best everywhere in prefill, 16 chunks
# never best; bf16 operands (16-bit q tiles) are a candidate for the query-tile-bound prefill stages.
# Measured 2026-11-29 (H200, sweep_prune_paired_h200.json): bf16 operands best in every prefill stage
# (4.4/5.4/6.8 -> 3.4/4.5/5.5 ms), dense scoring never; Nsight Compute: 247 registers a thread,
# 12.5% occupancy. Measured 2026-11-29 (H200, sweep_prune_q16_h200.json, this grid): bfloat16 pooled
# queries (q16) best in every stage, 32-row tiles in the pooled stages, 8 warps never best: stages
# 3.4/4.5/5.5 -> 2.1/2.7/4.6 ms, now prune._launch_defaults. The old defaults first.
GRID = dict(block_c=(32, 64), block_m=(64, 32), num_warps=(4, 8), precision=("bf16",), q16=(False, True))


def _inputs(tq: int, tk: int, cfg: HiPConfig, rope: RoPE, g):
    """Random bf16 queries (1, tq) and keys (1, tk) at Llama-3-8B's head shape, their geometry and mask."""
    q = torch.randn(1, tq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, tk, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_len = torch.tensor([tk], device="cuda")
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    return q, k, geo, run_stages(q, k, geo, cfg, rope, ops.score_chunks, keep_top=ops.keep_top)


def sweep(tq: int, tk: int, cfg: HiPConfig, rope: RoPE, g, limit: int | None = None) -> list[dict]:
    """score_chunks per stage over GRID (its first ``limit`` settings), then the prefill attend grid."""
    q, k, geo, mask = _inputs(tq, tk, cfg, rope, g)
    out = []
    for s in range(cfg.n_stages):
        qp, qv = pool_queries(q, geo, cfg.stage_strides[s], rope)
        starts = (first_stage_starts(tk, cfg.chunk_sizes[0], *mask.starts.shape[:3], k.device) if s == 0
                  else mask.stage_inputs[s].long())
        for values in itertools.islice(itertools.product(*GRID.values()), limit):
            tuning = dict(zip(GRID, values))
            fn = lambda: ops.score_chunks(qp, qv, k, starts, cfg.chunk_sizes[s], geo, cfg, rope, tuning=tuning)  # noqa: E731
            try:
                # A decode stage runs for microseconds, less than a Python launch takes: as a graph.
                ms = time_graph(fn) if tq == 1 else triton.testing.do_bench(fn, warmup=5, rep=30,
                                                                            return_mode="median")
            except Exception as e:   # a setting that does not compile
                ms = None
                print(f"  {tuning}: {str(e).splitlines()[0][:80]}")
            out.append(dict(tq=tq, tk=tk, stage=s, **tuning, ms=ms))
            print(out[-1], flush=True)
    if tq > 1 and limit is None:
        out += sweep_attend(q, k, mask, geo, cfg, rope)
    return out


def sweep_attend(q, k, mask, geo, cfg, rope) -> list[dict]:
    out = []
    for bm, nw, ns in itertools.product((64, 128), (4, 8), (2, 3)):
        tuning = dict(block_m=bm, num_warps=nw, num_stages=ns)
        fn = lambda: ops.attend(q, k, k, mask.starts, geo, cfg, rope, D ** -0.5, tuning=tuning)  # noqa: E731
        try:
            ms = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
        except Exception as e:
            ms = None
            print(f"  {tuning}: {str(e).splitlines()[0][:80]}")
        out.append(dict(kind="attend", tq=q.shape[1], tk=k.shape[1], **tuning, ms=ms))
        print(out[-1], flush=True)
    return out


def time_graph(fn) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph, as the engine runs decode (a Python launch of
    a Triton kernel takes longer than these kernels run)."""
    graph = torch.cuda.CUDAGraph()
    fn()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def sweep_reuse(tk: int, cfg: HiPConfig, rope: RoPE, g, limit: int | None = None) -> list[dict]:
    """A decode step that reuses its mask (one launch): tiles, warps and split count."""
    q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, tk, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, tk, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_len = torch.tensor([tk], device="cuda")
    mask = run_stages(q, k, geometry(kv_len - 1, 1, kv_len, cfg), cfg, rope, ops.score_chunks, keep_top=ops.keep_top)
    out = []
    # Until 2026-11-30 this sweep passed k as the values too: V's loads then hit what K's brought
    # into L2, ~2 us faster than the bench's step with its own values (17.0 vs 19.0 us at 128K).
    # Measured 2026-11-29 (H200, sweep_reuse_h200.json): the defaults (64, 2, 4) 17.4 us, best of the
    # grid; issuing V's loads with K's (a variant since removed) changed nothing (17.8 us).
    # Nsight Compute saw 0.55 waves of 2-warp programs, one 64-key tile each (53 splits at 128K)
    # and a last-arriving program merging all of them, so larger tiles (fewer splits to merge) and
    # more programs per SM joined the grid. Measured 2026-11-29 (H200, sweep_keep_top_h200.json):
    # the defaults 17.0 us, still the best; 128-key tiles 18.6 at best, 8 programs per SM 17.0.
    # 2026-11-30 (sweep_reuse_refs_h200.json, distinct values): the defaults 18.2 us, best again;
    # V issued with K (v_early) 19.8 at best, removed. 2026-11-30 (sweep_reuse_prefetch_h200.json):
    # V's rows bulk-prefetched into L2 with K's loads (no registers) 19.8 us against 18.7, 24.2 at 4
    # warps: removed; PDL off 19.0 (a lone launch has no predecessor to overlap). 2026-12-01
    # (sweep_merge_dtype_h200.json): the merge's partials in bfloat16 (half its bytes) 23.7 us against
    # 18.8, 8 or 32 splits per merge load instead of 16: 21.0 / 20.8 -- not kept.
    grid = [(bn, nw, pps, {}) for bn, nw, pps in itertools.product((64, 32, 128), (2, 4), (4, 2, 8))]
    grid[1:1] = [(64, 2, 4, dict(pdl=False))]
    for bn, nw, pps, extra in itertools.islice(grid, limit):
        tuning = dict(block_n=bn, num_warps=nw, programs_per_sm=pps, **extra)
        fn = lambda: ops.attend_reused(q, k, v, mask, kv_len, cfg, rope, D ** -0.5, tuning=tuning)  # noqa: E731
        try:
            ms = time_graph(fn)
        except Exception as e:
            ms = None
            print(f"  {tuning}: {str(e).splitlines()[0][:80]}")
        out.append(dict(kind="reuse", tq=1, tk=tk, **tuning, ms=ms))
        print(out[-1], flush=True)
    return out + reuse_diagnostics(q, k, v, mask, kv_len, cfg, rope) + reuse_references(q, k, mask, cfg)


def reuse_diagnostics(q, k, v, mask, kv_len, cfg: HiPConfig, rope: RoPE) -> list[dict]:
    """Where the reuse step's time goes above dense decode over as many contiguous keys: the
    default launch with and without rotating the keys (rope=None), over the mask's selected chunks
    and over as many chunks laid end to end after the sink (the same slots, contiguous rows)."""
    n_sel = mask.starts.shape[-1]
    packed = cfg.sink + cfg.chunk_size * torch.arange(n_sel, device=q.device, dtype=mask.starts.dtype)
    contiguous = dataclasses.replace(mask, starts=packed.expand_as(mask.starts).contiguous())
    out = []
    for (what, m), r in itertools.product((("selected", mask), ("contiguous", contiguous)), (rope, None)):
        fn = lambda m=m, r=r: ops.attend_reused(q, k, v, m, kv_len, cfg, r, D ** -0.5)  # noqa: E731
        out.append(dict(kind="reuse_diag", chunks=what, rope=r is not None, ms=time_graph(fn)))
        print(out[-1], flush=True)
    return out


@triton.jit
def _empty_kernel(x_ptr):
    pass


def reuse_references(q, k, mask, cfg: HiPConfig) -> list[dict]:
    """What a reuse step could cost at best, as graph replays: an empty launch of its grid (53 x 8
    programs at 128K), and dense flash decode (SDPA, cuDNN and flash) over as many keys as it
    attends (sink + selected + window), contiguous and already rotated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = cfg.sink + mask.starts.shape[-1] * cfg.chunk_size + cfg.window
    grid = (1, K, -(-n // 64))
    kd = k[:, :n].transpose(1, 2)                                               # (1, K, n, D)
    qd = q.transpose(1, 2)                                                       # (1, H, 1, D)
    out = [dict(kind="reuse_ref", what="empty launch", grid=list(grid),
                ms=time_graph(lambda: _empty_kernel[grid](q)))]
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def fn():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True)
        try:
            out.append(dict(kind="reuse_ref", what=f"dense {name} over {n} keys", ms=time_graph(fn)))
        except Exception as e:   # a backend this build or shape lacks
            out.append(dict(kind="reuse_ref", what=f"dense {name} over {n} keys", ms=None, error=str(e)[:120]))
        print(out[-1], flush=True)
    return out


def sweep_keep_top(tq: int, tk: int, cfg: HiPConfig, rope: RoPE, g) -> list[dict]:
    """The selection kernel per stage (one program per row; in decode ~10 us a call in the
    engine's profile at 256K, as long as the scoring): bitonic top-k vs radix select, by warps.
    Measured 2026-11-29 (H200, sweep_keep_top_h200.json): radix best from 1,024 candidates (decode
    11.6 vs 12.7 us, prefill 58 vs 95 us at 4 warps), bitonic from 512 (8.4 vs 9.9 us): the default."""
    q, k, geo, mask = _inputs(tq, tk, cfg, rope, g)
    out = []
    for s in range(cfg.n_stages):
        starts = (first_stage_starts(tk, cfg.chunk_sizes[0], *mask.starts.shape[:3], k.device) if s == 0
                  else mask.stage_inputs[s])
        qp, qv = pool_queries(q, geo, cfg.stage_strides[s] if tq > 1 else 1, rope)
        scores = ops.score_chunks(qp, qv, k, starts, cfg.chunk_sizes[s], geo, cfg, rope)
        split = None if s + 1 == cfg.n_stages else (cfg.chunk_sizes[s], cfg.chunk_sizes[s + 1])
        want = ops.keep_top(starts, scores, cfg.n_kept(s), split)
        for radix, nw in itertools.product((False, True), (4, 2, 8, 16)):   # the default first
            tuning = dict(radix=radix, num_warps=nw)
            fn = lambda: ops.keep_top(starts, scores, cfg.n_kept(s), split, tuning=tuning)  # noqa: E731
            try:
                same = bool(torch.equal(fn(), want))          # every variant selects the same chunks
                ms = time_graph(fn)
            except Exception as e:
                ms = same = None
                print(f"  {tuning}: {str(e).splitlines()[0][:80]}")
            out.append(dict(kind="keep_top", tq=tq, tk=tk, stage=s, n=scores.shape[-1], **tuning, ms=ms,
                            same=same))
            print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decode", type=parse_contexts, default="1M")
    p.add_argument("--prefill", type=parse_contexts, default="128K")
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--reuse", type=parse_contexts, default="", help="contexts for the mask-reuse decode sweep")
    p.add_argument("--reuse-limit", type=int, default=None, help="time only the first N reuse settings (profilers)")
    p.add_argument("--limit", type=int, default=None,
                   help="time only the first N pruning settings per stage, no attend sweep (profilers)")
    p.add_argument("--out", type=Path, default=Path("sweep_prune.json"))
    args = p.parse_args()
    cfg = HiPConfig.preset("paper", dense_threshold=0)
    rope = RoPE(RoPE.default(D, 500000.0).inv_freq.cuda())
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for tk in args.reuse:
        records += sweep_reuse(tk, cfg, rope, g, args.reuse_limit)
        if args.reuse_limit is None:
            records += sweep_keep_top(1, tk, cfg, rope, g)
    for tk in args.decode:
        records += sweep(1, tk, cfg, rope, g, args.limit)
    for tk in args.prefill:
        records += sweep(min(args.chunk, tk), tk, cfg, rope, g, args.limit)
        if args.limit is None:
            records += sweep_keep_top(min(args.chunk, tk), tk, cfg, rope, g)
    args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
