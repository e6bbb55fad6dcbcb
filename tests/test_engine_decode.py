"""Decode at full cache capacity (what CUDA graphs capture), checked on the CPU: the dense step
equals the step over exactly the written keys, the FlashAttention varlen call gets the arguments
its contract needs, no backend syncs with the host, and a layer stays within its kernel budget."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import infinitehip.models.llama as llama
from infinitehip.attention import RoPE
from infinitehip.cache import KVCache
from infinitehip.config import HiPConfig
from infinitehip.models import AttentionCall, ModelArgs, Transformer

ARGS = ModelArgs(architecture="LlamaForCausalLM", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 head_dim=16, intermediate_size=96, norm_eps=1e-5, max_position_embeddings=4096,
                 trained_context=4096)
LENGTHS = (170, 95)   # past the tiny preset's sink + window (160) in row 0: hip and streaming prune


def make_net(dtype=torch.float32):
    torch.manual_seed(0)
    net = Transformer(ARGS, RoPE.default(ARGS.head_dim, 10000.0), HiPConfig.preset("tiny")).eval().to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def prefilled(net, backend, dtype=torch.float32, capacity=512):
    """A two-row cache holding rows of LENGTHS random tokens, prefilled one row at a time."""
    cache = KVCache(ARGS.n_layers, len(LENGTHS), capacity, ARGS.n_kv_heads, ARGS.head_dim, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(LENGTHS):
        tokens = torch.randint(0, ARGS.vocab_size, (1, n), generator=g)
        net(tokens, torch.zeros(1, dtype=torch.long), cache.select(slice(b, b + 1)), AttentionCall(backend), kv_limit=n)
    return cache


def decode(net, cache, backend, kv_limit):
    """One decode step of both rows: (B, V) logits."""
    tokens, seqlens = torch.tensor([[7], [11]]), torch.tensor(LENGTHS)
    call = AttentionCall(backend, masks=[None] * ARGS.n_layers)
    return net(tokens, seqlens, cache, call, kv_limit=kv_limit)[:, -1]


def test_full_capacity_dense_decode_equals_decode_over_the_written_keys():
    net = make_net()
    sliced = decode(net, prefilled(net, "dense"), "dense", kv_limit=max(LENGTHS) + 1)
    full = decode(net, prefilled(net, "dense"), "dense", kv_limit=None)
    torch.testing.assert_close(full, sliced, atol=1e-5, rtol=0)


def fake_flash_varlen(calls):
    """FlashAttention's varlen forward, written out: q (total_q, H, D), k/v (total_k, K, D);
    sequence b has queries cu_q[b]:cu_q[b+1] and keys cu_k[b]:cu_k[b] + seqused_k[b]."""
    def flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, seqused_k):
        calls.append(dict(cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), used=seqused_k.tolist(), max_q=max_q,
                          max_k=max_k, dtypes={cu_q.dtype, cu_k.dtype, seqused_k.dtype}, q=tuple(q.shape)))
        group = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for b in range(len(cu_q) - 1):
            keys = slice(int(cu_k[b]), int(cu_k[b]) + int(seqused_k[b]))
            kb, vb = k[keys].repeat_interleave(group, 1), v[keys].repeat_interleave(group, 1)   # (n, H, D)
            qb = q[int(cu_q[b]):int(cu_q[b + 1])]                                               # (1, H, D)
            out[int(cu_q[b]):int(cu_q[b + 1])] = F.scaled_dot_product_attention(
                qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), scale=scale).transpose(0, 1)
        return out, None, None, None, None
    return flash


def test_flash_decode_passes_each_rows_valid_key_count(monkeypatch):
    """The GPU path's arguments, checked against the varlen contract with a CPU stand-in."""
    net = make_net()
    sliced = decode(net, prefilled(net, "dense"), "dense", kv_limit=max(LENGTHS) + 1)
    calls = []
    monkeypatch.setattr(llama, "_flash_ok", lambda *a: True)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", fake_flash_varlen(calls))
    cache = prefilled(net, "dense")
    full = decode(net, cache, "dense", kv_limit=None)
    torch.testing.assert_close(full, sliced, atol=1e-5, rtol=0)
    assert len(calls) == ARGS.n_layers
    cap = cache.capacity
    assert calls[0] == dict(cu_q=[0, 1, 2], cu_k=[0, cap, 2 * cap], used=[n + 1 for n in LENGTHS], max_q=1,
                            max_k=cap, dtypes={torch.int32}, q=(2, ARGS.n_heads, ARGS.head_dim))


