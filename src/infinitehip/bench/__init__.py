"""Benchmarks (GPU). ``python -m infinitehip.bench attention --help``."""
from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from ..lengths import LENGTHS_HELP, parse_tokens

_BENCHMARKS = ("attention", "engine", "offload")


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv[0]`` (a benchmark name) with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _BENCHMARKS:
        sys.exit(f"usage: infinitehip bench {{{','.join(_BENCHMARKS)}}} [options]; got {argv[:1]}")
    if argv[0] == "attention":
        from .attention import main as run
    elif argv[0] == "offload":
        from .offload import main as run
    else:
        from .engine import main as run
    run(argv[1:])


CONTEXTS_HELP = LENGTHS_HELP.replace("token counts:", "token counts, comma-separated:")


def parse_contexts(text: str, *, allow_max: bool = False, required: bool = False) -> list:
    """Every benchmark's context list, the ``type=`` of its flags: token counts, plain or K/M
    multiples in either case ("32768,128k,1M" -> [32768, 131072, 1048576]); "" is none, unless
    ``required``. ``allow_max``: the word 'max' too, kept as is (bench offload: the longest
    context that fits)."""
    if required and not text.strip():   # a run of nothing, found after the model was built
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give at least one context, e.g. 128K")
    out = []
    for item in (x.strip() for x in text.split(",")) if text.strip() else ():
        if allow_max and item.lower() == "max":
            out.append("max")
            continue
        try:
            out.append(parse_tokens(item))
        except ValueError:   # argparse prints it after the flag's name: "argument --contexts: '128x': positive ..."
            also = ", or 'max'" if allow_max else ""
            raise argparse.ArgumentTypeError(f"{text!r}: positive {CONTEXTS_HELP}{also}") from None
    return out


REFRESH_LAG_HELP = ("HiPConfig.refresh_lag: masks take effect this many steps after the step that pruned them; "
                    "the pruning runs on a side stream beside decode.")


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None without matplotlib (the
    ``plot`` extra): the benchmarks then write their JSON only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def context_axis(ax, contexts):
    """A log x axis of context lengths with a tick at each measured one, written as users write
    them (128K, 1M): matplotlib's own minor labels of a log axis overlapped ("2x10^2 3x10^4x10^2")."""
    contexts = sorted(set(contexts))
    ax.set_xscale("log")
    ax.set_xticks(contexts, [token_label(c) for c in contexts])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.set_xlabel("context (tokens)")


def token_label(n: int) -> str:
    """131072 -> "128K", 3 << 19 -> "1.5M", 1000 -> "1000"."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and (n * 10) % size == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def device_slug(name: str) -> str:
    """A short file-name tag for a device name: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    model = re.search(r"\b[A-Z]{1,2}\d{2,4}[A-Z]?\b", name)
    return (model.group(0) if model else name.split()[-1]).lower()


def copy_bandwidth(device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Memory bandwidth of ``device`` in bytes/s, measured now: the best of ``repeats`` copies of
    ``nbytes`` (each reads and writes every byte), timed by CUDA events. The weight floor of a
    decode step is taken against this rather than a datasheet figure, so the ratio means the same
    on every GPU. One H200 measured 3.75 and 4.13 TB/s minutes apart with a 1 GiB buffer, 5
    host-timed copies: callers that claim a ratio take the best of several calls."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if src.device.type != "cuda":
        t = time.perf_counter()
        dst.copy_(src)
        return 2 * nbytes / (time.perf_counter() - t)
    best = float("inf")
    dst.copy_(src)                             # warm-up
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * nbytes / best


def kernel_profile(fn, reps: int, top: int = 15) -> list[dict]:
    """Where the time of ``fn`` goes, per call: torch.profiler over ``reps`` calls, kernels (CUDA
    graph replays included) or, on CPU, operators by self time. The ``top`` entries by time, each
    {"kernel", "calls", "us"} per call, after an "all" row that sums every entry."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    rows = [(e.key, e.count / reps, (e.device_time_total if cuda else e.self_cpu_time_total) / reps)
            for e in prof.key_averages() if e.device_type == kind]
    rows.sort(key=lambda r: -r[2])
    total = {"kernel": "all", "calls": sum(r[1] for r in rows), "us": sum(r[2] for r in rows)}
    return [total] + [{"kernel": k, "calls": c, "us": t} for k, c, t in rows[:top]]
