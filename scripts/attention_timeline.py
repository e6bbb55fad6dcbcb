"""Where a mask-reuse decode attention step's time goes, from inside the kernel (GPU only; an
experiment, not the library).

    python scripts/attention_timeline.py --out attention_timeline.json

Copies the package to a temporary folder and stamps %globaltimer into that copy's attention kernel
(``bsa._bsa_kernel`` and ``decode.arrive_and_merge``): each program records when it starts, when
its positions are known, when its slot tiles are done, when it has counted its arrival and, for
the last-arriving program, when the merge is done. The step (Llama-3-8B heads, bf16, 128K keys,
the ``paper`` preset) runs four times back to back in a CUDA graph. Variants: RoPE off (what the
keys' rotation costs), PDL on, and a tile loop without the skip of empty tiles (NO_SKIP, so Triton
may pipeline a program's tiles) at several tiles per program.
Measured 2026-11-30 on an H200: benchmarks/results/kernel_timeline_h200.json, docs/engine.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "infinitehip"
NOW = ("@triton.jit\ndef _now(after):\n"
       "    return tl.inline_asm_elementwise('mov.u64 $0, %globaltimer; // $1', '=l,r', [after], dtype=tl.int64,\n"
       "                                     is_pure=False, pack=1)\n\n\n")


def _sub(text: str, old: str, new: str, where: str) -> str:
    if old not in text:
        raise SystemExit(f"attention_timeline: {where} changed ({old.strip()[:60]!r} not found); update the patch")
    return text.replace(old, new, 1)


def patch(root: Path):
    """Timestamps (log row per program: start, positions, tiles, arrived, merged, merged-flag) and
    the NO_SKIP switch, in the copy at ``root``."""
    t = root / "attention" / "triton"
    d = (t / "decode.py").read_text()
    d = _sub(d, "@triton.jit\ndef arrive_and_merge(", NOW + "@triton.jit\ndef arrive_and_merge(", "decode.py")
    d = _sub(d, "NSPLIT_P: tl.constexpr, SPLIT_TILE: tl.constexpr):",
             "NSPLIT_P: tl.constexpr, SPLIT_TILE: tl.constexpr, log_ptr, t0, t1, t2, lid):", "decode.py")
    d = _sub(d, '    arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")\n',
             '    arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")\n'
             "    row = log_ptr + lid * 6\n    tl.store(row, t0)\n    tl.store(row + 1, t1)\n    tl.store(row + 2, t2)\n"
             "    tl.store(row + 3, _now(arrived))\n", "decode.py")
    d = _sub(d, "        tl.atomic_xchg(count_ptr + slot, 0)",
             "        tl.store(row + 4, _now(tl.sum(w_sum, axis=0).to(tl.int32)))\n        tl.store(row + 5, 1)\n"
             "        tl.atomic_xchg(count_ptr + slot, 0)", "decode.py")
    (t / "decode.py").write_text(d)
    b = (t / "bsa.py").read_text()
    b = _sub(b, "from .decode import arrive_and_merge", "from .decode import _now, arrive_and_merge", "bsa.py")
    b = _sub(b, "    PDL: tl.constexpr,\n):", "    PDL: tl.constexpr, log_ptr, NO_SKIP: tl.constexpr,\n):", "bsa.py")
    b = _sub(b, "    wait_for_previous(PDL)", "    _t0 = _now(tl.program_id(0))\n    wait_for_previous(PDL)", "bsa.py")
    b = _sub(b, "    lead = tl.sum(", "    _t1 = _now(packed.to(tl.int32))\n    lead = tl.sum(", "bsa.py")
    loop_at, loop_end = b.index("    for i in range(TILES_PER_SPLIT):\n"), b.index("    l_safe = tl.where(")
    loop = b[loop_at:loop_end]
    skip = "        if tl.max(col_ok.to(tl.int32), axis=0) > 0:\n"
    no_skip = _sub(loop, skip, "        if True:\n", "bsa.py's tile loop")
    indent = lambda s: "".join("    " + line if line.strip() else line for line in s.splitlines(True))  # noqa: E731
    b = (b[:loop_at] + "    if NO_SKIP:\n" + indent(no_skip) + "    else:\n" + indent(loop)
         + "    _t2 = _now(tl.sum(l_i, axis=0).to(tl.int32))\n" + b[loop_end:])
    b = _sub(b, "ok_m, stride_xs, NSPLIT, HALF, HALF_P, MERGE_M, NSPLIT_P, SPLIT_TILE)",
             "ok_m, stride_xs, NSPLIT, HALF, HALF_P, MERGE_M, NSPLIT_P, SPLIT_TILE,\n"
             "                         log_ptr, _t0, _t1, _t2, (pid * tl.num_programs(1) + kvh) * tl.num_programs(2) + split)",
             "bsa.py")
    (t / "bsa.py").write_text(b)
    o = (t / "ops.py").read_text()
    o = _sub(o, "PDL=use_pdl,", "PDL=use_pdl, log_ptr=tuning['log'], NO_SKIP=tuning.get('no_skip', False),", "ops.py")
    (t / "ops.py").write_text(o)


def _stats(x: torch.Tensor) -> list[float]:
    return [round(v, 2) for v in (x.min().item(), x.median().item(), x.max().item())]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("attention_timeline.json"))
    p.add_argument("--context", type=int, default=131072)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(SRC, tmp / "infinitehip")
    patch(tmp / "infinitehip")
    sys.path.insert(0, str(tmp))
    ih = importlib.import_module("infinitehip")
    assert Path(ih.__file__).parent == tmp / "infinitehip", "the patched copy must be the one imported"
    from infinitehip.attention.mask import geometry
    from infinitehip.attention.rope import RoPE
    from infinitehip.attention.stages import run_stages
    from infinitehip.attention.triton import ops, pdl
    from infinitehip.config import HiPConfig
    import triton.testing

    H, K, D, n = 32, 8, 128, 4
    cfg = HiPConfig.preset("paper", dense_threshold=0)
    rope = RoPE(RoPE.default(D, 500000.0).inv_freq.cuda())
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, a.context, K, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    kv_len = torch.tensor([a.context], device="cuda")
    mask = run_stages(q, k, geometry(kv_len - 1, 1, kv_len, cfg), cfg, rope, ops.score_chunks, keep_top=ops.keep_top)
    variants = [({}, True, False), ({}, False, False), ({}, True, True), ({"block_n": 128, "num_warps": 4}, True, False),
                ({"no_skip": True}, True, False), ({"no_skip": True, "num_stages": 3, "programs_per_sm": 2}, True, False),
                ({"no_skip": True, "num_stages": 3, "programs_per_sm": 1, "num_warps": 4}, True, False)]
    records = []
    for tuning, with_rope, use_pdl in variants:
        pdl.USE = use_pdl
        logs = [torch.zeros(4096, 6, dtype=torch.int64, device="cuda") for _ in range(n)]

        def steps():
            for log in logs:
                ops.attend_reused(q, k, v, mask, kv_len, cfg, rope if with_rope else None, D ** -0.5,
                                  tuning={**tuning, "log": log})
        steps()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            steps()
        us = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / n
        for log in logs:
            log.zero_()
        graph.replay()
        torch.cuda.synchronize()
        L = [log.cpu() for log in logs]
        L = [x[x[:, 0] > 0] for x in L]
        starts = [x[:, 0].min().item() for x in L]
        ends = [max(x[:, 3].max().item(), x[:, 4].max().item()) for x in L]
        x = L[1]
        rel = (x[:, :5] - x[:, 0].min()).double() / 1e3
        merged = x[:, 5] == 1
        rec = dict(context=a.context, tuning=tuning, rope=with_rope, pdl=use_pdl, us_per_step_in_graph=round(us, 2),
                   programs=len(x), span_us=round((ends[1] - starts[1]) / 1e3, 2),
                   gap_us=[round((starts[i + 1] - ends[i]) / 1e3, 2) for i in range(n - 1)],
                   start_us=_stats(rel[:, 0]), positions_us=_stats(rel[:, 1]), tiles_done_us=_stats(rel[:, 2]),
                   tile_time_us=_stats(rel[:, 2] - rel[:, 1]), arrived_us=_stats(rel[:, 3]),
                   merge_us=_stats(rel[merged, 4] - rel[merged, 3]), merged_at_us=_stats(rel[merged, 4]),
                   device=torch.cuda.get_device_name(), command="python scripts/attention_timeline.py")
        print(rec, flush=True)
        records.append(rec)
    a.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
