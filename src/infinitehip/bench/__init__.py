"""Benchmarks (GPU). ``python -m infinitehip.bench attention --help``."""
from __future__ import annotations

import sys

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
