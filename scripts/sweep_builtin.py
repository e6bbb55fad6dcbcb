"""Compare HiPConfig variants on the built-in model's long-context eval (GPU: about a minute each).

    python scripts/sweep_builtin.py --length 32x --samples 4 --out sweep.json
    python scripts/sweep_builtin.py --variants base,chunk_8 --tasks passkey --samples 2 --device cpu

Each variant is the built-in model's recommended config with the fields below replaced; the
same prompts are used for every variant, so differences are the config's. ``--samples`` is per
depth (five depths), so a task's accuracy is over 5 x samples prompts. Decode-time behaviour the
engine does not expose as a config field (how decode starts, oracles) is screened on CPU by
``scripts/diagnose_builtin.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import infinitehip  # noqa: E402
from infinitehip.lengths import parse_tokens  # noqa: E402
from infinitehip.eval.runner import EvalSpec, device_name, engine_completer, run_eval, summarize  # noqa: E402
from infinitehip.eval.tasks import TokenCounter  # noqa: E402

VARIANTS = {
    # Earlier sweeps (benchmarks/results/sweep_builtin_32x.json) tried budgets, strides and final
    # chunk sizes. scripts/diagnose_builtin.py then showed, at 32x: passkey fails when decode
    # starts from the prompt's pooled last-block mask (fixed in the engine: decode prunes from
    # scratch), and multi-key NIAH fails in the hierarchical top-1 of stage 0 (an exact-max
    # oracle answers 6/6), so these variants try finer stage-0 chunks and later-stage refreshes.
    "base": {},
    "refresh_late_every_step": dict(refresh_intervals=(16, 1, 1)),
    "chunk_8": dict(chunk_sizes=(8, 4, 2)),
    "chunk_8_late_every_step": dict(chunk_sizes=(8, 4, 2), refresh_intervals=(16, 1, 1)),
    "chunk_8_wide": dict(chunk_sizes=(8, 4, 2), stage_budgets=(None, 1024, 256), refresh_intervals=(16, 1, 1)),
    "stage1_wide": dict(stage_budgets=(None, 2048, 256), refresh_intervals=(16, 1, 1)),
    "two_stage_4": dict(chunk_sizes=(4, 2), stage_budgets=(None, 256), stage_strides=(2, 1),
                        refresh_intervals=(16, 1)),
    "two_stage_8": dict(chunk_sizes=(8, 2), stage_budgets=(None, 256), stage_strides=(2, 1),
                        refresh_intervals=(16, 1)),
    "chunk_4": dict(chunk_sizes=(4, 2, 2), stage_budgets=(None, 512, 128), refresh_intervals=(16, 1, 1)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", default="32x")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--samples", type=int, default=4, help="per depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="sweep.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    model = infinitehip.load("builtin", device=a.device)
    base = model.hip
    counter = TokenCounter(lambda s: model.tokenizer.encode(s, add_special_tokens=False))
    trained = base.model_context_length
    spec = EvalSpec(tuple(a.tasks.split(",")), (parse_tokens(a.length, trained),), ("hip",), samples=a.samples,
                    seed=a.seed)
    command = "python scripts/sweep_builtin.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for name in a.variants.split(","):
        model.hip = base.replace(**VARIANTS[name])
        model.net.set_hip_config(model.hip)
        t = time.perf_counter()
        recs = run_eval(spec, {"hip": engine_completer(model, "hip")}, counter, model_name="builtin",
                        device=str(model.device), trained=trained)
        acc = {task: round(100 * v, 1) for (task, _, _), v in summarize(recs).items()}
        results.append({"variant": name, "overrides": {k: str(v) for k, v in VARIANTS[name].items()},
                        "length": a.length, "accuracy": acc, "seconds": round(time.perf_counter() - t, 1),
                        "device": device_name(model), "date": time.strftime("%Y-%m-%d"),
                        "samples_per_task": a.samples * len(spec.depths), "command": command})
        print(json.dumps(results[-1]), flush=True)
        with open(a.out, "w") as f:   # after every variant: a stopped sweep keeps what it did
            json.dump(results, f, indent=1)
    model.hip = base
    model.net.set_hip_config(base)


if __name__ == "__main__":
    main()
