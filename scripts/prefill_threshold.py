"""Prefill of one long prompt (Llama-3-8B shape, random weights, 16K-token chunks) with the presets'
``dense_threshold`` (chunks over at most 64K keys attend densely) against ``dense_threshold=0``
(every chunk sparse): what the threshold costs a server's prompt between 64K and 128K tokens.

    python scripts/prefill_threshold.py --context 70000 --out prefill_threshold.json
"""
import argparse
import datetime
import json
import time

import torch

from infinitehip import HiPConfig
from infinitehip.bench.engine import random_model
from infinitehip.cache import KVCache
from infinitehip.engine.generate import prefill


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=70_000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default="prefill_threshold.json")
    a = p.parse_args()
    tokens = torch.randint(0, 128_000, (1, a.context), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    for threshold in (HiPConfig().dense_threshold, 0):
        model = random_model(a.layers, HiPConfig(dense_threshold=threshold))
        args = model.args
        cache = KVCache(args.n_layers, 1, a.context, args.n_kv_heads, args.head_dim, dtype=torch.bfloat16, device="cuda")
        times = []
        for _ in range(2):   # the first compiles
            torch.cuda.synchronize()
            t = time.perf_counter()
            prefill(model, tokens, cache, chunk_size=16384)
            torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t, 3))
        rows.append(dict(dense_threshold=threshold, context=a.context, prefill_s=times[-1], first_s=times[0],
                         layers=a.layers, chunk_size=16384, device=torch.cuda.get_device_name(),
                         date=datetime.date.today().isoformat(), command="python scripts/prefill_threshold.py "
                         f"--context {a.context} --layers {a.layers}"))
        print(rows[-1], flush=True)
        del model, cache
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
