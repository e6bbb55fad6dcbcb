"""Run by ``test_gpu_compile.py`` in a process of its own, without the interpreter: the attention
calls below run on CPU tensors with every Triton launch captured instead of run, and each
captured kernel is then compiled for a Hopper GPU (sm90) by Triton's own compiler and ptxas,
with its GPU switches on (FAST, no UPCAST). The interpreter checks what a kernel computes, not
whether it compiles: a bfloat16 dot operand that ran under it failed to compile on the H200.
Prints one line per kernel variant, "ok" or the compiler's error; exits 1 if any failed."""
from __future__ import annotations

import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
            torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1",
            torch.float8_e4m3fn: "*fp8e4nv"}
_GPU_SWITCHES = dict(FAST=True, UPCAST=False, PDL=True)   # PDL: Hopper only
launches: list[tuple[JITFunction, dict]] = []


def _capture(self, grid):
    def launch(*args, **kwargs):
        bound = dict(zip(inspect.signature(self.fn).parameters, args))
        launches.append((self, {**bound, **kwargs}))
    return launch


def _compile(kernel: JITFunction, bound: dict) -> str:
    params = list(inspect.signature(kernel.fn).parameters)
    options = {k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound}
    bound.update({k: v for k, v in _GPU_SWITCHES.items() if k in bound})
    signature, constexprs = {}, {}
    for i, p in enumerate(params):
        v = bound[p]
        if "constexpr" in str(kernel.fn.__annotations__.get(p, "")):
            signature[p], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p] = _POINTER[v.dtype]
        elif isinstance(v, float):
            signature[p] = "fp32"
        else:
            signature[p] = "i64" if abs(int(v)) >= 2 ** 31 else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return "ok"


def _calls():
    """The launches of a prefill, a decode refresh and reuse, bf16 probes, the model's fused steps."""
    from infinitehip import HiPConfig, RoPE, hip_attention
    from infinitehip.attention.mask import geometry
    from infinitehip.attention.reference import pool_queries
    from infinitehip.attention.stages import first_stage_starts
    from infinitehip.attention.triton import ops
    from infinitehip.models.fused import argmax_triton, rms_norm_triton, silu_mul_triton

    cfg = HiPConfig.preset("tiny", chunk_sizes=(32, 8), stage_budgets=(None, 256), stage_strides=(2, 1),
                           refresh_intervals=(8, 4))
    rope = RoPE.default(128)
    q, k, v = (torch.randn(1, t, h, 128, dtype=torch.bfloat16) for t, h in ((70, 8), (900, 2), (900, 2)))
    hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")                         # prefill
    import infinitehip.attention.api as api
    api.check_reuse_span = lambda *a, **k: None   # launches compile here, nothing runs: masks hold zeros
    mask = None
    for stage in (0, cfg.n_stages - 1, cfg.n_stages):                                      # decode
        _, mask = hip_attention(q[:, -1:], k, v, config=cfg, rope=rope, mask=mask, refresh_stage=stage,
                                backend="triton")
    kv_len = torch.tensor([900])
    geo = geometry(kv_len - 70, 70, kv_len, cfg)
    qp, qv = pool_queries(q, geo, 1, rope)
    starts = first_stage_starts(900, 32, 1, 2, qp.shape[1])
    ops.score_chunks(qp, qv, k, starts, 32, geo, cfg, rope, levels=2, tuning=dict(precision="bf16"))
    scores = ops.score_chunks(qp, qv, k, starts, 32, geo, cfg, rope, tuning=dict(q16=True))
    ops.keep_top(starts, scores, 8, (32, 8), tuning=dict(radix=True))
    from infinitehip.attention.pages import KVPages                                      # offload's probe copy
    ops.score_chunks(qp, qv, k, starts, 32, geo, cfg, rope, levels=2,
                     pages=KVPages(8, probes=k[:, ::16].contiguous(), probe_stride=16))
    from infinitehip.attention.triton.kv_write import write_decode_tokens, write_rows
    from infinitehip.cache.offload import HostKVStore
    for fp8 in (False, True):                                                            # offload decode write
        store = HostKVStore(8, 8, 2, 128, torch.bfloat16, fp8=fp8, probe_stride=16)
        write_decode_tokens(store, None, torch.tensor([3]), torch.tensor([0]), k[:, 0], v[:, 0])
    from infinitehip.attention.triton import page_cache                                 # offload page cache
    from infinitehip.cache.gpu_pages import PageCache
    pool, units = PageCache(store, 16), torch.arange(8)
    page_cache.plan_fetch_cuda(pool, units)
    page_cache.copy_units_cuda(store.dk, store.dk_scale, store.dv, store.dv_scale, pool.k, pool.v, units, units,
                               torch.ones(1, dtype=torch.int32))
    page_cache.needed_units_cuda(mask.starts, geometry(kv_len - 1, 1, kv_len, cfg), cfg, 8, 2, nb=4)
    qkv = torch.randn(2, 12, 128, dtype=torch.bfloat16)
    write_rows(torch.zeros(9, 2, 128, dtype=torch.bfloat16), torch.zeros(9, 2, 128, dtype=torch.bfloat16),
               torch.tensor([1, 5]), qkv[:, 8:10], qkv[:, 10:])
    x = torch.randn(3, 4096, dtype=torch.bfloat16)
    rms_norm_triton(x, torch.ones(4096, dtype=torch.bfloat16), 1e-5)
    silu_mul_triton(x)
    argmax_triton(x.float())                                                             # greedy decoding
    from infinitehip.models import gemv                                                  # decode's linear layers
    w = torch.randn(40, 2048, dtype=torch.bfloat16)
    gemv.linear(x[:, :2048], w, norm=(x[0, :2048], 1e-5), triton_kernel=True)
    gemv.linear(x, w, w[0, :40], silu=True, residual=torch.zeros(3, 40, dtype=torch.bfloat16), triton_kernel=True)
    gemv.linear(x[:, :2048], w, residual=torch.zeros(3, 40, dtype=torch.bfloat16), triton_kernel=True,
                launch=gemv.Launch(split=4))
    cache = torch.zeros(8, 16, dtype=torch.bfloat16)                                     # q/k/v into the cache
    gemv.linear(x[:, :2048], w, triton_kernel=True, scatter=gemv.Scatter(cache, cache.clone(), torch.arange(3), 8))


def main() -> int:
    JITFunction.__getitem__ = _capture
    from infinitehip.attention import api
    api.triton_interpreted = lambda: True   # CPU tensors may take the Triton path: its launches are captured, not run
    _calls()
    failed, seen = 0, set()
    for kernel, bound in launches:
        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in bound.items()
                                                if not isinstance(v, torch.Tensor))))
        if key in seen:
            continue
        seen.add(key)
        try:
            result = _compile(kernel, bound)
        except Exception as e:   # the compiler's message, innermost cause last
            failed += 1
            result, cause = "FAILED", e
            while cause is not None:
                result += "\n  " + str(cause).strip()[-800:]
                cause = cause.__cause__
        print(f"{kernel.fn.__name__}: {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
