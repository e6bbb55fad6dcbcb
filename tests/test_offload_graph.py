"""Offloaded decode in CUDA graphs: the T = 1 store write (no ``unique``, no host sync) leaves the
same store as the general path, bf16 and FP8; decode over the full capacity (what a graph reads)
gives the on-device logits; the page cache's decode step is sync-free. The GPU tests (skipped
without CUDA) generate greedily with offload + CUDA graphs and compare with eager and on-GPU."""
import pytest
import torch

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache import offload_kv
from infinitehip.cache.kv import KVCache
from infinitehip.cache.offload_kv import OffloadKVCache, touched_pages
from infinitehip.cache.offload_plan import OffloadConfig
from infinitehip.engine import DecodeState, SamplingParams, decode_one_token, prefill, stream
from infinitehip.attention.mask import geometry
from infinitehip.attention.stages import n_groups

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CONFIG = HiPConfig.preset("tiny", refresh_intervals=(8, 4, 2))
B, CAP, K, D, LAYERS = 3, 64, 2, 8, 2


def small_cache(**offload) -> OffloadKVCache:
    return OffloadKVCache(LAYERS, B, CAP, K, D, dtype=torch.bfloat16, device="cpu",
                          layer_configs=[CONFIG] * LAYERS, config=OffloadConfig(**offload))


def write_and_decode(cache, steps=12):
    """A 20-token prefill per row, then decode writes (T = 1) of every row, and of rows 1-2
    through a ``select`` view; rows start mid-page, at a page's last slot and on a fresh page."""
    g = torch.Generator().manual_seed(0)
    kv = lambda n, t: [torch.randn(n, t, K, D, generator=g).bfloat16() for _ in range(2)]   # noqa: E731
    for layer in range(LAYERS):
        cache.update(layer, torch.zeros(B, dtype=torch.long), *kv(B, 20))
    starts = torch.tensor([20, 23, 32])
    for s in range(steps):
        view, first = (cache, 0) if s % 3 else (cache.select(slice(1, 3)), 1)
        for layer in range(LAYERS):
            view.update(layer, starts[first:] + s, *kv(B - first, 1))
    return cache


def store_bytes(cache):
    out = []
    for s in cache.stores:
        out += [s.k, s.v] + ([s.dk_scale, s.dv_scale] if s.fp8 else [])
    return [t.view(torch.uint8) for t in out]


def test_touched_pages_one_token_per_row_equals_unique():
    blocks = torch.tensor([[3], [17], [40], [41]])               # one page per row, rows ascending
    ids, inv = touched_pages(blocks)
    want_ids, want_inv = blocks.flatten().unique(return_inverse=True)
    assert torch.equal(ids, want_ids) and torch.equal(inv, want_inv)


@pytest.mark.parametrize("gpu_layers", [0, 1])
def test_fp8_decode_write_equals_general_path(monkeypatch, gpu_layers):
    """FP8 re-encodes the touched page whole: skipping ``unique`` for T = 1 changes nothing."""
    fast = write_and_decode(small_cache(fp8=True, gpu_layers=gpu_layers))
    monkeypatch.setattr(offload_kv, "touched_pages", lambda b: b.flatten().unique(return_inverse=True))
    general = write_and_decode(small_cache(fp8=True, gpu_layers=gpu_layers))
    assert all(torch.equal(a, b) for a, b in zip(store_bytes(fast), store_bytes(general)))


