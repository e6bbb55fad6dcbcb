"""Eval of the built-in model for benchmarks/results/ (no CLI dependencies: runs on a bare GPU box).

    PYTHONPATH=src python scripts/eval_builtin.py --lengths 32x,128x --out eval_gpu.json

Writes the JSON records after every cell, so a run stopped by ``--time-limit`` keeps what it did.
``infinitehip eval`` runs the same code with a table and plots.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from infinitehip.assets import resolve_model_path  # noqa: E402
from infinitehip.lengths import parse_tokens  # noqa: E402
from infinitehip.eval.runner import EvalSpec, device_name, engine_completer, run_eval  # noqa: E402
from infinitehip.eval.tasks import TokenCounter  # noqa: E402
from infinitehip.models import load  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--preset", default=None, help="default: the config the model's config.json recommends")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--lengths", default="0.875x,4x,32x,128x")
    p.add_argument("--methods", default="hip,dense,streaming")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0, help="seconds; no new length starts after it")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    path = resolve_model_path(a.model)
    model = load(path, config=a.preset)
    trained = model.hip.model_context_length
    counter = TokenCounter(lambda s: model.tokenizer.encode(s, add_special_tokens=False))
    completers = {m: engine_completer(model, m) for m in a.methods.split(",")}
    records, t0 = [], time.time()
    command = "python scripts/eval_builtin.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for length in a.lengths.split(","):
        if a.time_limit and time.time() - t0 > a.time_limit:
            print(f"time limit: skipping length {length}", flush=True)
            continue
        spec = EvalSpec(tuple(a.tasks.split(",")), (parse_tokens(length, trained),), tuple(completers),
                        tuple(float(d) for d in a.depths.split(",")), a.samples, a.seed)

        def keep(r):
            records.append(r)
            print(f"{r['task']:>16} {r['method']:>9} {r['length']:>7} depth {r['depth']:.1f}: "
                  f"{100 * r['accuracy']:5.1f}%  ({r['seconds_per_sample']:.2f} s/sample)", flush=True)
            a.out.write_text(json.dumps({"command": command, "preset": a.preset, "trained_context": trained,
                                         "records": records}, indent=1) + "\n")

        run_eval(spec, completers, counter, model_name=Path(path).name, device=device_name(model),
                 trained=trained, on_cell=keep)
    print(f"done in {time.time() - t0:.0f}s -> {a.out}", flush=True)


if __name__ == "__main__":
    main()