class NoHostSync(TorchDispatchMode):
    """Fails on what a CUDA graph can't capture: reading a device value on the host (``item``,
    ``bool``, ``int``), or an op whose output shape depends on the data. (Not seen on the CPU: an
    explicit ``.cpu()`` / ``.tolist()``.)"""

    FORBIDDEN = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                 "_unique2", "unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN:
            raise AssertionError(f"{name}: a host sync / data-dependent shape inside the decode step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["dense", "hip", "streaming"])
def test_full_capacity_decode_step_has_no_host_sync(backend):
    net = make_net()
    cache = prefilled(net, backend)
    decode(net, cache, backend, kv_limit=None)    # hip: the first step makes the masks later steps reuse
    tokens, seqlens = torch.tensor([[3], [5]]), torch.tensor(LENGTHS) + 1
    call = AttentionCall(backend, masks=[None] * ARGS.n_layers, kernel="reference")
    with NoHostSync():
        net(tokens, seqlens, cache, call)
        if backend == "hip":   # a step that reuses the masks (what most graph replays are)
            net(tokens, seqlens + 1, cache, AttentionCall(backend, masks=call.masks, refresh_stage=net.hip.n_stages,
                                                           kernel="reference"))


VIEWS = {"view", "_unsafe_view", "split", "split_with_sizes", "slice", "transpose", "permute", "expand", "select",
         "unsqueeze", "squeeze", "t", "as_strided", "alias", "detach", "empty", "empty_like", "unbind", "reshape",
         "lift_fresh", "chunk", "view_as", "empty_strided", "flatten", "narrow"}


class KernelCount(TorchDispatchMode):
    """Kernel-level aten ops outside attention and the cache: composite ops are decomposed, views
    are free. ``rms_norm`` counts as one (on CUDA it is one fused kernel)."""

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name != "rms_norm":
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if name not in VIEWS and not self.paused:
            self.n += 1
        with torch.utils._python_dispatch._disable_current_modes():
            return func(*args, **kwargs)


def kernels_per_layer(backend, monkeypatch, setup=lambda monkeypatch: None):
    counts = []
    for n_layers in (1, 2):
        setup(monkeypatch)
        args = ModelArgs(**{**ARGS.__dict__, "n_layers": n_layers})
        torch.manual_seed(0)
        net = Transformer(args, RoPE.default(ARGS.head_dim, 10000.0), HiPConfig.preset("tiny")).eval()
        net = net.to(torch.bfloat16)
        cache = KVCache(n_layers, 1, 256, ARGS.n_kv_heads, ARGS.head_dim, dtype=torch.bfloat16, device="cpu")
        mode = KernelCount()

        def paused(fn):
            def run(*a, **k):
                mode.paused = True
                try:
                    return fn(*a, **k)
                finally:
                    mode.paused = False
            return run
        monkeypatch.setattr(llama, "full_cache_decode", paused(llama.full_cache_decode))
        monkeypatch.setattr(KVCache, "update", paused(KVCache.update))
        attention = KVCache.attention
        monkeypatch.setattr(KVCache, "attention", lambda self, layer: paused(attention(self, layer)))
        step = lambda: net(torch.tensor([[5]]), torch.tensor([40]), cache, AttentionCall(backend, masks=[None] * n_layers))  # noqa: E731
        step()        # warm: one-time work (cached tables) is no layer's
        with mode:
            step()
        monkeypatch.undo()
        counts.append(mode.n)
    return counts[1] - counts[0]


@pytest.mark.parametrize("backend,budget", [("dense", 13), ("hip", 10)])
def test_decode_layer_kernel_budget(backend, budget, monkeypatch):
    """bf16 decode, per layer outside attention and the cache write: 2 RMSNorms, the q/k/v and
    gate/up GEMMs, o and down GEMMs accumulating into the residual, SiLU, the gate product, and
    for dense the joint q/k RoPE (5); hip's cache write is the q/k/v projection's (here two row
    copies after it; the GEMV's epilogue on CUDA). Before the folds: dense 42, hip 25."""
    assert kernels_per_layer(backend, monkeypatch) <= budget


needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="runs CUDA's GEMV on CPU tensors: the "
                                       "Triton interpreter (a GPU runs it for real in test_engine_gpu)")


