"""Where a decode GEMV's time goes, from inside the kernel (GPU only; an experiment, not the library).

    python scripts/gemv_timeline.py --out gemv_timeline.json

A plain y = x W^T (one row, bf16) at Llama-3-8B's four layer shapes, launched six times in a CUDA
graph over six weight copies (no L2 hits, as a decode step reads its weights). Every program
stamps %globaltimer when it starts, when it may go (after the PDL wait) and when it ends, so a
launch splits into:
  span  the first program's start to the last program's end (the work, ramp and tail included)
  gap   the previous launch's last end to this launch's first start (what a graph launch costs)
  ends  the spread of the programs' end times (how unevenly the SMs finished)
Variants: the loop of ``models/gemv.py`` (tl.dot over BLOCK_N x BLOCK_K weight tiles, pipelined
through shared memory) with one program per BLOCK_N features or a persistent grid taking
BLOCK_N-feature units from an atomic counter; multiply-adds in registers instead of tl.dot; PDL.
Measured 2026-11-30 on an H200: benchmarks/results/kernel_timeline_h200.json, docs/engine.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 6


@triton.jit
def _now(after):
    """%globaltimer (ns), read once ``after`` is computed (the inline asm takes it as an input)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [after], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _features(x_ptr, w_ptr, out_ptr, u, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FMA: tl.constexpr):
    """y[u * BLOCK_N : (u + 1) * BLOCK_N] of one row: by tl.dot (the row padded to 16, as gemv.py
    does) or by multiply-adds into a (BLOCK_N, BLOCK_K) float32 tile summed once at the end."""
    n = u * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    if FMA:
        acc_k = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((16, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :])
        if FMA:
            acc_k += w.to(tl.float32) * tl.load(x_ptr + k).to(tl.float32)[None, :]
        else:
            a = tl.load(x_ptr + m[:, None] * 0 + k[None, :], mask=(m < 1)[:, None], other=0.0)
            acc += tl.dot(a, tl.trans(w))
    if FMA:
        tl.store(out_ptr + n, tl.sum(acc_k, axis=1).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + m[:, None] * 0 + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=(m < 1)[:, None])


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, ctr_ptr, log_ptr, n_units, K: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, FMA: tl.constexpr, DYNAMIC: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    t_start = _now(pid)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t_go = _now(pid)
    if DYNAMIC:   # units from an atomic counter; the last program out zeroes it for the next replay
        u = tl.atomic_add(ctr_ptr, 1)
        while u < n_units:
            _features(x_ptr, w_ptr, out_ptr, u, K, BLOCK_N, BLOCK_K, FMA)
            u = tl.atomic_add(ctr_ptr, 1)
        if tl.atomic_add(ctr_ptr + 1, 1) == tl.num_programs(0) - 1:
            tl.atomic_xchg(ctr_ptr, 0)
            tl.atomic_xchg(ctr_ptr + 1, 0)
    else:
        _features(x_ptr, w_ptr, out_ptr, pid, K, BLOCK_N, BLOCK_K, FMA)
    t_end = _now(pid)
    tl.store(log_ptr + pid * 3 + 0, t_start)
    tl.store(log_ptr + pid * 3 + 1, t_go)
    tl.store(log_ptr + pid * 3 + 2, t_end)


def time_graph(fn) -> float:
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=5, rep=60, return_mode="median")


def measure(name: str, bn: int, bk: int, warps: int, stages: int, fma=False, dynamic=False, pdl=False) -> dict:
    N, K = SHAPES[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = 2 * sms if dynamic else N // bn
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(COPIES)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    ctr = torch.zeros(2, dtype=torch.int32, device="cuda")
    logs = [torch.zeros(grid, 3, dtype=torch.int64, device="cuda") for _ in ws]

    def run():
        for w, log in zip(ws, logs):
            _gemv[(grid,)](x, w, out, ctr, log, N // bn, K=K, BLOCK_N=bn, BLOCK_K=bk, FMA=fma, DYNAMIC=dynamic, PDL=pdl,
                           num_warps=warps, num_stages=stages, **({"launch_pdl": True} if pdl else {}))

    us = time_graph(run) * 1e3 / COPIES
    err = ((out.float() - x.float() @ ws[-1].float().T).abs().max() / out.float().abs().max()).item()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    g.replay()
    torch.cuda.synchronize()
    L = [log.cpu() for log in logs]
    starts = [log[:, 0].min().item() for log in L]
    ends = [log[:, 2].max().item() for log in L]
    mid = L[COPIES // 2]
    end_us = (mid[:, 2] - mid[:, 1].min()).double() / 1e3
    rec = dict(op=name, block_n=bn, block_k=bk, warps=warps, stages=stages, fma=fma, dynamic=dynamic, pdl=pdl,
               us_per_call=round(us, 2), tbps=round(N * K * 2 / us / 1e6, 3), rel_err=err,
               span_us=round((ends[COPIES // 2] - mid[:, 1].min().item()) / 1e3, 2),
               gap_us=[round((starts[i + 1] - ends[i]) / 1e3, 2) for i in range(COPIES - 1)],
               go_gap_us=[round((L[i + 1][:, 1].min().item() - ends[i]) / 1e3, 2) for i in range(COPIES - 1)],
               end_us_min_median_max=[round(v, 2) for v in (end_us.min().item(), end_us.median().item(),
                                                             end_us.max().item())])
    print(rec, flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("gemv_timeline.json"))
    a = p.parse_args()
    records = []
    for name in SHAPES:
        for bn, st in ((32, 5), (64, 3)):
            records.append(measure(name, bn, 256, 4, st))
            records.append(measure(name, bn, 256, 4, st, pdl=True))
        records.append(measure(name, 32, 256, 4, 5, dynamic=True))
        records.append(measure(name, 8, 512, 4, 2, fma=True))
        records.append(measure(name, 16, 512, 8, 2, fma=True))
    device = torch.cuda.get_device_name()
    for r in records:
        r.update(device=device, command="python scripts/gemv_timeline.py")
    a.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
