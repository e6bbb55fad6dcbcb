"""Programmatic dependent launch (PDL, Hopper and newer): a decode step's next kernel starts while
the previous one drains.

A decode step is a chain of small kernels (per layer: four GEMVs, the cache write, attention),
each waiting for the previous one to finish, then paying its own launch and the latency of its
first loads: ~8 us a GEMV on an H200 above what its bytes take. With PDL a kernel is launched
before its predecessor completes (once every program of the predecessor has called
``release_next`` or exited); it may do work that reads nothing the predecessor writes and then
``wait_for_previous`` blocks until the predecessor has completed and its writes are visible.
Nothing before that wait may write memory or read what an earlier kernel writes. Launches
captured in a CUDA graph keep the edge.

Off by default, because it measured slower (H200, 2026-11-30, docs/engine.md): the Llama-3-8B
decode step at 256K took 6.12 ms with PDL and a 2 KB-a-row GEMV weight prefetch, 5.85 ms with PDL
alone, 4.95 ms without; a token's GEMV chain alone was the same with and without (4.24 ms), and
the attention decode step at 128K 82 vs 75 us in a graph. The switch stays for that A/B
(``bench engine --pdl on``) and for GPUs where the balance differs.

Kernels take a ``PDL`` constexpr; the Python side passes ``launch_pdl=True`` where ``enabled``.
Off (by default, the CPU interpreter, older GPUs) the calls compile to nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted

try:   # Triton 3.3+; without it the kernels never take the PDL branches
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:
    gdc_launch_dependents = gdc_wait = None
    _HAVE_GDC = False

# Benchmarks flip this to measure the chain with PDL (`bench engine --pdl on`).
USE = False


def hopper(device: torch.device) -> bool:
    """Whether kernels on ``device`` compile for Hopper's grid dependency control:
    sm90+, and not run by the Triton interpreter (which has no inline assembly)."""
    return device.type == "cuda" and not interpreted() and torch.cuda.get_device_capability(device) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA, compute capability 9.0 or newer."""
    return USE and _HAVE_GDC and hopper(device)


def launch_options(device: torch.device) -> dict:
    """Launch keyword arguments: ``launch_pdl=True`` where ``enabled`` (never for the interpreter)."""
    return {"launch_pdl": True} if enabled(device) else {}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed (its writes visible)."""
    if PDL:
        gdc_wait()


@triton.jit
def release_next(PDL: tl.constexpr):
    """Let the next kernel launch once every program of this one has called this (or exited)."""
    if PDL:
        gdc_launch_dependents()