def force_gemv(monkeypatch):
    """Decode's linear layers through the Triton GEMV (CUDA's path) on the CPU, under the interpreter."""
    from infinitehip.models import gemv
    monkeypatch.setattr(gemv, "fusable", lambda x, weight: x.numel() // x.shape[-1] <= gemv.MAX_ROWS)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["dense", "hip"])
def test_decode_through_the_fused_gemv_equals_the_composed_layers(backend, dtype, monkeypatch):
    """CUDA decode runs each linear layer as one Triton GEMV with RMSNorm / SiLU * up / the residual
    add folded in (models/gemv.py): the logits of a decode step equal the PyTorch layers' within
    the rounding of the dtype (bf16: GEMV sums in another order; the interpreter truncates)."""
    net = make_net(dtype)
    want = decode(net, prefilled(net, backend, dtype), backend, kv_limit=None).float()
    force_gemv(monkeypatch)
    got = decode(net, prefilled(net, backend, dtype), backend, kv_limit=None).float()
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


@needs_interpreter
def test_fused_gemv_decode_layer_is_four_launches_and_no_torch_kernels(monkeypatch):
    """With the GEMV, a hip decode layer outside attention and the cache write issues its four
    linear layers as Triton launches (q/k/v with RMSNorm, o + residual, gate/up with RMSNorm,
    down with SiLU * up + residual) and no PyTorch kernel (CUDA's path: 9 launches before)."""
    from infinitehip.models import gemv

    launches = []

    def launch(grid):
        def run(*args, **kwargs):     # the interpreter's own tensor ops are not the model's kernels
            launches.append(grid)
            with torch.utils._python_dispatch._disable_current_modes():
                return gemv_kernel[grid](*args, **kwargs)
        return run
    gemv_kernel = gemv._gemv_kernel
    counted = type("Counted", (), {"__getitem__": lambda self, grid: launch(grid)})()

    def setup(monkeypatch):
        monkeypatch.setattr(gemv, "_gemv_kernel", counted)
        force_gemv(monkeypatch)
    assert kernels_per_layer("hip", monkeypatch, setup) == 0
    # Two steps (warm-up, counted) of the 1- and 2-layer nets: 4 per layer and each net's LM head.
    assert len(launches) == 2 * (4 * (1 + 2) + 2 * 1)


@pytest.mark.parametrize("offloaded", [False, True], ids=["on_device", "offload"])
def test_decode_cache_write_is_two_kernels_per_layer(offloaded):
    """Where a decode step writes is planned once per forward pass (``plan_write``, the same for
    every layer); each layer's write is then two row copies (K and V), on the device or into the
    host store (bf16, read in place), and for the host store the key into its GPU probe copy (a
    dump row unless the token is at a multiple of the stride). Without the plan: 3 and 12."""
    from infinitehip.cache.offload_kv import OffloadKVCache
    from infinitehip.cache.offload_plan import OffloadConfig

    K, D = ARGS.n_kv_heads, ARGS.head_dim
    kw = dict(dtype=torch.bfloat16, device="cpu")
    in_place = OffloadConfig(decode_cache=False)
    cache = (OffloadKVCache(2, 2, 256, K, D, layer_configs=[HiPConfig.preset("tiny")] * 2, config=in_place, **kw)
             if offloaded
             else KVCache(2, 2, 256, K, D, **kw))
    start = torch.tensor([40, 97])
    plan = cache.plan_write(start, 1)
    k, v = torch.randn(2, 1, K, D).bfloat16(), torch.randn(2, 1, K, D).bfloat16()
    mode = KernelCount()
    with mode:
        kf, vf = cache.update(1, start, k, v, plan=plan)
    assert mode.n == (3 if offloaded else 2)
    assert torch.equal(kf[[0, 1], start], k[:, 0]) and torch.equal(vf[[0, 1], start], v[:, 0])
