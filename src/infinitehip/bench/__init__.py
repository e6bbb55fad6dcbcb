"""Benchmarks (GPU). ``python -m infinitehip.bench attention --help``."""
from __future__ import annotations

import re
import sys
import time

import torch

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


def device_slug(name: str) -> str:
    """A short file-name tag for a device name: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    model = re.search(r"\b[A-Z]{1,2}\d{2,4}[A-Z]?\b", name)
    return (model.group(0) if model else name.split()[-1]).lower()


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory bandwidth of ``device`` in bytes/s, measured now: the best of ``repeats`` copies of
    ``nbytes`` (each reads and writes every byte). The weight floor of a decode step is taken
    against this rather than a datasheet figure, so the ratio means the same on every GPU."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cuda = src.device.type == "cuda"
    best = float("inf")
    for _ in range(repeats + 1):              # the first copy warms up
        if cuda:
            torch.cuda.synchronize(src.device)
        t = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(src.device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best