def test_bf16_decode_write_equals_on_device_cache():
    offloaded = write_and_decode(small_cache(gpu_layers=1))
    on_device = write_and_decode(KVCache(LAYERS, B, CAP, K, D, dtype=torch.bfloat16, device="cpu", block_size=8))
    for layer in range(LAYERS):
        for got, want in zip(offloaded._logical(layer), (on_device.k[layer], on_device.v[layer])):
            assert torch.equal(got, want.view(B, CAP, K, D))


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make the ops that sync with the host or give data-dependent shapes raise (Python level)."""
    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"{name} on the decode path: a host sync / data-dependent shape")
        return f

    def guard():
        for name in ("unique", "nonzero", "item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, refuse(name))
        for name in ("unique", "nonzero", "masked_select"):
            monkeypatch.setattr(torch, name, refuse(name))
    return guard


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_write_and_reads_are_sync_free(no_host_sync, fp8):
    cache = write_and_decode(small_cache(fp8=fp8, gpu_layers=1), steps=1)
    k1 = torch.randn(B, 1, K, D).bfloat16()
    no_host_sync()
    for layer in range(LAYERS):
        cache.update(layer, torch.tensor([30, 31, 40]), k1, k1)
        source = offload_kv._LayerSource(cache, layer)
        source.logical(CAP)
        source.dense(CAP)          # the dense fallback of short contexts (FP8: decodes every page)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_page_cache_decode_step_is_sync_free(no_host_sync, fp8):
    """decode_cache=True: the decode write (into the store and the resident units) and the fetch
    of a step's units (dedupe, LRU victims, masked copy, table) run without a host sync."""
    cache = write_and_decode(small_cache(fp8=fp8, decode_cache=True), steps=1)
    k1 = torch.randn(B, 1, K, D).bfloat16()
    seqlens = torch.tensor([31, 32, 41])
    geo = geometry(seqlens - 1, 1, seqlens, CONFIG)
    G, nsel = n_groups(CONFIG, K), CONFIG.n_selected
    starts = torch.randint(0, 4, (B, G, 1, nsel), generator=torch.Generator().manual_seed(1)) * 2
    no_host_sync()
    for _ in range(2):
        for layer in range(LAYERS):
            cache.update(layer, seqlens - 1, k1, k1)
            pool_k, _, pages = offload_kv._LayerSource(cache, layer).fetch(starts, geo, CONFIG)
            assert pages.table.shape == (B, CAP // 8, K) and pool_k.shape[1:] == (8, 1, D)


def test_full_capacity_decode_equals_on_device():
    """What a graph replays: every step reads the cache at full capacity (kv_limit None)."""
    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device="cpu")
    a = model.args
    tokens = torch.randint(3, 400, (1, 600), generator=torch.Generator().manual_seed(0))
    logits = []
    for cache in (KVCache(a.n_layers, 1, 768, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu"),
                  OffloadKVCache(a.n_layers, 1, 768, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu",
                                 layer_configs=model.net.layer_configs, config=OffloadConfig(gpu_layers=2))):
        state = DecodeState("hip")
        out = [prefill(model, tokens, cache, chunk_size=256)]
        seqlens = torch.tensor([600])
        for _ in range(5):
            out.append(decode_one_token(model, out[-1].argmax(-1), seqlens, cache, state))
            seqlens += 1
        logits.append(torch.cat(out))
    assert torch.equal(logits[0], logits[1])


def test_cuda_graph_offload_needs_cuda():
    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):   # not refused for being offloaded
        list(stream(model, ["hi"], SamplingParams(max_new_tokens=2), offload=True, cuda_graph=True))


def greedy_two_rows(config=CONFIG):
    """tokens(offload, cuda_graph) -> the (row, token) events of a 24-step greedy bf16 run of two
    prompts (744 and 700 tokens: capacity 768, a multiple of KVCache's 256-token blocks, so on-GPU
    and offloaded graphs read the same shapes; 24 steps cross every refresh stage)."""
    model = infinitehip.load("builtin", config=config, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (744, 700)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)

    def tokens(offload, cuda_graph):
        return [(e.row, e.token) for e in stream(model, prompts, params, offload=offload, cuda_graph=cuda_graph,
                                                 chunk_size=256)]
    return tokens


@needs_cuda
def test_offload_cuda_graph_generate_same_tokens():
    """Offload + CUDA graphs gives the tokens of offload eager and of the on-GPU cache (graph and eager)."""
    tokens = greedy_two_rows()
    on_gpu_graph = tokens(False, True)
    assert tokens(True, True) == on_gpu_graph                                   # graph vs graph
    assert tokens(OffloadConfig(gpu_layers=2), True) == on_gpu_graph          # GPU-stored layers too
    assert tokens(True, False) == tokens(False, False)                         # eager vs eager
    assert on_gpu_graph == tokens(False, False)                                # graph vs eager
    fp8 = OffloadConfig(fp8=True)     # bf16: re-encoding the tail page again (graph warm-up) is exact
    assert tokens(fp8, True) == tokens(fp8, False)


@needs_cuda
def test_page_cache_cuda_graph_generate_same_tokens():
    """decode_cache=True in CUDA graphs: the on-GPU tokens (graph), and its own eager tokens;
    FP8 (the pool holds decoded pages, so not the in-place FP8 logits): graph gives eager's tokens."""
    tokens = greedy_two_rows()
    page_cache = OffloadConfig(decode_cache=True)
    want = tokens(False, True)
    assert tokens(page_cache, True) == want
    assert tokens(page_cache, False) == want
    assert tokens(OffloadConfig(decode_cache=True, gpu_layers=2), True) == want
    fp8 = OffloadConfig(fp8=True, decode_cache=True)
    assert tokens(fp8, True) == tokens(fp8, False)


@needs_cuda
def test_refresh_lag_cuda_graph_same_tokens():
    """refresh_lag: graphs whose pruning runs on a side stream, beside the next steps, give the
    tokens of eager decode (which prunes in the step), on the GPU and through the page cache
    (refreshes every 2 steps, a lag of 5: two in flight at once)."""
    tokens = greedy_two_rows(CONFIG.replace(refresh_lag=5))
    want = tokens(False, False)
    assert tokens(False, True) == want
    page_cache = OffloadConfig(decode_cache=True)
    assert tokens(page_cache, True) == want
    assert tokens(page_cache, False) == want
