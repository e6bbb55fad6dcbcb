"""Decode's linear layers on the GPU: the fused Triton GEMV (models/gemv.py) against the composed
layers (cuBLAS + the repo's RMSNorm / SiLU * up kernels), at Llama-3-8B's shapes, random weights.

    python scripts/sweep_gemv.py --out sweep_gemv.json [--rows 1] [--limit N]

1. Per linear layer and launch setting: median microseconds of one call, as CUDA-graph replays
   over ``--copies`` distinct weight copies (a decode step reads each weight once: no L2 hits).
2. A whole token's linear work, 32 layers x (q/k/v, o, gate/up, down) + the LM head, composed vs
   fused (default launches, with programmatic dependent launch, the best per layer found in 1), as one graph: ms per token and
   the weight bytes per second, beside this run's copy rate (``bench.copy_bandwidth``).
Every fused result is checked against the composed one before it is timed.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import triton.testing

from infinitehip.attention.triton import pdl
from infinitehip.bench import copy_bandwidth
from infinitehip.models import gemv

DIM, HIDDEN, VOCAB, LAYERS = 4096, 14336, 128256, 32
QKV = (32 + 2 * 8) * 128
# name: (N, K, input width, norm?, silu?, residual?)
LAYERS_OPS = {"qkv": (QKV, DIM, DIM, True, False, False),
              "o": (DIM, DIM, DIM, False, False, True),
              "gate_up": (2 * HIDDEN, DIM, DIM, True, False, False),
              "down": (DIM, HIDDEN, 2 * HIDDEN, False, True, True)}
HEAD = {"lm_head": (VOCAB, DIM, DIM, True, False, False)}
_MORE = ((16, 256, 4, 5), (32, 256, 4, 5), (16, 512, 4, 3), (32, 256, 8, 4),
         (64, 256, 4, 4), (128, 128, 4, 3), (64, 512, 8, 3), (128, 256, 8, 3))
GRID = ([gemv.Launch(bn, bk, 4, 3) for bn, bk in itertools.product((16, 32, 64), (128, 256))]
        + [gemv.Launch(bn, bk, w, st) for bn, bk, w, st in _MORE])


def time_graph(fn) -> float:
    graph = torch.cuda.CUDAGraph()
    fn()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=60, return_mode="median")


class Op:
    """One linear layer's inputs, ``copies`` weight copies of it."""

    def __init__(self, shape, rows: int, copies: int, g: torch.Generator):
        N, K, width, norm, silu, residual = shape
        dev, bf = "cuda", torch.bfloat16
        self.weights = [(torch.randn(N, K, generator=g, device=dev) / K ** 0.5).to(bf) for _ in range(copies)]
        self.x = torch.randn(rows, width, generator=g, device=dev).to(bf)
        self.norm = ((torch.rand(K, generator=g, device=dev) + 0.5).to(bf), 1e-5) if norm else None
        self.silu = silu
        self.residual = torch.randn(rows, N, generator=g, device=dev).to(bf) if residual else None
        self.nbytes = sum(w.numel() * w.element_size() for w in self.weights)

    def call(self, w, fused: bool, launch=None, residual=None):
        return gemv.linear(self.x, w, norm=self.norm, silu=self.silu, residual=residual,
                           triton_kernel=fused, launch=launch)

    def check(self, launch) -> float:
        """Largest |fused - composed| relative to the output's scale."""
        r = None if self.residual is None else self.residual
        want = self.call(self.weights[0], False, residual=None if r is None else r.clone()).float()
        got = self.call(self.weights[0], True, launch, residual=None if r is None else r.clone()).float()
        return ((got - want).abs().max() / want.abs().max()).item()

    def run(self, fused: bool, launch=None):
        for w in self.weights:   # the residual accumulates across copies: the values do not matter here
            self.call(w, fused, launch, self.residual)


def sweep_op(name, op: Op, grid: list[gemv.Launch]) -> list[dict]:
    us = time_graph(lambda: op.run(False)) * 1e3 / len(op.weights)
    out = [dict(kind="op", op=name, variant="composed", us=us, tbps=op.nbytes / len(op.weights) / us / 1e6)]
    print(out[-1], flush=True)
    for launch in grid:
        try:
            err = op.check(launch)
            us = time_graph(lambda: op.run(True, launch)) * 1e3 / len(op.weights)
        except Exception as e:       # e.g. out of shared memory for this tile and stage count
            out.append(dict(kind="op", op=name, variant="fused", **launch.__dict__, error=str(e)[:200]))
            continue
        out.append(dict(kind="op", op=name, variant="fused", **launch.__dict__, default=launch == grid[0], us=us,
                        rel_err=err, tbps=op.nbytes / len(op.weights) / us / 1e6))
        print(out[-1], flush=True)
    return out


def token(ops: dict[str, Op], fused: bool, launches: dict | None = None):
    """One token's linear layers: each op's copies stand for the layers (LAYERS in all)."""
    def run():
        for layer in range(LAYERS):
            for name, op in ops.items():
                if name == "lm_head" and layer != LAYERS - 1:
                    continue
                w = op.weights[layer % len(op.weights)]
                op.call(w, fused, (launches or {}).get(name), op.residual)
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="launch settings per op (default: all)")
    p.add_argument("--out", type=Path, default=Path("sweep_gemv.json"))
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    argv = " ".join(f"--{k} {v}" for k, v in vars(a).items() if v is not None)
    common = dict(device=torch.cuda.get_device_name(), date=str(date.today()), rows=a.rows,
                  command=f"python scripts/sweep_gemv.py {argv}")
    ops = {name: Op(shape, a.rows, a.copies, g) for name, shape in {**LAYERS_OPS, **HEAD}.items()}
    records = []
    for name, op in ops.items():
        default = gemv.default_launch(*op.weights[0].shape)
        # Split-K: qkv (96 programs of 64 features) and o (128 of 32) leave SMs idle.
        split = [replace(default, split=1), replace(default, split=2), replace(default, split=4),
                 replace(default, block_n=64, split=2), replace(default, stages=6)]
        grid = [default] + [x for x in split if x != default]
        records += sweep_op(name, op, grid + [x for x in GRID if x not in grid][:a.limit])
    best = {}
    for name in ops:
        fused = [r for r in records if r["op"] == name and r["variant"] == "fused" and "us" in r]
        if fused:
            b = min(fused, key=lambda r: r["us"])
            best[name] = gemv.Launch(**{f: b[f] for f in gemv.Launch.__dataclass_fields__})
    weight_bytes = sum(op.nbytes // len(op.weights) for name, op in ops.items() if name != "lm_head") * LAYERS
    weight_bytes += ops["lm_head"].nbytes // len(ops["lm_head"].weights)
    rate = copy_bandwidth("cuda")
    for variant, fused, launches, use_pdl in (("composed", False, None, False), ("fused_default", True, None, False),
                                              ("fused_pdl", True, None, True), ("fused_best", True, best, False)):
        pdl.USE = use_pdl
        ms = time_graph(token(ops, fused, launches))
        pdl.USE = False
        records.append(dict(kind="token", variant=variant, ms=ms, weight_gb=weight_bytes / 1e9,
                            tbps=weight_bytes / ms / 1e9, floor_ms=weight_bytes / rate * 1e3, copy_tbps=rate / 1e12,
                            launches={k: v.__dict__ for k, v in (launches or {}).items()}))
        print(records[-1], flush=True)
    for r in records:
        r.update(common)
    a.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
