"""Compare HiPConfig variants on the built-in model's long-context eval (GPU: about a minute each).

    python scripts/sweep_builtin.py --length 32x --samples 4 --out sweep.json

Each variant is the built-in model's recommended config with the fields below replaced; the
same prompts are used for every variant, so differences are the config's.
"""
from __future__ import annotations

import argparse
import json
import time

import infinitehip
from infinitehip.eval.runner import EvalSpec, engine_completer, parse_length, run_eval, summarize
from infinitehip.eval.tasks import TokenCounter

VARIANTS = {
    "base": {},
    "final_chunk_4": dict(chunk_sizes=(32, 8, 4)),
    "final_chunk_8": dict(chunk_sizes=(32, 16, 8), stage_budgets=(None, 512, 256)),
    "budget_128": dict(stage_budgets=(None, 512, 256), budget=128, dense_layer_budget=256),
    "refresh_often": dict(refresh_intervals=(16, 4, 1)),
    "strides_1": dict(stage_strides=(1, 1, 1)),
    "refresh_every_step": dict(refresh_intervals=(1, 1, 1)),
    "budget_256_often": dict(stage_budgets=(None, 1024, 512), budget=256, dense_layer_budget=512,
                             refresh_intervals=(16, 4, 1)),
    "chunk_8_budget_256_often": dict(chunk_sizes=(32, 16, 8), stage_budgets=(None, 1024, 512), budget=256,
                                     dense_layer_budget=512, refresh_intervals=(16, 4, 1)),
    "window_256_often": dict(window=256, stage_budgets=(None, 1024, 256), budget=128, dense_layer_budget=256,
                             refresh_intervals=(16, 4, 1)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", default="32x")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="sweep.json")
    a = p.parse_args()
    model = infinitehip.load("builtin")
    base = model.hip
    counter = TokenCounter(lambda s: model.tokenizer.encode(s, add_special_tokens=False))
    trained = base.model_context_length
    spec = EvalSpec(tuple(a.tasks.split(",")), (parse_length(a.length, trained),), ("hip",), samples=a.samples)
    results = []
    for name in a.variants.split(","):
        model.hip = base.replace(**VARIANTS[name])
        model.net.set_hip_config(model.hip)
        t = time.perf_counter()
        recs = run_eval(spec, {"hip": engine_completer(model, "hip")}, counter, model_name="builtin",
                        device=str(model.device), trained=trained)
        acc = {task: round(100 * v, 1) for (task, _, _), v in summarize(recs).items()}
        results.append({"variant": name, "overrides": {k: str(v) for k, v in VARIANTS[name].items()},
                        "length": a.length, "accuracy": acc, "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(results[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
