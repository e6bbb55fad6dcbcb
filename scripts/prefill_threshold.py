"""Prefill of one long prompt (Llama-3-8B shape, random weights, 16K-token chunks), hip deciding
dense or sparse attention once for the prompt (``engine.prefill``: past the dense cutoff, sparse in
every chunk) against deciding it per chunk (chunks over at most ``dense_cutoff`` keys dense, as
``prefill`` did before 2026-12-01), in one run; ``--threshold-zero`` adds ``dense_threshold=0``,
``--offload`` prefills into an offloaded cache (host memory; layer by layer,
``engine/layer_prefill.py``, or with ``--chunk-major`` chunk by chunk, each chunk reading a device
copy of each layer, ``attention/paged.py``), ``--modes`` picks the runs.

    python scripts/prefill_threshold.py --context 70000 --out prefill_threshold.json
"""
import argparse
import datetime
import json
import time

import torch

from infinitehip import HiPConfig
from infinitehip.bench.engine import random_model
from infinitehip.cache.offload_plan import OffloadConfig
from infinitehip.engine import layer_prefill
from infinitehip.engine.generate import make_cache, prefill
from infinitehip.models import AttentionCall

CHUNK = 16384


def per_chunk(model, tokens, cache):
    """The old rule: each chunk dense or sparse by its own key count."""
    for s in range(0, tokens.shape[1], CHUNK):
        e = min(s + CHUNK, tokens.shape[1])
        model.net(tokens[:, s:e], torch.tensor([s], device=tokens.device), cache, AttentionCall("hip"), kv_limit=e,
                  last_only=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=70_000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--threshold-zero", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--chunk-major", action="store_true", help="offloaded: chunk by chunk, not layer by layer")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (the last is reported; the first compiles)")
    p.add_argument("--fp8", action="store_true", help="offloaded: FP8 host store (1M tokens of the 8B shape: 65 GB)")
    p.add_argument("--modes", default="per_prompt,per_chunk")
    p.add_argument("--out", default="prefill_threshold.json")
    a = p.parse_args()
    if a.chunk_major:
        layer_prefill.fits = lambda *args: False
    tokens = torch.randint(0, 128_000, (1, a.context), generator=torch.Generator().manual_seed(0)).cuda()
    runs = [(m, HiPConfig(), prefill if m == "per_prompt" else per_chunk) for m in a.modes.split(",")]
    if a.threshold_zero:
        runs.append(("threshold_0", HiPConfig(dense_threshold=0), prefill))
    rows = []
    for mode, config, run in runs:
        model = random_model(a.layers, config)
        cache = make_cache(model, 1, a.context, CHUNK, offload=OffloadConfig(fp8=True) if a.fp8 else a.offload)
        # What prefill will do (layer_prefill.fits asks free memory now, as prefill does).
        layer_major = run is prefill and layer_prefill.fits(model, cache, a.context)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(a.repeats):   # the first compiles
            torch.cuda.synchronize()
            t = time.perf_counter()
            if run is prefill:
                prefill(model, tokens, cache, chunk_size=CHUNK)
            else:
                run(model, tokens, cache)
            torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t, 3))
        rows.append(dict(mode=mode, offload=a.offload or a.fp8, fp8=a.fp8,
                         layer_major=layer_major, dense_threshold=config.dense_threshold, context=a.context,
                         prefill_s=times[-1],
                         first_s=times[0], peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                         layers=a.layers, chunk_size=CHUNK, device=torch.cuda.get_device_name(),
                         date=datetime.date.today().isoformat(), command="python scripts/prefill_threshold.py "
                         f"--context {a.context} --layers {a.layers} --modes {a.modes}"
                         + " --threshold-zero" * a.threshold_zero + " --offload" * a.offload
                         + " --chunk-major" * a.chunk_major + " --fp8" * a.fp8))
        print(rows[-1], flush=True)
        del model, cache
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
