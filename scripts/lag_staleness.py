"""What does ``HiPConfig.refresh_lag`` cost a trained model's predictions? (CPU)

A lag lets the pruning run beside decode (on a GPU, a side stream), but every refreshed mask is
attended ``lag`` steps later than without one. This runs the built-in model (the PyTorch
reference) on a RULER-style prompt at 32x its trained context and decodes ``--steps`` tokens,
every run fed the same tokens (the lag-0 run's greedy ones). Per preset and lag it compares each
step's next-token distribution with two references: masks refreshed at every step (the freshest
a mask can be) and the preset without a lag. Reported: top-1 agreement, mean KL(reference || run)
in nats, and the mean of the reference's top-1 log-probability lost.

    python scripts/lag_staleness.py --out benchmarks/results/lag_staleness_cpu.json
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
from infinitehip.cache import KVCache
from infinitehip.engine.generate import decode_one_token, encode_prompt, prefill
from infinitehip.engine.state import DecodeState
from infinitehip.eval.tasks import TokenCounter, make_sample
from infinitehip.models import load


def decode_logits(model, tokens: list[int], steps: int, feed: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``tokens``, then ``steps`` decode steps fed ``feed`` (None: greedy). Returns the
    (steps, V) log-probabilities of each step's next token and the tokens fed."""
    a = model.args
    capacity = -(-(len(tokens) + steps + 1) // 256) * 256
    cache = KVCache(a.n_layers, 1, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    logits = prefill(model, torch.tensor([tokens]), cache, chunk_size=2048)
    state, seqlens, out, fed = DecodeState("hip"), torch.tensor([len(tokens)]), [], []
    for t in range(steps):
        token = logits.argmax(-1) if feed is None else torch.tensor([feed[t]])
        fed.append(int(token))
        logits = decode_one_token(model, token, seqlens, cache, state)
        seqlens += 1
        out.append(logits.float().log_softmax(-1)[0])
    return torch.stack(out), fed


def compare(ref: torch.Tensor, run: torch.Tensor) -> dict:
    """Top-1 agreement, mean KL(ref || run), mean drop of ref's top-1 log-probability."""
    top = ref.argmax(-1)
    kl = (ref.exp() * (ref - run)).sum(-1)
    drop = ref.gather(-1, top[:, None]) - run.gather(-1, top[:, None])
    return {"top1_agreement": round(float((run.argmax(-1) == top).float().mean()), 4),
            "kl_nats": round(float(kl.mean()), 5), "top1_logprob_drop": round(float(drop.mean()), 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="niah_single")
    p.add_argument("--length", default="32x", help="prompt length, a multiple of the trained context")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--presets", default="builtin,tiny", help="builtin: the checkpoint's own settings")
    p.add_argument("--lags", default="4,12", help="refresh lags to compare with none")
    p.add_argument("--out", type=Path, default=Path("lag_staleness_cpu.json"))
    a = p.parse_args()
    path, records = resolve_model_path("builtin"), []
    for preset in a.presets.split(","):
        hip = load(path, device="cpu", config=None if preset == "builtin" else preset).hip
        configs = {"fresh": hip.replace(refresh_intervals=(1,) * hip.n_stages), "lag_0": hip,
                   **{f"lag_{n}": hip.replace(refresh_lag=n) for n in map(int, a.lags.split(","))}}
        model = load(path, device="cpu", config=hip)
        random.seed(0)
        sample = make_sample(a.task, TokenCounter(model.tokenizer.encode),
                             int(float(a.length.rstrip("x")) * model.args.trained_context), 0.5, seed=0)
        tokens = encode_prompt(model, sample.prompt)
        base, feed = decode_logits(model, tokens, a.steps)
        runs = {"lag_0": base}
        for name, config in configs.items():
            if name != "lag_0":
                runs[name] = decode_logits(load(path, device="cpu", config=config), tokens, a.steps, feed)[0]
        for name, run in runs.items():
            r = dict(preset=preset, run=name, refresh_intervals=list(configs[name].refresh_intervals),
                     refresh_lag=configs[name].refresh_lag, prompt_tokens=len(tokens), steps=a.steps,
                     vs_fresh=compare(runs["fresh"], run), vs_lag_0=compare(runs["lag_0"], run))
            print(r, flush=True)
            records.append(r)
    meta = dict(date=datetime.date.today().isoformat(), device=platform.processor() or "cpu", task=a.task,
                command="python scripts/lag_staleness.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()))
    a.out.write_text(json.dumps([{**r, **meta} for r in records], indent=1, default=str))


if __name__ == "__main__":
    main()
