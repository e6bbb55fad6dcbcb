"""Where the time of a hip_attention call goes (GPU): torch.profiler tables per kernel.

Profiles, at Llama-3-8B head shape, one decode step per refresh kind (CUDA graph replay and
the same step eagerly, so each launch is visible) and one prefill call. Writes the tables
(sorted by device time) to ``--out`` and prints the device kernels per call of each.

    python scripts/profile_attention.py --decode 128K,1M --prefill 128K --out profile.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from infinitehip.attention.api import hip_attention
from infinitehip.attention.rope import RoPE
from infinitehip.bench import parse_contexts
from infinitehip.config import HiPConfig

H, K, D = 32, 8, 128


def table(fn, reps: int, title: str) -> str:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / reps
    print(f"{title}: {kernels:g} device kernels per call", flush=True)
    return (f"\n===== {title} ({reps} reps, {kernels:g} device kernels per call)\n"
            + events.table(sort_by="device_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decode", type=parse_contexts, default="128K,1M")
    p.add_argument("--prefill", type=parse_contexts, default="128K")
    p.add_argument("--preset", default="paper")
    p.add_argument("--out", type=Path, default=Path("profile.txt"))
    args = p.parse_args()
    cfg = HiPConfig.preset(args.preset, dense_threshold=0)
    rope = RoPE(RoPE.default(D, 500000.0).inv_freq.cuda())
    g = torch.Generator(device="cuda").manual_seed(0)
    t_max = max(args.decode + args.prefill)
    kc = torch.randn(1, t_max, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(1, t_max, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out = []
    for t in args.decode:
        q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = kc[:, :t], vc[:, :t]
        _, mask = hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")
        for stage in range(cfg.n_stages + 1):
            step = lambda: hip_attention(q, k, v, config=cfg, rope=rope, mask=mask, refresh_stage=stage,  # noqa: E731
                                         backend="triton")
            out.append(table(step, 20, f"decode {t} refresh_stage={stage} eager"))
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                step()
            out.append(table(graph.replay, 20, f"decode {t} refresh_stage={stage} graph"))
        print(f"decode {t} done", flush=True)
    for t in args.prefill:
        q = torch.randn(1, t, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        fn = lambda: hip_attention(q, kc[:, :t], vc[:, :t], config=cfg, rope=rope, backend="triton")  # noqa: E731
        out.append(table(fn, 3, f"prefill {t}"))
        print(f"prefill {t} done", flush=True)
    args.out.write_text("".join(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
