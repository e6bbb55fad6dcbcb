"""Does rounding the pruning probes to bfloat16 change answers? (The GPU kernel scores bfloat16
keys with bfloat16 operands since 2026-11-29, ``attention/triton/prune.py``.)

The built-in model on the CPU (the PyTorch reference), RULER-style tasks at 32x its trained
context, the same prompts twice: probe scores from float32 operands (the reference as it is), and
from pooled queries and keys rounded to bfloat16 first (what the kernel's operands are).

    python scripts/probe_precision.py --samples 2 --out benchmarks/results/probe_precision_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
from pathlib import Path

import torch

from infinitehip.assets import resolve_model_path
from infinitehip.attention import reference
from infinitehip.eval.runner import EvalSpec, engine_completer, run_eval, summarize
from infinitehip.eval.tasks import TokenCounter
from infinitehip.models import load


@contextlib.contextmanager
def bf16_probes():
    """reference.score_chunks with its operands rounded to bfloat16 (float32 math after that)."""
    exact = reference.score_chunks

    def rounded(qp, q_valid, k, *args, **kwargs):
        round_ = lambda x: x.to(torch.bfloat16).to(x.dtype)   # noqa: E731
        return exact(round_(qp), q_valid, round_(k), *args, **kwargs)

    reference.score_chunks = rounded
    try:
        yield
    finally:
        reference.score_chunks = exact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--length", default="32x", help="prompt length, a multiple of the trained context")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("probe_precision_cpu.json"))
    a = p.parse_args()
    model = load(resolve_model_path("builtin"), device="cpu")
    trained = model.args.trained_context
    spec = EvalSpec(tuple(a.tasks.split(",")), (int(float(a.length.rstrip("x")) * trained),), ("hip",),
                    samples=a.samples)
    hip = engine_completer(model, "hip")

    def hip_bf16(prompt: str, max_new: int) -> str:
        with bf16_probes():
            return hip(prompt, max_new)

    counter = TokenCounter(lambda s: model.tokenizer.encode(s, add_special_tokens=False))
    records = run_eval(spec, {"hip": hip, "hip_bf16_probes": hip_bf16}, counter, model_name="builtin",
                       device=f"cpu ({platform.processor() or platform.machine()})", trained=trained)
    for (task, method, length), acc in sorted(summarize(records).items()):
        print(f"{task:>14} {method:>16} {length:>7}: {100 * acc:5.1f}%")
    meta = {"command": "python scripts/probe_precision.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
            "date": datetime.date.today().isoformat(), "model_dtype": str(model.net.tok_embeddings.weight.dtype)}
    a.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
