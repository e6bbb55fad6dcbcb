"""How much of a decode step's sparse mask was already selected some steps before? (CPU)

Offloading reads what a mask selects over PCIe unless a GPU cache already holds it, so the
cache's use rests on masks changing slowly between refreshes (the paper's premise). The GPU
benches run random weights, whose queries are independent from step to step; this measures a
trained model: the built-in one, a RULER-style prompt at 32x its trained context, greedy decode
with every pruning stage rerun at every step, and for each gap d the mean over steps t, layers and
KV heads of |S(t) & S(t + d)| / |S(t + d)|, where S is a stage's set of kept chunk starts. The
same model with its weights redrawn at random (normal, std 0.02, norms one) is the bench's case.

    python scripts/mask_stability.py --out benchmarks/results/mask_stability_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
from pathlib import Path

import torch

from infinitehip.assets import resolve_model_path
from infinitehip.attention.mask import SENTINEL
from infinitehip.cache import KVCache
from infinitehip.engine.generate import decode_one_token, encode_prompt, prefill
from infinitehip.engine.state import DecodeState
from infinitehip.eval.tasks import TokenCounter, make_sample
from infinitehip.models import load


def chunk_sets(mask) -> list[list[set[int]]]:
    """Per stage (its kept chunks: the next stage's candidates, then the final mask), per head
    group, the set of chunk starts of the one decode row."""
    stages = list(mask.stage_inputs[1:]) + [mask.starts]
    return [[set(x[0, g, 0][x[0, g, 0] != SENTINEL].tolist()) for g in range(x.shape[1])] for x in stages]


def decode_masks(model, tokens: list[int], steps: int) -> list[list]:
    """Greedy decode, every stage rerun at every step: [step][layer] -> chunk_sets (hip layers)."""
    a = model.args
    capacity = -(-(len(tokens) + steps + 1) // 256) * 256
    cache = KVCache(a.n_layers, 1, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    logits = prefill(model, torch.tensor([tokens]), cache, chunk_size=2048)
    state, seqlens, out = DecodeState("hip"), torch.tensor([len(tokens)]), []
    for _ in range(steps):
        logits = decode_one_token(model, logits.argmax(-1), seqlens, cache, state)
        seqlens += 1
        out.append([chunk_sets(m) if m is not None else None for m in state.masks])
    return out


def overlap(masks: list[list], gap: int) -> list[float]:
    """Per stage: mean |S(t) & S(t + gap)| / |S(t + gap)| over steps, hip layers and head groups."""
    n_stages = len(next(m for m in masks[0] if m is not None))
    sums, counts = [0.0] * n_stages, [0] * n_stages
    for t in range(len(masks) - gap):
        for before, after in zip(masks[t], masks[t + gap]):
            if before is None:
                continue
            for s in range(n_stages):
                for a, b in zip(before[s], after[s]):
                    if b:
                        sums[s] += len(a & b) / len(b)
                        counts[s] += 1
    return [round(x / max(c, 1), 4) for x, c in zip(sums, counts)]


def randomized(model):
    """The same architecture with weights drawn at random (normal std 0.02; norms one)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="niah_single")
    p.add_argument("--length", default="32x", help="prompt length, a multiple of the trained context")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--gaps", default="1,4,8,16,32")
    p.add_argument("--presets", default="builtin,tiny", help="builtin: the checkpoint's own settings")
    p.add_argument("--out", type=Path, default=Path("mask_stability_cpu.json"))
    a = p.parse_args()
    gaps = [int(x) for x in a.gaps.split(",")]
    records = []
    for preset in a.presets.split(","):
        for weights in ("trained", "random"):
            path = resolve_model_path("builtin")
            hip = load(path, device="cpu", config=None if preset == "builtin" else preset).hip
            model = load(path, device="cpu", config=hip.replace(refresh_intervals=(1,) * hip.n_stages))
            if weights == "random":
                randomized(model)
            length = int(float(a.length.rstrip("x")) * model.args.trained_context)
            random.seed(0)
            sample = make_sample(a.task, TokenCounter(model.tokenizer.encode), length, 0.5, seed=0)
            tokens = encode_prompt(model, sample.prompt)
            masks = decode_masks(model, tokens, a.steps)
            r = dict(preset=preset, weights=weights, task=a.task, prompt_tokens=len(tokens), steps=a.steps,
                     chunk_sizes=list(hip.chunk_sizes), stage_budgets=list(hip.stage_budgets), budget=hip.budget,
                     overlap={str(d): overlap(masks, d) for d in gaps})
            print(r, flush=True)
            records.append(r)
    meta = dict(date=datetime.date.today().isoformat(), device=platform.processor() or "cpu",
                command="python scripts/mask_stability.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in vars(a).items()))
    a.out.write_text(json.dumps([{**r, **meta} for r in records], indent=1, default=str))


if __name__ == "__main__":
    main()
