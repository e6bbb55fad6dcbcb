"""End-to-end engine benchmark: prefill time and decode tokens/s, hip vs dense, same run.

    python -m infinitehip.bench engine --contexts 32768,131072,262144 --out benchmarks/results

Llama-3-8B shape (32 layers, 32 query / 8 KV heads, d = 128, bf16) with random weights: the
timings are real, the text is not (no weights can be downloaded here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from ..attention import RoPE
from ..cache.kv import KVCache
from ..config import HiPConfig
from ..engine.cuda_graph import GraphDecoder
from ..engine.generate import DecodeState, decode_one_token, prefill
from ..models.llama import ModelArgs, Transformer
from ..models.loader import Model

# The H100's HBM3 bandwidth, about what a device-to-device copy measures (3.0 TB/s read + write).
HBM_BYTES_PER_S = 3.0e12
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


def bench_one(model: Model, context: int, backend: str, decode_steps: int, chunk_size: int) -> dict:
    args = model.args
    cache = KVCache(args.n_layers, 1, context + decode_steps + 1, args.n_kv_heads, args.head_dim,
                    dtype=torch.bfloat16, device="cuda")
    tokens = torch.randint(0, args.vocab_size, (1, context), device="cuda")
    prefill_s, logits = _sync_time(lambda: prefill(model, tokens, cache, backend=backend, chunk_size=chunk_size))
    state = DecodeState(backend)
    step = GraphDecoder(model, cache, state) if backend != "dense" else None
    seqlens = torch.tensor([context], device="cuda")
    nxt = logits.argmax(-1)

    length = context

    def run(n):
        nonlocal nxt, length
        for _ in range(n):
            if step is not None:
                out = step(nxt, seqlens)
            else:  # dense: read exactly the written keys, so SDPA takes its flash / cuDNN kernels
                out = decode_one_token(model, nxt, seqlens, cache, state, kv_limit=length + 1)
            nxt = out.argmax(-1)
            seqlens.add_(1)
            length += 1

    warm = max(model.hip.refresh_intervals) + 1 if backend != "dense" else 2  # capture every graph kind
    run(warm)
    decode_s, _ = _sync_time(lambda: run(decode_steps))
    del cache
    torch.cuda.empty_cache()
    return {"context": context, "backend": backend, "prefill_s": prefill_s,
            "decode_tokens_per_s": decode_steps / decode_s, "decode_ms_per_token": 1e3 * decode_s / decode_steps}


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="infinitehip bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="32768,131072,262144")
    p.add_argument("--backends", default="hip,dense")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--skip-dense-prefill-above", type=int, default=1 << 30,
                   help="Skip dense at contexts above this (its prefill is quadratic).")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the engine benchmark needs a CUDA GPU")
    config = HiPConfig(dense_threshold=0)
    model = random_model(a.layers, config)
    device, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    # Compile the Triton kernels first, so no timed prefill pays for it.
    for backend in a.backends.split(","):
        bench_one(model, 2 * a.chunk_size, backend, 2, a.chunk_size)
    # Every bf16 weight is read once per token, except the embedding table (one row of it).
    read = model.args.n_params() - (0 if model.args.tie_embeddings else model.args.vocab_size * model.args.dim)
    floor_ms = 1e3 * read * 2 / HBM_BYTES_PER_S
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for context in map(int, a.contexts.split(",")):
        for backend in a.backends.split(","):
            if backend == "dense" and context > a.skip_dense_prefill_above:
                continue
            r = bench_one(model, context, backend, a.decode_steps, a.chunk_size)
            r.update(device=device, date=date, layers=a.layers, weight_floor_ms=round(floor_ms, 2),
                     decode_over_floor=round(r["decode_ms_per_token"] / floor_ms, 2),
                     command="python -m infinitehip.bench engine " + " ".join(argv or []))
            records.append(r)
            print(f"{context:>8} {backend:>6}  prefill {r['prefill_s']:8.2f} s   decode "
                  f"{r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_ms_per_token']:.2f} ms)", flush=True)
            (out / "engine_h100.json").write_text(json.dumps(records, indent=1))   # after each: a timeout keeps the rest
    return records
