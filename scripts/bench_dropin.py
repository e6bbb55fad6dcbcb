"""The transformers drop-in on a GPU: prefill and decode time of a Llama-3-8B-shaped model (random
weights, few layers) with sdpa, with ``attn_implementation="infinitehip"`` on transformers' own
DynamicCache, and with ``infinitehip.hf.HiPCache``. Timings only: random weights answer nothing.

    python scripts/bench_dropin.py --contexts 32K,128K --layers 4 --out dropin.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import transformers

import infinitehip.hf
from infinitehip.bench import parse_contexts


def model_of(layers: int, attn: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):   # built in bf16 as from_pretrained(dtype=...) does: RoPE's inv_freq stays float32
        return transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def run(model, tokens: torch.Tensor, cache, steps: int) -> dict:
    """Prefill ``tokens`` (one call), then ``steps`` greedy decode steps timed one by one."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(tokens, past_key_values=cache, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    times = []
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(token, past_key_values=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])   # the first steps compile / allocate
    return dict(prefill_s=prefill, decode_ms_per_token=1e3 * times[len(times) // 2])


def profile_step(model, tokens: torch.Tensor, cache) -> str:
    """torch.profiler's table (host and device time per op) of three decode steps after ``tokens``:
    where an eager step's time goes (the drop-in's steps are bound by the host, docs/engine.md)."""
    from torch.profiler import ProfilerActivity, profile

    out = model(tokens, past_key_values=cache, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(3):   # warm: the first steps compile / allocate
        token = model(token, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            token = model(token, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=parse_contexts, default="32K,128K")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=34)
    p.add_argument("--out", type=Path, default=Path("dropin.json"))
    p.add_argument("--profile", action="store_true",
                   help="also write the profiler table of HiPCache decode steps at the last context (OUT.profile.txt)")
    a = p.parse_args()
    records = []
    base = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), layers=a.layers,
                transformers=transformers.__version__, command="python scripts/bench_dropin.py " + " ".join(
                    f"--{k.replace('_', '-')} {v if k != 'contexts' else ','.join(map(str, v))}"
                    for k, v in vars(a).items() if k not in ("out", "profile")))
    for n in a.contexts:
        tokens = torch.randint(0, 32000, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
        for name, attn in (("sdpa", "sdpa"), ("infinitehip", "infinitehip"), ("infinitehip+HiPCache", "infinitehip")):
            model = model_of(a.layers, attn)
            cache = infinitehip.hf.HiPCache(model) if name.endswith("HiPCache") else transformers.DynamicCache()
            with torch.no_grad():   # a first pass compiles the kernels this path launches
                run(model, tokens[:, :n // 2], cache, 16)
                cache = infinitehip.hf.HiPCache(model) if name.endswith("HiPCache") else transformers.DynamicCache()
                r = run(model, tokens, cache, a.steps)
            records.append(dict(context=n, path=name, **r, **base))
            print(records[-1], flush=True)
            del model, cache
            torch.cuda.empty_cache()
    a.out.write_text(json.dumps(records, indent=1))
    if a.profile:
        model = model_of(a.layers, "infinitehip")
        with torch.no_grad():
            table = profile_step(model, tokens, infinitehip.hf.HiPCache(model))
        a.out.with_suffix(".profile.txt").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
