"""Attention benchmark (GPU): InfiniteHiP (Triton) against dense SDPA (cuDNN and flash), one run.

Llama-3-8B head shape: 32 query / 8 kv heads, head_dim 128, bf16, batch 1, ``paper`` preset.
  decode          one query; hip time amortized over one mask-refresh cycle: one CUDA graph
                  per refresh kind (none / stage 2 / stage 1 / full) weighted by how often
                  ``config.refresh_stage(step)`` picks it in a cycle
  decode_refresh  the full-refresh step alone (all pruning stages + attention)
  (both decode kinds also ``*_in_graph``: --layers calls, one per layer with its own query and
  its own keys, captured one after another in one graph and timed per call, dense likewise:
  the cost inside a model's decode graph, where a call has no graph launch of its own)
  prefill         one call of T queries against T keys; and chunked prefill of a long prompt
                  (chunks of C queries against the growing cache), extrapolated from a few chunks
Times are medians of ``triton.testing.do_bench`` (which flushes L2 before every repetition).
Writes a JSON list of records and a PNG plot.

    python -m infinitehip.bench attention --out benchmarks/results/attention_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.api import hip_attention
from ..attention.rope import RoPE
from ..attention.triton import pdl
from ..config import HiPConfig
from . import CONTEXTS_HELP, context_axis, parse_contexts, pyplot

H, K, D = 32, 8, 128
DTYPE = torch.bfloat16
K_ = 1024


def _bench(fn, rep_ms: float = 100.0) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name])


def _dense_ms(fn, backend: str, what: str, rep_ms: float) -> float | None:
    try:
        with _sdpa(backend):
            fn()
            return _bench(fn, rep_ms)
    except Exception as e:  # a backend that cannot run this shape
        print(f"  dense {what} {backend}: {str(e).splitlines()[0][:100]}")
        return None


def dense_decode_ms(q, k, v, backend: str) -> float | None:
    """One query (1, 1, H, D) against every key; k/v heads-first (1, K, T, D), GQA native."""
    qt = q.transpose(1, 2)
    return _dense_ms(lambda: F.scaled_dot_product_attention(qt, k, v, enable_gqa=True), backend, "decode", 100.0)


def dense_prefill_ms(q, k, v, backend: str, rep_ms: float = 200.0) -> float | None:
    """Causal attention of q (1, Tq, H, D), the last Tq positions, against heads-first k/v (1, K, Tk, D)."""
    from torch.nn.attention.bias import causal_lower_right

    tq, tk = q.shape[1], k.shape[2]
    qt = q.transpose(1, 2)
    if tq == tk:
        fn = lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    else:
        mask = causal_lower_right(tq, tk)
        fn = lambda: F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    return _dense_ms(fn, backend, "prefill", rep_ms)


# Tokens between consecutive layers' views of the shared buffers in the in-graph decode timing:
# no two layers' sink or window keys share memory, so one layer's reads never warm the next's.
LAYER_SHIFT = 8 * K_


def in_graph_ms(calls: list) -> float:
    """Time per call of ``calls`` captured one after another in one CUDA graph (L2 flushed
    before each replay, as for every timing here)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    ms = _bench(graph.replay) / len(calls)
    del graph
    return ms


def hip_decode_ms(q, k, v, cfg: HiPConfig, rope: RoPE) -> dict[str, float]:
    """Median time of one CUDA-graph-captured decode step per refresh kind (0..n_stages)."""
    _, mask = hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")
    return {stage: in_graph_ms([lambda s=stage: hip_attention(q, k, v, config=cfg, rope=rope, mask=mask,
                                                              refresh_stage=s, backend="triton")])
            for stage in range(cfg.n_stages + 1)}


