"""End-to-end engine benchmark: prefill time and decode tokens/s, hip vs dense, same run.

    python -m infinitehip.bench engine --contexts 32768,131072,262144 --out benchmarks/results

Llama-3-8B shape (32 layers, 32 query / 8 KV heads, d = 128, bf16) with random weights: the
timings are real, the text is not (no weights can be downloaded here).

Every backend decodes from CUDA graphs (``decode_ms_per_token``); ``decode_ms_per_token_eager``
is the same step launched op by op over exactly the written keys. ``floor_ratio``: ms/token over
the weight-bandwidth floor (every weight read once per token); dense rows also give
``kv_read_floor_ms``, that floor plus the whole KV cache read once.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import time
from pathlib import Path

import torch

from ..attention import RoPE
from ..attention.triton import pdl
from ..cache.kv import KVCache
from ..config import HiPConfig
from ..engine.cuda_graph import GraphDecoder, warm_steps
from ..engine.generate import decode_one_token, prefill
from ..engine.state import DecodeState
from ..engine.sampling import greedy
from ..models.llama import BACKENDS, ModelArgs, Transformer
from ..models.loader import Model
from . import CONTEXTS_HELP, REFRESH_LAG_HELP, context_axis, copy_bandwidth, device_slug, parse_contexts, pyplot

LLAMA3_8B = dict(architecture="LlamaForCausalLM", vocab_size=128_256, dim=4096, n_layers=32, n_heads=32,
                 n_kv_heads=8, head_dim=128, intermediate_size=14_336, norm_eps=1e-5,
                 max_position_embeddings=8192, trained_context=8192)


def random_model(n_layers: int, config: HiPConfig, device="cuda") -> Model:
    """Llama-3-8B shaped model with random bf16 weights (scaled so activations stay finite)."""
    args = ModelArgs(**{**LLAMA3_8B, "n_layers": n_layers})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            rope = RoPE.default(args.head_dim, 500_000.0)
            # inv_freq on the GPU: a host copy inside a captured CUDA graph would fail.
            net = Transformer(args, RoPE(rope.inv_freq.to(device)), config).eval()
    finally:
        torch.set_default_dtype(default)
    return Model(net=net, tokenizer=None, args=args, hip=config, path=Path("llama3-8b-random"))


def _sync_time(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bench_one(model: Model, context: int, backend: str, decode_steps: int, chunk_size: int,
              eager_steps: int = 8) -> dict:
    """Prefill ``context`` random tokens, then time decode: CUDA-graph replay (every backend), and
    ``eager_steps`` eager steps that read exactly the written keys (0: skip)."""
    r = _bench(model, context, backend, decode_steps, chunk_size, eager_steps)
    torch.cuda.empty_cache()   # the KV cache and the graphs' pool went with _bench's frame
    return r


def _bench(model: Model, context: int, backend: str, decode_steps: int, chunk_size: int, eager_steps: int) -> dict:
    args = model.args
    warm = warm_steps(model.hip) if backend == "hip" else 2
    capacity = context + warm + decode_steps + (eager_steps + 1 if eager_steps else 0)
    cache = KVCache(args.n_layers, 1, capacity, args.n_kv_heads, args.head_dim, dtype=torch.bfloat16, device="cuda")
    tokens = torch.randint(0, args.vocab_size, (1, context), device="cuda")
    prefill_s, logits = _sync_time(lambda: prefill(model, tokens, cache, backend=backend, chunk_size=chunk_size))
    state = DecodeState(backend)
    graph = GraphDecoder(model, cache, state)
    seqlens = torch.tensor([context], device="cuda")
    nxt, length = greedy(logits), context

    def run(n, eager=False):
        nonlocal nxt, length
        for _ in range(n):
            if eager:  # the slice of the cache that is written: SDPA's flash kernels, launched op by op
                out = decode_one_token(model, nxt, seqlens, cache, state, kv_limit=length + 1)
            else:
                out = graph(nxt, seqlens)
            nxt = greedy(out)
            seqlens.add_(1)
            length += 1

    run(warm)
    decode_s, _ = _sync_time(lambda: run(decode_steps))
    r = {"context": context, "backend": backend, "prefill_s": prefill_s, "decode_mode": "cuda_graph",
         "decode_tokens_per_s": decode_steps / decode_s, "decode_ms_per_token": 1e3 * decode_s / decode_steps}
    if eager_steps:   # after the graphs: eager steps rewrite the mask list the graphs read
        run(1, eager=True)
        eager_s, _ = _sync_time(lambda: run(eager_steps, eager=True))
        r["decode_ms_per_token_eager"] = 1e3 * eager_s / eager_steps
    return r


def add_floors(r: dict, floor_ms: float, args: ModelArgs, bytes_per_s: float):
    """Ratios to the weight-bandwidth floor; for dense also the floor with the whole KV cache
    read once per token (what any exact attention must read)."""
    r["floor_ratio"] = round(r["decode_ms_per_token"] / floor_ms, 3)
    if "decode_ms_per_token_eager" in r:
        r["floor_ratio_eager"] = round(r["decode_ms_per_token_eager"] / floor_ms, 3)
    if r["backend"] == "dense":
        kv_bytes = r["context"] * args.kv_bytes_per_token * 2          # bf16 K and V, all layers
        r["kv_read_floor_ms"] = round(floor_ms + 1e3 * kv_bytes / bytes_per_s, 2)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="infinitehip bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=functools.partial(parse_contexts, required=True), default="32K,128K,256K", help=f"Contexts: {CONTEXTS_HELP}.")
    p.add_argument("--backends", default="hip,dense")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--eager-steps", type=int, default=8,
                   help="Also time this many eager decode steps (no CUDA graph) per run; 0 skips them.")
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--skip-dense-prefill-above", type=int, default=1 << 30,
                   help="Skip dense at contexts above this (its prefill is quadratic).")
    p.add_argument("--pdl", choices=("on", "off"), default="off",
                   help="Programmatic dependent launch of the decode kernels (Hopper+; off by default: slower).")
    p.add_argument("--refresh-lag", type=int, default=0, help=REFRESH_LAG_HELP)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    # Checked before the GPU work (as parse_contexts checks --contexts): a bad value used to end in a
    # traceback after the model was built.
    if not all(b in BACKENDS for b in a.backends.split(",")):
        raise SystemExit(f"--backends {a.backends!r}: choose from {', '.join(BACKENDS)}, comma-separated")
    if a.decode_steps < 1:   # the step time divides by it
        raise SystemExit(f"--decode-steps {a.decode_steps}: time at least 1 decode step")
    pdl.USE = a.pdl == "on"
    try:
        config = HiPConfig(dense_threshold=0, refresh_lag=a.refresh_lag)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not torch.cuda.is_available():
        raise SystemExit("the engine benchmark needs a CUDA GPU")
    # The copy rate, measured now on an idle GPU and again below: one H200 copied at 4.25 TB/s
    # idle and 3.82 TB/s after the 256K warm-up (same machine, minutes apart). The fastest wins.
    bytes_per_s = max(copy_bandwidth("cuda") for _ in range(3))
    model = random_model(a.layers, config)
    device, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    # Compile the Triton kernels first, so no timed prefill pays for it. hip warms up at the longest
    # context: some launch constants follow the context (the selection kernel's row of stage-0
    # chunks, a power of two), and a fresh machine's timed 256K prefill took 20.6 s with them
    # compiling inside it, 16.6 s without (H200, engine_h200.json).
    longest = max(a.contexts)
    for backend in a.backends.split(","):
        warm_context = longest if backend == "hip" else 2 * a.chunk_size
        bench_one(model, warm_context, backend, 2, a.chunk_size, eager_steps=2 if a.eager_steps else 0)
    # Every bf16 weight is read once per token, except the embedding table (one row of it).
    read = model.args.n_params() - (0 if model.args.tie_embeddings else model.args.vocab_size * model.args.dim)
    # Measured in this run (H100 80GB HBM3: ~3.0e12): the fastest copy gives the lowest floor.
    bytes_per_s = max(bytes_per_s, *(copy_bandwidth("cuda") for _ in range(3)))
    floor_ms = 1e3 * read * 2 / bytes_per_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for context in a.contexts:
        for backend in a.backends.split(","):
            if backend == "dense" and context > a.skip_dense_prefill_above:
                continue
            r = bench_one(model, context, backend, a.decode_steps, a.chunk_size, a.eager_steps)
            r.update(device=device, date=date, layers=a.layers, weight_floor_ms=round(floor_ms, 2), pdl=a.pdl,
                     refresh_lag=a.refresh_lag,
                     copy_bandwidth_gb_per_s=round(bytes_per_s / 1e9),
                     decode_over_floor=round(r["decode_ms_per_token"] / floor_ms, 2),
                     command="python -m infinitehip.bench engine " + " ".join(argv or []))
            add_floors(r, floor_ms, model.args, bytes_per_s)
            records.append(r)
            _compare_to_dense(records, context)
            eager = f", eager {r['decode_ms_per_token_eager']:.2f} ms" if "decode_ms_per_token_eager" in r else ""
            print(f"{context:>8} {backend:>9}  prefill {r['prefill_s']:8.2f} s   decode "
                  f"{r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_ms_per_token']:.2f} ms, "
                  f"{r['floor_ratio']:.2f}x floor{eager})", flush=True)
            # After each record: a run cut short keeps what it measured.
            stem = out / f"engine_{device_slug(device)}"
            stem.with_suffix(".json").write_text(json.dumps(records, indent=1))
            plot(records, stem.with_suffix(".png"))
    return records


def plot(records: list[dict], path: Path):
    """Prefill seconds and decode ms/token against the context, one line per backend, the weight
    floor dashed and hip's speedups over dense written beside its points. Needs matplotlib (the
    ``plot`` extra); without it, no plot."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    panels = (("prefill_s", "prefill (s)", "prefill_speedup_vs_dense"),
              ("decode_ms_per_token", "decode (ms / token, CUDA graphs)", "decode_speedup_vs_dense"))
    for ax, (key, label, speedup) in zip(axes, panels):
        for backend in dict.fromkeys(r["backend"] for r in records):
            rs = sorted((r for r in records if r["backend"] == backend), key=lambda r: r["context"])
            ax.plot([r["context"] for r in rs], [r[key] for r in rs], "o-", label=backend)
            for r in rs:
                if backend != "dense" and r.get(speedup):
                    ax.annotate(f"{r[speedup]:.2f}x", (r["context"], r[key]), textcoords="offset points",
                                xytext=(0, 6), fontsize=7, ha="center")
        if key == "decode_ms_per_token":
            ax.axhline(records[0]["weight_floor_ms"], ls="--", c="gray", lw=1, label="weight floor")
        context_axis(ax, [r["context"] for r in records])
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(f"Llama-3-8B shape, {r0['layers']} layers, random bf16 weights; {r0['device']}, {r0['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compare_to_dense(records: list[dict], context: int):
    """Give every record at ``context`` its prefill and decode speedups over dense there (decode:
    both from CUDA graphs)."""
    same = [r for r in records if r["context"] == context]
    dense = next((r for r in same if r["backend"] == "dense"), None)
    if dense is not None:
        for r in same:
            r["prefill_speedup_vs_dense"] = round(dense["prefill_s"] / r["prefill_s"], 2)
            r["decode_speedup_vs_dense"] = round(dense["decode_ms_per_token"] / r["decode_ms_per_token"], 2)
