"""A prompt's tail after a reused prefix (GPU): time to the first token of a second question about
an offloaded document, per tail length, in the server's ``BatchRunner``. The first use of a launch
shape that Triton has not compiled yet pays its compilation on the request's own first token; this
shows which tail lengths still do (docs/server.md, "First use of a prompt-tail length").

    python scripts/tail_compile.py --layers 8 --context 131072 --fp8 --tails 16,16,48,17,5,100,63,2
"""
import argparse
import datetime
import json
import time

import torch

from bench_runner import StubTokenizer
from infinitehip import HiPConfig
from infinitehip.bench.engine import random_model
from infinitehip.cache.offload_plan import OffloadConfig
from infinitehip.engine import SamplingParams
from infinitehip.engine.batch import BatchRunner
from infinitehip.engine.prefix_cache import PrefixCache


def first_token(r: BatchRunner, ids: list[int], params: SamplingParams) -> tuple[float, list[float]]:
    """Seconds from ``add`` to the request's first token, and every step's seconds until idle."""
    torch.cuda.synchronize()
    t, rid, first, steps = time.perf_counter(), r.add(ids, params), None, []
    while r.has_work:
        t0 = time.perf_counter()
        events = r.step()
        torch.cuda.synchronize()
        steps.append(round(time.perf_counter() - t0, 3))
        if first is None and any(e.request == rid for e in events):
            first = time.perf_counter() - t
    if first is None:
        raise RuntimeError(f"a {len(ids)}-token request ended without a token (steps: {steps})")
    return round(first, 2), steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=131072, help="the document's tokens (a multiple of 256)")
    p.add_argument("--fp8", action="store_true", help="an FP8 host store")
    p.add_argument("--tails", default="16,16,48,17,5,100,63,2", help="the second questions' new tokens, in order")
    p.add_argument("--out", default="tail_compile.json")
    a = p.parse_args()
    model = random_model(a.layers, HiPConfig())
    model.tokenizer = StubTokenizer()
    r = BatchRunner(model, max_batch=2, max_context=a.context + 400, chunk_size=16384, prefix_cache=PrefixCache(),
                    offload=OffloadConfig(fp8=a.fp8), cuda_graph=True)
    params, g = SamplingParams(max_new_tokens=8, ignore_eos=True), torch.Generator().manual_seed(0)
    doc = lambda n: torch.randint(0, 128_000, (n,), generator=g).tolist()   # noqa: E731
    d = doc(a.context)
    first, steps = first_token(r, d, params)                   # the document itself (compiles the rest)
    runs = [dict(tail=None, tokens=len(d), first_token_s=first, steps_s=steps)]
    for t in map(int, a.tails.split(",")):
        first, steps = first_token(r, d + doc(t), params)
        runs.append(dict(tail=t, tokens=a.context + t, first_token_s=first, steps_s=steps))
        print(runs[-1], flush=True)
    rec = dict(kind="tail_compile", layers=a.layers, context=a.context, fp8=a.fp8, runs=runs,
               device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
               command="python scripts/tail_compile.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(a).items() if k not in ("fp8", "out")) + (" --fp8" if a.fp8 else ""))
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