def decode_in_graph(qs, layers, cfg: HiPConfig, rope: RoPE) -> tuple[dict[int, float], float | None]:
    """Per-layer decode times inside a graph of len(layers) layers: hip per refresh kind, and
    dense cuDNN (None where it cannot be captured). qs: a (1, 1, H, D) query per layer; layers:
    heads-first (k, v) per layer."""
    masks = [hip_attention(q, k.transpose(1, 2), v.transpose(1, 2), config=cfg, rope=rope, backend="triton")[1]
             for q, (k, v) in zip(qs, layers)]
    hip = {}
    for stage in range(cfg.n_stages + 1):
        hip[stage] = in_graph_ms([
            lambda q=q, k=k, v=v, m=m, s=stage: hip_attention(q, k.transpose(1, 2), v.transpose(1, 2), config=cfg,
                                                              rope=rope, mask=m, refresh_stage=s, backend="triton")
            for q, (k, v), m in zip(qs, layers, masks)])
    try:
        with _sdpa("cudnn"):
            dense = in_graph_ms([lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q.transpose(1, 2), k, v,
                                                                                      enable_gqa=True)
                                 for q, (k, v) in zip(qs, layers)])
    except Exception as e:   # a backend that cannot run or be captured at this shape
        print(f"  dense decode in graph: {str(e).splitlines()[0][:100]}")
        dense = None
    return hip, dense


def amortized(cfg: HiPConfig, times: dict[int, float]) -> tuple[float, dict[int, int]]:
    """Mean step time over one refresh cycle (steps 1..cycle) and how often each kind runs."""
    cycle = math.lcm(*cfg.refresh_intervals)
    counts = {s: 0 for s in times}
    for step in range(1, cycle + 1):
        counts[cfg.refresh_stage(step)] += 1
    return sum(times[s] * n for s, n in counts.items()) / cycle, counts


def hip_prefill_ms(q, k, v, cfg, rope, rep_ms: float = 200.0) -> float:
    fn = lambda: hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")  # noqa: E731
    fn()
    return _bench(fn, rep_ms)


def record(kind, context, dense_ms, hip_ms, meta, **extra):
    """dense_ms is cuDNN's time (flash's where cuDNN cannot run the shape)."""
    r = dict(kind=kind, context=context, dense_ms=dense_ms, hip_ms=hip_ms,
             speedup=None if dense_ms is None or not hip_ms else dense_ms / hip_ms, **meta, **extra)
    fastest = min((x for x in (extra.get("dense_cudnn_ms"), extra.get("dense_flash_ms")) if x), default=None)
    r["speedup_vs_fastest_dense"] = None if fastest is None or not hip_ms else fastest / hip_ms
    sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
    dn = "-" if dense_ms is None else f"{dense_ms:.3f}"
    g = "" if r.get("speedup_in_graph") is None else (f"  in a graph: dense {r['dense_in_graph_ms']:.3f} ms  "
                                                      f"hip {r['hip_in_graph_ms']:.3f} ms  {r['speedup_in_graph']:.1f}x")
    print(f"{kind:15s} {context:>9d} dense {dn:>10s} ms  hip {hip_ms:.3f} ms  {sp}{g}", flush=True)
    return r


