"""The server's decode path (``engine.batch.BatchRunner``), eager vs CUDA graphs (GPU).

Llama-3-8B shape with random weights; ``--batch`` requests of ``--context`` random tokens are
admitted a prefill chunk a step, so the rows decode at different refresh phases, as a server's
do. Times decode steps (ms) after every graph of the phases met is captured; answers are not
claimed (random weights). Writes JSON.

    python scripts/bench_runner.py --layers 32 --batch 4 --context 70000 --out runner.json
"""
import argparse
import datetime
import json
import time

import torch

from infinitehip import HiPConfig
from infinitehip.bench.engine import random_model
from infinitehip.engine.batch import BatchRunner
from infinitehip.engine.sampling import SamplingParams


class StubTokenizer:   # random weights: the text of the answers is not looked at (bench_server.py too)
    eos_token_ids = ()

    def decode(self, ids):
        return "x" * len(ids)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=70_000, help="prompt tokens a request (past 64K: sparse decode)")
    p.add_argument("--out", default="runner.json")
    a = p.parse_args()
    model = random_model(a.layers, HiPConfig())
    model.tokenizer = StubTokenizer()
    res = dict(layers=a.layers, batch=a.batch, context=a.context, device=torch.cuda.get_device_name(),
               date=datetime.date.today().isoformat(), preset="paper")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128_000, (a.context,), generator=g).tolist() for _ in range(a.batch)]
    for graphs in (False, True):
        name = "graph" if graphs else "eager"
        runner = BatchRunner(model, max_batch=a.batch, max_context=a.context + 1024, backend="hip",
                             chunk_size=16384, cuda_graph=graphs)
        for ids in prompts:
            runner.add(ids, SamplingParams(max_new_tokens=800))
        while len(runner._decoding) < a.batch:
            runner.step()
        for _ in range(48):   # warm: the graphs of every mix of phases met are captured
            runner.step()
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(64):
                runner.step()
            torch.cuda.synchronize()
            times.append(round((time.perf_counter() - t) / 64 * 1e3, 3))
        res[f"step_ms_{name}"] = times
        res["phases"] = [s % 32 for s in runner.state.steps]
        if graphs:
            res["graph_keys"] = sorted(map(str, runner._graphs.graphs))
        del runner
        torch.cuda.empty_cache()
    print(json.dumps(res))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
