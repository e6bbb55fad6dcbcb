"""KV-offload benchmark: decode tokens/s, GPU KV memory, block-cache hit rate and bytes moved per
step, offloaded vs all-on-GPU in the same run.

    python -m infinitehip.bench offload --contexts 262144,1048576,max --out $OUT
    python -m infinitehip.bench offload --quick --out /tmp/offload      # tiny shapes, runs on CPU

Llama-3-8B shape (32 layers, 32 query / 8 KV heads, d = 128, bf16) with random weights. The
prompt's KV is random too and is written chunk by chunk through ``cache.update`` (the prefill
write path) instead of running a multi-minute prefill: the decode timings are real, the text is
not. ``max``: the longest context host memory plus the spare GPU memory hold (FP8 storage,
whole layers in GPU memory: ``OffloadConfig.gpu_layers``, automatic unless ``--gpu-layers``).
Contexts whose bf16 store does not fit in host memory are run with FP8; each offloaded run
places its layers like the engine does (``plan_offload``; ``gpu_layers`` in the JSON). The
all-on-GPU path runs where its cache fits.

On a GPU every path decodes from CUDA graphs (``engine.cuda_graph.GraphDecoder``, the cache read
at full capacity): the same mode for the on-GPU and the offloaded caches, so
``decode_ratio_vs_on_gpu`` compares graph with graph. ``--eager`` runs every path op by op
instead; ``decode_mode`` in the JSON says which mode each record ran. Paths: ``offload`` and
``offload_fp8`` read the host store in place; ``offload_page_cache`` and
``offload_fp8_page_cache`` decode through the GPU page cache (``OffloadConfig(decode_cache=True)``),
whose hit rate comes from its device-side counters, read before and after the timed steps (not
per step: that would sync), in units of one page of one kv head, over the steps that plan (the
refresh steps: a step that reuses its mask fetches nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from ..cache.kv import KVCache, free_memory
from ..cache.offload_kv import OffloadKVCache
from ..cache.offload_plan import OffloadConfig, host_bytes_per_token
from ..cache.offload_plan import HOST_USE, longest_offload_context, plan_offload
from ..config import HiPConfig
from ..engine.cuda_graph import GraphDecoder, warm_steps
from ..engine.generate import decode_one_token
from ..engine.state import DecodeState
from ..engine.sampling import greedy
from ..models.llama import ModelArgs, Transformer
from ..models.loader import Model
from . import CONTEXTS_HELP, REFRESH_LAG_HELP, context_axis, device_slug, kernel_profile, parse_contexts, pyplot
from .engine import random_model

QUICK = dict(architecture="LlamaForCausalLM", vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=32, intermediate_size=256, norm_eps=1e-5, max_position_embeddings=512, trained_context=512)
FILL_CHUNK = 65536
# GPU memory the offloaded runs keep free besides the cache: fill's chunk (random K/V, FP8 page
# re-encoding in float32) and one decode step's activations and pruning temporaries.
WORKSPACE = 2 << 30


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quick_model(config: HiPConfig) -> Model:
    from ..attention import RoPE

    torch.manual_seed(0)
    args = ModelArgs(**QUICK)
    net = Transformer(args, RoPE.default(args.head_dim, 10_000.0), config).eval()
    return Model(net=net, tokenizer=None, args=args, hip=config, path=Path("quick-random"))


def fill(model: Model, cache, context: int, device):
    """Write the same random prompt K/V (seeded per layer and chunk) into ``cache``, chunk by chunk."""
    a = model.args
    for layer in range(a.n_layers):
        for s in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - s)
            g = torch.Generator(device=device).manual_seed(layer * 100_003 + s // FILL_CHUNK)
            k = torch.randn(1, n, a.n_kv_heads, a.head_dim, generator=g, device=device, dtype=model.dtype)
            v = torch.randn(1, n, a.n_kv_heads, a.head_dim, generator=g, device=device, dtype=model.dtype)
            cache.update(layer, torch.tensor([s], device=device), k, v)
    _sync()


def decode_mode(device, eager: bool) -> str:
    """"cuda_graph" on a GPU unless ``eager`` (every cache can be captured), else "eager"."""
    return "eager" if eager or device.type != "cuda" else "cuda_graph"


def decode(model: Model, cache, context: int, warm: int, steps: int, device, mode: str = "eager",
           profile: int = 0, prune_programs: int | None = None) -> dict:
    """Greedy decode from position ``context``: ``warm`` steps untimed (a full refresh cycle, so
    every graph is captured; kernel compilation), then ``steps`` timed, then ``profile`` more
    steps under torch.profiler (device time per step by kernel; 0: none). ``mode``: "cuda_graph"
    replays the step (the cache read at full capacity), "eager" runs it op by op over exactly the
    written keys. ``prune_programs``: the graphs' cap on the programs of a scoring launch beside
    decode (HiPConfig.refresh_lag; None: GraphDecoder's default, 0: none). Returns timings,
    tokens, page-cache stats and the profile."""
    state = DecodeState("hip")
    seqlens = torch.tensor([context], device=device)
    tok = torch.tensor([1], device=device)
    tokens, length = [], context
    caches = getattr(cache, "page_caches", [])          # GPU-stored layers have none
    graph = GraphDecoder(model, cache, state) if mode == "cuda_graph" else None
    if graph is not None and graph.beside is not None and prune_programs is not None:
        graph.beside.programs = prune_programs

    def step():
        nonlocal tok, length
        if graph is not None:
            logits = graph(tok, seqlens)
        else:
            logits = decode_one_token(model, tok, seqlens, cache, state, kv_limit=length + 1)
        tok = greedy(logits)
        tokens.append(tok)          # kept on the device: no host sync per step
        seqlens.add_(1)
        length += 1
        return logits

    first = step()
    for _ in range(warm - 1):
        step()
    stats0 = [(c.stats.hits, c.stats.misses) for c in caches]
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    elapsed = time.perf_counter() - t
    per_layer = [(c.stats.hits - h, c.stats.misses - m) for c, (h, m) in zip(caches, stats0)]
    hits, misses = sum(h for h, _ in per_layer), sum(m for _, m in per_layer)
    timed_tokens = torch.cat(tokens).tolist()        # before the profiled steps append theirs
    kernels = kernel_profile(step, profile) if profile else None
    return {"decode_mode": mode, "tokens_per_s": steps / elapsed, "ms_per_token": 1e3 * elapsed / steps,
            "tokens": timed_tokens, "profile_per_step": kernels,
            "first_logits": first.float().cpu(),
            "hit_rate": hits / max(1, hits + misses) if caches else None,
            "hit_rate_per_layer": [h / max(1, h + m) for h, m in per_layer] if caches else None,
            "misses_per_step": misses / steps if caches else None}       # the timed steps' mean, in units


def prune_bytes_per_step(config: HiPConfig, context: int, n_kv_heads: int, head_dim: int, key_bytes: float,
                         probe_stride: int = 0) -> float:
    """Key bytes the pruning stages read from the host store per decode step, amortized over a
    refresh cycle: stage s scores n_s chunks with 2 probes per level (``config.probe_levels``), per
    kv head. Level l of a chunk c probes the middles of its halves: multiples of c / 2^(l+2) (chunks
    start at multiples of c), which the GPU probe copy (``probe_stride``) serves when it divides them."""
    cycle = max(config.refresh_intervals)
    total = 0.0
    for s, c in enumerate(config.chunk_sizes):
        n = -(-context // c) if s == 0 else config.stage_budgets[s] // c
        runs = sum(config.refresh_stage(t) <= s for t in range(1, cycle + 1)) / cycle
        levels = sum(not probe_stride or (c >> (lv + 2)) < probe_stride for lv in range(config.probe_levels(s)))
        total += runs * n * 2 * levels * n_kv_heads * head_dim * key_bytes
    return total


def pcie_bytes_per_step(model: Model, context: int, path: str, fp8: bool, host_layers: int, r: dict,
                        page: int, probe_stride: int = 0) -> dict:
    """Bytes an offloaded decode step moves over PCIe, by kind (estimates, except measured misses)."""
    args, elem = model.args, torch.finfo(model.dtype).bits // 8
    key_bytes = 1 if fp8 else elem        # FP8: the code (scales are in device memory)
    prune = host_layers * prune_bytes_per_step(model.net.layer_configs[-1], context, args.n_kv_heads,
                                               args.head_dim, key_bytes, probe_stride)
    if not path.endswith("page_cache"):   # in place: every attended key crosses PCIe every step
        attended = model.hip.sink + model.hip.budget + model.hip.window
        reads = 2 * host_layers * args.n_kv_heads * args.head_dim * key_bytes * attended
        return {"attention_reads_est": reads, "pruning_reads_est": prune, "total": reads + prune}
    fetch = r["misses_per_step"] * 2 * page * args.head_dim * key_bytes   # a miss: a page of one kv head, K and V
    write = 2 * host_layers * args.n_kv_heads * args.head_dim * (1 if fp8 else elem) * (page if fp8 else 1)
    return {"block_fetch_h2d": fetch, "pruning_reads_est": prune, "kv_write_d2h": write,
            "total": fetch + prune + write}


def bench_capacity(context: int, a) -> int:
    """One capacity for every path of a context: room for the decode steps, rounded up to
    KVCache's 256-token blocks and to the page. Graphs read the cache at full capacity, so the
    on-GPU and offloaded steps then have the same shapes."""
    unit = max(256, a.page)
    return -(-(context + a.steps + a.warm + a.profile + 1) // unit) * unit


# Timed in this order; on_gpu first (the others' ratios and token checks refer to it). Beyond the
# --on-gpu-contexts only the engine's default runs: the page cache (FP8 where bf16 does not fit the host).
PATHS = ("on_gpu", "offload", "offload_fp8", "offload_page_cache", "offload_fp8_page_cache")
DEFAULT_PATH = "offload_page_cache"


def bench_context(model: Model, context: int, paths: list[str], a, device, host_free: int) -> list[dict]:
    args, records, ref = model.args, [], None
    elem = torch.finfo(model.dtype).bits // 8
    capacity = bench_capacity(context, a)
    on_gpu_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem * capacity
    for path in paths:
        if path == "on_gpu":
            if device.type == "cuda" and on_gpu_bytes > 0.9 * free_memory(device):
                print(f"{context:>9} on_gpu: skipped, {on_gpu_bytes / 2**30:.1f} GiB of KV do not fit", flush=True)
                continue
            cache = KVCache(args.n_layers, 1, capacity, args.n_kv_heads, args.head_dim, dtype=model.dtype, device=device)
            fp8 = False
        else:
            bf16_host = host_bytes_per_token(args.n_layers, args.n_kv_heads, args.head_dim, model.dtype) * capacity
            cached = path.endswith("page_cache")
            fp8 = "fp8" in path or bf16_host > HOST_USE * host_free
            config = OffloadConfig(page=a.page, fp8=fp8, headroom=a.headroom, decode_cache=cached,
                                   gpu_layers=a.gpu_layers, probe_stride=a.probe_stride)
            cache = offload_cache(model, capacity, config, device)
        t0 = time.perf_counter()
        fill(model, cache, context, device)
        fill_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = decode(model, cache, context, a.warm, a.steps, device, decode_mode(device, a.eager), a.profile,
                   a.prune_programs)
        gpu_kv = cache.nbytes if path == "on_gpu" else cache.gpu_nbytes
        gpu_layers = args.n_layers if path == "on_gpu" else len(cache.gpu_layers)
        host_layers = args.n_layers - gpu_layers        # what the PCIe estimates below count
        rec = {"context": context, "path": path, "fp8": fp8, "gpu_layers": gpu_layers, "gpu_kv_bytes": gpu_kv,
               "gpu_kv_reduction": gpu_kv / on_gpu_bytes, "host_kv_bytes": getattr(cache, "host_nbytes", 0),
               "fill_s": fill_s, "gpu_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
               **{k: v for k, v in r.items() if k != "first_logits"}}
        if path != "on_gpu":
            rec["bytes_per_step"] = pcie_bytes_per_step(model, context, path, fp8, host_layers, r, a.page,
                                                        a.probe_stride)
        if ref is not None:
            rec["decode_ratio_vs_on_gpu"] = rec["tokens_per_s"] / ref["tokens_per_s"]
            rec["tokens_identical_to_on_gpu"] = r["tokens"] == ref["tokens"]
            rec["first_step_logits_max_abs_diff"] = float((r["first_logits"] - ref["first_logits"]).abs().max())
        else:
            rec["decode_ratio_vs_on_gpu"] = None
        if path == "on_gpu":
            ref = {**rec, "first_logits": r["first_logits"]}
        records.append(rec)
        print(f"{context:>9} {path:>11}{' fp8' if fp8 else ''}: {rec['tokens_per_s']:7.2f} tok/s "
              f"({rec['decode_mode']})  GPU KV "
              f"{gpu_kv / 2**30:6.2f} GiB ({100 * rec['gpu_kv_reduction']:.1f}%, {gpu_layers} layers whole)  "
              f"host KV {rec['host_kv_bytes'] / 2**30:6.2f} GiB  hit rate {rec['hit_rate']}  "
              f"ratio {rec['decode_ratio_vs_on_gpu']}", flush=True)
        for k in (rec["profile_per_step"] or [])[:8]:
            print(f"{'':>12}{k['us']:9.1f} us/step {k['calls']:6.1f} calls  {k['kernel'][:90]}", flush=True)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def offload_cache(model: Model, capacity: int, config: OffloadConfig, device) -> OffloadKVCache:
    """The offloaded cache the engine would allocate: planned first (layer placement, numbers on failure)."""
    a = model.args
    plan = plan_offload(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1, capacity=capacity,
                        dtype=model.dtype, device=device, layer_configs=model.net.layer_configs, config=config,
                        workspace=WORKSPACE)
    return OffloadKVCache(a.n_layers, 1, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device=device,
                          layer_configs=model.net.layer_configs, config=plan.config)


def longest_context(model: Model, a, device, free_host: int | None = None, free_gpu: int | None = None) -> int:
    """The longest FP8 context (a multiple of the fill chunk) that host + spare GPU memory hold,
    with room for the decode steps (``plan_offload``'s budgets: the run at it fits)."""
    m = model.args
    config = OffloadConfig(page=a.page, fp8=True, headroom=a.headroom, gpu_layers=a.gpu_layers,
                           probe_stride=a.probe_stride)
    capacity, _ = longest_offload_context(n_layers=m.n_layers, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, batch=1,
                                          dtype=model.dtype, device=device, layer_configs=model.net.layer_configs,
                                          config=config, workspace=WORKSPACE, free_host=free_host, free_gpu=free_gpu)
    steps = a.steps + a.warm + a.profile + 1
    return (capacity - steps - max(256, a.page)) // FILL_CHUNK * FILL_CHUNK   # bench_capacity's rounding


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="infinitehip bench offload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: parse_contexts(s, allow_max=True, required=True), default=None,
                   help=f"Contexts: {CONTEXTS_HELP}; 'max' = the longest that fits (default 256K,1M,max; "
                   "--quick: 1024,2048).")
    p.add_argument("--on-gpu-contexts", type=parse_contexts, default="256K",
                   help="Contexts that also run all-on-GPU (same run; default 256K; '' = none).")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--warm", type=int, default=33, help="Untimed decode steps (at least one refresh cycle + 1 "
                   "with CUDA graphs: every stage's graph is captured before the timing).")
    p.add_argument("--steps", type=int, default=64, help="Timed decode steps.")
    p.add_argument("--profile", type=int, default=0, help="Decode steps profiled after the timed ones "
                   "(device time per step by kernel, in the JSON as profile_per_step; a refresh cycle: 32).")
    p.add_argument("--page", type=int, default=8)
    p.add_argument("--headroom", type=float, default=1.5, help="GPU page cache size / one step's working set.")
    p.add_argument("--gpu-layers", type=int, default=None, help="Layers whose whole KV stays in GPU memory "
                   "(default: automatic, only when host memory is short; 0: none).")
    p.add_argument("--eager", action="store_true", help="Decode op by op on every path (default on a GPU: "
                   "CUDA graphs wherever the cache allows, the same for on-GPU and offloaded caches).")
    p.add_argument("--paths", default=",".join(PATHS), help="Which paths to time, comma-separated, from "
                   f"{', '.join(PATHS)} (on_gpu and the same-run paths only at --on-gpu-contexts).")
    p.add_argument("--stage0-levels", type=int, default=None, help="HiPConfig.stage0_levels: stop stage 0's "
                   "descent after this many levels (fewer stage-0 probe bytes over PCIe).")
    p.add_argument("--refresh-lag", type=int, default=0, help=REFRESH_LAG_HELP)
    p.add_argument("--prune-programs", type=int, default=None, help="With --refresh-lag: at most this many programs "
                   "per scoring launch beside decode (default: half the SMs; 0: no cap).")
    p.add_argument("--probe-stride", type=int, default=OffloadConfig.probe_stride, help="OffloadConfig.probe_stride: "
                   "keys at its multiples also kept on the GPU for pruning (0: none, every probe over PCIe).")
    p.add_argument("--quick", action="store_true", help="Tiny shapes (runs on CPU): for tests.")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    wanted = [x for x in a.paths.split(",") if x]
    if not wanted or any(x not in PATHS for x in wanted):
        raise SystemExit(f"--paths {a.paths!r}: choose from {', '.join(PATHS)}")
    if a.prune_programs is not None and a.prune_programs < 0:
        raise SystemExit(f"--prune-programs {a.prune_programs}: a count >= 1, or 0 for no cap")
    if a.steps < 1:   # the step time divides by it
        raise SystemExit(f"--steps {a.steps}: time at least 1 decode step")
    for flag, n in (("--warm", a.warm), ("--profile", a.profile), ("--layers", a.layers - 1)):
        if n < 0:   # --warm -5 ran as 0, --profile -1 printed an empty profile, --layers 0 built no model
            raise SystemExit(f"{flag} {getattr(a, flag[2:])}: a count >= {1 if flag == '--layers' else 0}")
    try:   # --page, --probe-stride, --headroom, --gpu-layers: what OffloadConfig accepts
        OffloadConfig(page=a.page, headroom=a.headroom, gpu_layers=a.gpu_layers, probe_stride=a.probe_stride)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if a.quick:
        config = _config(HiPConfig.preset("tiny"), a)
        model, device = quick_model(config), torch.device("cpu")
        contexts = [c for c in a.contexts if c != "max"] if a.contexts else [1024, 2048]
        on_gpu = set(contexts[:1])
        a.warm, a.steps = min(a.warm, 16), min(a.steps, 8)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the offload benchmark needs a CUDA GPU (or --quick)")
        config = _config(HiPConfig(), a)
        model, device = random_model(a.layers, config), torch.device("cuda")
        contexts = a.contexts or [256 * 1024, 1024 * 1024, "max"]
        on_gpu = set(a.on_gpu_contexts)
        if not a.eager:   # the timed steps must not capture: every refresh stage's graph first
            a.warm = max(a.warm, warm_steps(config))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    date, records = datetime.date.today().isoformat(), []
    for context in contexts:
        if context == "max":    # measured now, just before its plan: earlier runs' leftovers count
            context = longest_context(model, a, device)
        paths = [x for x in PATHS if x in wanted and (context in on_gpu or x == DEFAULT_PATH)]
        for r in bench_context(model, context, paths, a, device, free_memory(torch.device("cpu"))):
            r.update(device=name, date=date, layers=model.args.n_layers, stage0_levels=a.stage0_levels,
                     refresh_lag=a.refresh_lag, prune_programs=a.prune_programs, probe_stride=a.probe_stride,
                     command="python -m infinitehip.bench offload " + " ".join(argv or []))
            records.append(r)
        _save(records, Path(a.out), "offload_quick" if a.quick else "offload_" + device_slug(name))
    return records


def _config(preset: HiPConfig, a) -> HiPConfig:
    """The benchmark's HiPConfig: ``preset`` without the dense fallback, the flags' overrides."""
    try:
        return preset.replace(dense_threshold=0, stage0_levels=a.stage0_levels, refresh_lag=a.refresh_lag)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _save(records: list[dict], out: Path, stem: str):
    """JSON and plot, rewritten after every context (a run cut short keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    _plot(records, out / f"{stem}.png")


def _plot(records: list[dict], path: Path):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in PATHS:
        rs = [r for r in records if r["path"] == name]
        if rs:
            ax1.plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
            ax2.plot([r["context"] for r in rs], [r["gpu_kv_bytes"] / 2**30 for r in rs], "o-", label=name)
    for ax, label in ((ax1, "decode tokens/s"), (ax2, "GPU KV memory (GiB)")):
        context_axis(ax, [r["context"] for r in records])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"KV offload, {records[0]['device']}, {records[0]['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