def run(args) -> list[dict]:
    dev = torch.cuda.get_device_name()
    meta = dict(device=dev, date=datetime.date.today().isoformat(), command="python -m infinitehip.bench attention "
                + " ".join(args.argv), dtype="bfloat16", heads=f"{H}q/{K}kv", head_dim=D, preset=args.preset,
                stage0_levels=args.stage0_levels)
    # dense_threshold 0: time the sparse path at every context.
    cfg = HiPConfig.preset(args.preset, dense_threshold=0, stage0_levels=args.stage0_levels)
    rope = RoPE(RoPE.default(D, 500000.0).inv_freq.cuda())   # on the device: graphs capture no copies
    g = torch.Generator(device="cuda").manual_seed(0)
    shift = LAYER_SHIFT * (args.layers - 1) if args.decode else 0
    t_max = max(args.decode + args.prefill + args.chunked) + shift
    # Caches heads-first (1, K, T, D), the layout dense kernels want; hip reads the (1, T, K, D) view.
    kc = torch.randn(1, K, t_max, D, device="cuda", dtype=DTYPE, generator=g)
    vc = torch.randn(1, K, t_max, D, device="cuda", dtype=DTYPE, generator=g)
    out = []
    for t in args.decode:
        q = torch.randn(1, 1, H, D, device="cuda", dtype=DTYPE, generator=g)
        k, v = kc[:, :, :t], vc[:, :, :t]
        dense = {b: dense_decode_ms(q, k, v, b) for b in ("cudnn", "flash")}
        times = hip_decode_ms(q, k.transpose(1, 2), v.transpose(1, 2), cfg, rope)
        amort, counts = amortized(cfg, times)
        extra = dict(dense_cudnn_ms=dense["cudnn"], dense_flash_ms=dense["flash"],
                     step_ms={str(s): times[s] for s in times}, steps_per_cycle={str(s): n for s, n in counts.items()})
        if args.layers > 1:
            qs = [torch.randn(1, 1, H, D, device="cuda", dtype=DTYPE, generator=g) for _ in range(args.layers)]
            views = [(kc[:, :, i * LAYER_SHIFT:i * LAYER_SHIFT + t], vc[:, :, i * LAYER_SHIFT:i * LAYER_SHIFT + t])
                     for i in range(args.layers)]
            in_graph, dense_in_graph = decode_in_graph(qs, views, cfg, rope)
            extra.update(layers_in_graph=args.layers, dense_in_graph_ms=dense_in_graph,
                         step_ms_in_graph={str(s): in_graph[s] for s in in_graph})
        base = dense["cudnn"] if dense["cudnn"] is not None else dense["flash"]
        for kind, hip in (("decode", amort), ("decode_refresh", times[0])):
            if args.layers > 1:
                hip_g = amortized(cfg, in_graph)[0] if kind == "decode" else in_graph[0]
                extra.update(hip_in_graph_ms=hip_g,
                             speedup_in_graph=None if dense_in_graph is None else dense_in_graph / hip_g)
            out.append(record(kind, t, base, hip, meta, **extra))
    for t in args.prefill:
        q = torch.randn(1, t, H, D, device="cuda", dtype=DTYPE, generator=g)
        k, v = kc[:, :, :t], vc[:, :, :t]
        dense = {b: dense_prefill_ms(q, k, v, b) for b in ("cudnn", "flash")}
        hip = hip_prefill_ms(q, k.transpose(1, 2), v.transpose(1, 2), cfg, rope)
        base = dense["cudnn"] if dense["cudnn"] is not None else dense["flash"]
        out.append(record("prefill", t, base, hip, meta, dense_cudnn_ms=dense["cudnn"], dense_flash_ms=dense["flash"]))
        del q
    for t in args.chunked:
        out.append(chunked_prefill(t, args.chunk, kc, vc, cfg, rope, g, meta))
    return out


def chunked_prefill(t, chunk, kc, vc, cfg, rope, g, meta):
    """Whole-prompt prefill of t tokens in chunks against the growing cache.

    Every chunk's cost is close to linear in its cache length, so three chunks (at 1/4, 1/2 and
    all of t) are timed and the sum over all t / chunk chunks is taken from a least-squares line.
    """
    ends = [t // 4, t // 2, t]
    q = torch.randn(1, chunk, H, D, device="cuda", dtype=DTYPE, generator=g)
    meas = {"cudnn": [], "flash": [], "hip": []}
    for end in ends:
        k, v = kc[:, :, :end], vc[:, :, :end]
        for b in ("cudnn", "flash"):
            meas[b].append(dense_prefill_ms(q, k, v, b, rep_ms=50))
        meas["hip"].append(hip_prefill_ms(q, k.transpose(1, 2), v.transpose(1, 2), cfg, rope, rep_ms=50))
        print(f"  chunk ending at {end}: " + ", ".join(f"{n} {m[-1]}" for n, m in meas.items()), flush=True)

    def total(ms):
        if any(m is None for m in ms):
            return None
        n = len(ends)
        mx, my = sum(ends) / n, sum(ms) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(ends, ms)) / sum((x - mx) ** 2 for x in ends)
        return sum(my + slope * (e - mx) for e in range(chunk, t + 1, chunk))

    tot = {n: total(m) for n, m in meas.items()}
    base = tot["cudnn"] if tot["cudnn"] is not None else tot["flash"]
    return record("prefill_chunked", t, base, tot["hip"], meta, chunk=chunk, dense_cudnn_ms=tot["cudnn"],
                  dense_flash_ms=tot["flash"], measured_chunk_ends=ends, measured_ms=meas,
                  note=f"extrapolated: {t // chunk} chunks of {chunk} from a line through the {len(ends)} timed chunks")


