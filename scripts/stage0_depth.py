"""What does stopping stage 0's hierarchical top-1 after a few levels cost in answers? (CPU)

With the descent stopped after L levels, every probe stage 0 makes sits at a fixed position (the
middles of the chunk's halves, quarters, ...: 2^(L+1) - 2 keys per chunk), so an offloaded cache
could keep them all in GPU memory and stage 0 would read nothing over PCIe (docs/offload.md).
The chunk's score becomes the best of 2L probes instead of 2 log2(chunk). This runs the built-in
model (the PyTorch reference) on RULER-style tasks beyond its trained context, the same prompts
with the full descent and with stage 0 stopped after each of ``--levels`` (``HiPConfig.stage0_levels``).

    python scripts/stage0_depth.py --preset tiny --length 32x --levels 3,2 --out stage0_depth_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from infinitehip.assets import resolve_model_path
from infinitehip.eval.runner import EvalSpec, engine_completer, run_eval, summarize
from infinitehip.eval.tasks import TokenCounter
from infinitehip.models import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--preset", default="tiny", help="builtin: the checkpoint's own settings")
    p.add_argument("--length", default="32x", help="prompt length, a multiple of the trained context")
    p.add_argument("--levels", default="3,2", help="stage-0 descents to compare with the full one")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("stage0_depth_cpu.json"))
    a = p.parse_args()
    path = resolve_model_path("builtin")
    base = load(path, device="cpu", config=None if a.preset == "builtin" else a.preset)
    trained, depth = base.args.trained_context, base.hip.chunk_sizes[0].bit_length() - 1
    # The same prompts through each depth: the full descent, then one model per stage0_levels.
    completers = {f"hip_stage0_{depth}_levels": engine_completer(base, "hip"), **{
        f"hip_stage0_{n}_levels": engine_completer(load(path, device="cpu", config=base.hip.replace(stage0_levels=n)),
                                                   "hip") for n in map(int, a.levels.split(","))}}
    spec = EvalSpec(tuple(a.tasks.split(",")), (int(float(a.length.rstrip("x")) * trained),), tuple(completers),
                    samples=a.samples)
    counter = TokenCounter(lambda s: base.tokenizer.encode(s, add_special_tokens=False))
    records = run_eval(spec, completers, counter, model_name="builtin",
                       device=f"cpu ({platform.processor() or platform.machine()})", trained=trained)
    for (task, method, length), acc in sorted(summarize(records).items()):
        print(f"{task:>14} {method:>22} {length:>7}: {100 * acc:5.1f}%")
    meta = {"command": "python scripts/stage0_depth.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
            "date": datetime.date.today().isoformat(), "preset": a.preset, "chunk_sizes": list(base.hip.chunk_sizes)}
    a.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
