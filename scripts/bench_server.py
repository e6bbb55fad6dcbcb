"""The server end to end over HTTP (GPU): ``--batch`` concurrent streaming completions of
``--context`` random token ids each, against an in-process ``infinitehip serve`` (uvicorn on
localhost) of the Llama-3-8B shape with random weights, then a second question about each of
those documents (their ids plus a few more). Per request: time to the first token and the decode
rate after it; in all: the rate while every request decodes, to set beside
``scripts/bench_runner.py``'s step time without the HTTP layer. ``--modes slots,host`` also runs
the context cache as it was before ``engine/slot_prompts.py`` (every prompt's KV copied to host
memory after its prefill, and back for a reuse); ``--offload`` puts the slots in host memory
(where the context cache keeps host copies), ``--fp8`` with an FP8 host store. Answers are not claimed (random weights).

    python scripts/bench_server.py --layers 32 --batch 4 --context 70000 --max-tokens 256 --out server.json
"""
import argparse
import datetime
import gc
import json
import threading
import time

import httpx
import torch
import uvicorn

from bench_runner import StubTokenizer
from infinitehip import HiPConfig
from infinitehip.bench.engine import random_model
from infinitehip.cache.offload_plan import OffloadConfig
from infinitehip.server.app import create_app
from infinitehip.server.engine import ModelEngine


def _request(url: str, ids: list[int], max_tokens: int, out: dict):
    """One streaming completion; the arrival time of every chunk that carries text."""
    body = dict(model="llama3-8b-random", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
    out["sent"], out["chunks"] = time.perf_counter(), []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=900) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                out["completion_tokens"] = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                out["chunks"].append(time.perf_counter())


def _together(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """Send every prompt at once; per request and aggregate timings."""
    outs = [dict() for _ in prompts]
    threads = [threading.Thread(target=_request, args=(url, ids, max_tokens, o)) for ids, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per = [dict(status=o["status"], completion_tokens=o.get("completion_tokens"),
                ttft_s=round(o["chunks"][0] - o["sent"], 3),
                decode_tokens_per_s=round((len(o["chunks"]) - 1) / (o["chunks"][-1] - o["chunks"][0]), 1))
           for o in outs]
    start = max(o["chunks"][0] for o in outs)          # every request decoding ...
    end = min(o["chunks"][-1] for o in outs)           # ... until the first one ends
    together = sum(sum(start <= t <= end for t in o["chunks"]) for o in outs)
    return dict(requests=per, last_first_token_s=max(p["ttft_s"] for p in per),
                aggregate_tokens_per_s=round(together / (end - start), 1) if end > start else None,
                ms_per_step_all_decoding=round((end - start) / (together / len(outs)) * 1e3, 2) if together else None)


def run_mode(model, mode: str, a, g) -> dict:
    offload = OffloadConfig(fp8=True) if a.fp8 else a.offload
    engine = ModelEngine(model, max_context=a.context + 2 * a.max_tokens + 64, max_batch=a.batch, chunk_size=16384,
                         offload=offload)
    if mode == "host":   # the context cache before slot prompts: host entries after every prefill
        engine.runner._slot_prompts = None
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=a.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{a.port}"
    while not server.started:
        time.sleep(0.1)
    res = dict(mode=mode, offload=a.offload or a.fp8, fp8=a.fp8, cuda_graph=engine.runner._graphs is not None)
    for run, n in (("warm", a.warm_context or a.context), ("documents", a.context)):
        # The first run compiles kernels and captures the graphs (at the slots' capacity, whatever
        # its documents' length); new documents each run: the timed run's prefill is not served
        # from the context cache.
        docs = [torch.randint(0, 128_000, (n,), generator=g).tolist() for _ in range(a.batch)]
        res[run] = _together(url, docs, a.max_tokens)
        # A second question about each document (its ids plus a few more): served from the slot
        # that holds it. Warm-up too: its first use compiles what only a reused prefix needs.
        extra = torch.randint(0, 128_000, (16,), generator=g).tolist()
        res["second_questions" if run == "documents" else "warm_second_questions"] = _together(
            url, [d + extra for d in docs], a.max_tokens)
    res["metrics"] = httpx.get(url + "/metrics").json()
    server.should_exit = True
    while server.started and not getattr(server, "_stopped", True):
        time.sleep(0.1)
    time.sleep(1.0)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=70_000)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--modes", default="slots", help="slots (the server's context cache), host (as before)")
    p.add_argument("--offload", action="store_true", help="the slots' KV in host memory (GPU page cache)")
    p.add_argument("--fp8", action="store_true", help="offload with an FP8 host store (implies --offload)")
    p.add_argument("--warm-context", type=int, default=0,
                   help="the warm-up run's document length (0: --context); a shorter one spares a long prefill "
                        "(past the dense cutoff, 65,536, so that it compiles the sparse kernels)")
    p.add_argument("--out", default="server.json")
    a = p.parse_args()
    if a.warm_context > a.context:   # the slots are sized for --context
        p.error(f"--warm-context {a.warm_context} exceeds --context {a.context}")
    model = random_model(a.layers, HiPConfig(), device="cuda" if torch.cuda.is_available() else "cpu")
    model.tokenizer = StubTokenizer()
    g = torch.Generator().manual_seed(0)
    runs = []
    for i, mode in enumerate(a.modes.split(",")):
        a.port += i
        runs.append(run_mode(model, mode, a, g))
        print(json.dumps(runs[-1], indent=1), flush=True)
    rec = dict(kind="server_http", layers=a.layers, batch=a.batch, context=a.context, max_tokens=a.max_tokens,
               runs=runs, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               date=datetime.date.today().isoformat(), command="python scripts/bench_server.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"))
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