def crossover(records: list[dict], kind: str) -> int | None:
    """Smallest measured context from which hip stays faster than dense."""
    rs = sorted((r for r in records if r["kind"] == kind and r["speedup"] is not None), key=lambda r: r["context"])
    for i, r in enumerate(rs):
        if all(x["speedup"] > 1 for x in rs[i:]):
            return r["context"]
    return None


def plot(records: list[dict], path: Path):
    """Time per call against the context, one panel per kind, hip's speedups above its points.
    Needs matplotlib (the ``plot`` extra); without it, no plot."""
    plt = pyplot()
    if plt is None:
        return
    kinds = [k for k in ("decode", "decode_refresh", "prefill", "prefill_chunked") if any(r["kind"] == k for r in records)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = sorted((r for r in records if r["kind"] == kind), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        for key, label in (("dense_cudnn_ms", "dense cuDNN"), ("dense_flash_ms", "dense flash"), ("hip_ms", "InfiniteHiP")):
            ys = [r.get(key) for r in rs]
            pts = [(a, b) for a, b in zip(x, ys) if b]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        for a, r in zip(x, rs):
            if r["speedup"]:
                ax.annotate(f"{r['speedup']:.1f}x", (a, r["hip_ms"]), textcoords="offset points", xytext=(0, 6),
                            fontsize=7, ha="center")
        ax.set(yscale="log", ylabel="ms", title=kind)
        context_axis(ax, x)
        ax.legend(fontsize=7)
    fig.suptitle(f"{records[0]['device']}, {H}q/{K}kv heads, d={D}, bf16, {records[0]['preset']} preset", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="infinitehip bench attention", description=__doc__.split("\n")[0])
    p.add_argument("--decode", type=parse_contexts, default="16K,32K,64K,128K,512K,1M,2M,3M",
                   help=f"decode contexts: {CONTEXTS_HELP}")
    p.add_argument("--prefill", type=parse_contexts, default="8K,16K,32K,64K,128K",
                   help="one-call prefill contexts (as --decode; '' = none)")
    p.add_argument("--chunked", type=parse_contexts, default="1M",
                   help="chunked-prefill prompt lengths (as --decode; '' = none)")
    p.add_argument("--chunk", type=int, default=16 * K_, help="queries per prefill chunk")
    p.add_argument("--layers", type=int, default=8,
                   help="decode is also timed per call inside a graph of this many layers' calls (1: not)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--stage0-levels", type=int, default=None,
                   help="HiPConfig.stage0_levels: stop stage 0's descent after this many levels")
    p.add_argument("--pdl", choices=("on", "off"), default="off",
                   help="Programmatic dependent launch of the kernels (Hopper+; off by default: slower).")
    p.add_argument("--out", type=Path, default=Path("attention.json"), help="JSON path (the PNG goes beside it)")
    args = p.parse_args(argv)
    pdl.USE = args.pdl == "on"
    args.argv = argv
    try:   # before the GPU run: a bad preset or level ended in a traceback there
        HiPConfig.preset(args.preset, dense_threshold=0, stage0_levels=args.stage0_levels)
    except ValueError as e:
        sys.exit(str(e))
    if not args.decode + args.prefill + args.chunked:
        sys.exit('nothing to time: --decode, --prefill and --chunked are all empty (give one, e.g. --decode 128K)')
    if not torch.cuda.is_available():
        sys.exit("the attention benchmark needs a CUDA GPU")
    records = run(args)
    summary = {"crossover_decode": crossover(records, "decode"), "crossover_prefill": crossover(records, "prefill")}
    print("crossover (smallest measured context where hip stays faster):", summary)
    for r in records:
        r.update(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    plot(records, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
