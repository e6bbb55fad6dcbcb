"""KV offload through the engine (on the CPU, also on a GPU machine): the same tokens and logits, bit for bit, as the all-on-device
path (on CPU the host store, its device alias and the block-cache pool are still separate
tensors exercising the same code), also with some layers' whole store in device memory
(``gpu_layers``); FP8 host storage measured against it. Planning: where layers go, and errors."""
import pytest
import torch

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache import CapacityError
from infinitehip.cache.kv import KVCache
from infinitehip.cache.offload import fp8_decode, fp8_encode
from infinitehip.cache.offload_kv import OffloadKVCache
from infinitehip.cache.offload_plan import OffloadConfig, longest_offload_context, plan_offload
from infinitehip.cache.offload_plan import GPU_USE, HOST_USE, layer_bytes_per_token
from infinitehip.engine import DecodeState, SamplingParams, decode_one_token, prefill, stream

PROMPT = 600      # past the built-in model's trained 512 tokens: sparse attention, adaptive RoPE
STEPS = 9         # crosses every refresh stage (every 8 / 4 / 2 steps)
CONFIG = HiPConfig.preset("tiny", refresh_intervals=(8, 4, 2))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request):
    return infinitehip.load("builtin", config=CONFIG, dtype=request.param, device="cpu")


@pytest.fixture(scope="module")
def bf16_model():
    return infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device="cpu")


def caches(model, batch=1, capacity=PROMPT + STEPS + 1, **offload):
    a = model.args
    on_device = KVCache(a.n_layers, batch, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    offloaded = OffloadKVCache(a.n_layers, batch, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype,
                               device="cpu", layer_configs=model.net.layer_configs, config=OffloadConfig(**offload))
    return on_device, offloaded


def run(model, tokens, cache, steps=STEPS):
    """Greedy: prefill logits then each decode step's, (1 + steps, V)."""
    logits = [prefill(model, tokens, cache, chunk_size=256)]
    state = DecodeState("hip")
    seqlens = torch.tensor([tokens.shape[1]], device=tokens.device)
    for _ in range(steps):
        logits.append(decode_one_token(model, logits[-1].argmax(-1), seqlens, cache, state,
                                       kv_limit=int(seqlens[0]) + 1))
        seqlens += 1
    return torch.cat(logits)


def prompt(n=PROMPT, seed=0):
    return torch.randint(3, 400, (1, n), generator=torch.Generator().manual_seed(seed))


def test_offload_logits_equal_on_device_bit_for_bit(model):
    on_device, cached = caches(model)                       # the default: through the page cache
    want = run(model, prompt(), on_device)
    assert torch.equal(run(model, prompt(), cached), want)
    _, in_place = caches(model, decode_cache=False)
    # On the GPU only the probe copies: keys at every 16th position (K only, 1/32 of the KV bytes).
    probes = sum(s.dk_probe.nbytes for s in in_place.stores)
    assert in_place.page_caches == [] and in_place.gpu_nbytes == probes < 0.035 * on_device.nbytes
    assert torch.equal(run(model, prompt(), in_place), want)
    stats = [c.stats for c in cached.page_caches]
    assert len(stats) == 6 and sum(s.hits for s in stats) > sum(s.misses for s in stats) > 0   # reused


def test_mixed_placement_equals_on_device_bit_for_bit(model):
    """Two layers' whole store in device memory, four offloaded: still the on-device logits."""
    on_device, mixed = caches(model, gpu_layers=2, decode_cache=True)
    assert mixed.gpu_layers == (0, 1)       # dense layer 0 (the largest page cache) first, then by index
    assert mixed.caches[0] is None and mixed.stores[0].on_device
    assert not mixed.stores[2].on_device and mixed.caches[2] is not None
    assert torch.equal(run(model, prompt(), mixed), run(model, prompt(), on_device))
    assert sum(c.stats.hits for c in mixed.page_caches) > 0 and len(mixed.page_caches) == 4


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_long_prefill_chunks_read_a_device_copy_of_each_layer(fp8, monkeypatch):
    """A prefill chunk of at least ``STAGE_QUERIES`` queries copies each host-stored layer's K/V (or
    FP8 codes) to device memory and reads the copy: the same kernels over the same values, so the
    logits of reading in place, bit for bit (on a GPU machine, on the GPU)."""
    from infinitehip.attention import paged
    from infinitehip.engine import layer_prefill

    monkeypatch.setattr(layer_prefill, "fits", lambda *a: False)   # chunk by chunk (below: layer by layer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device=device)
    a = model.args

    def offloaded():
        return OffloadKVCache(a.n_layers, 1, PROMPT + 4, a.n_kv_heads, a.head_dim, dtype=model.dtype,
                              device=device, layer_configs=model.net.layer_configs, config=OffloadConfig(fp8=fp8))

    tokens = prompt().to(device)
    want = run(model, tokens, offloaded(), steps=3)              # chunks of 256: fewer queries, read in place
    copies, staged = [], paged._staged
    monkeypatch.setattr(paged, "STAGE_QUERIES", 64)
    monkeypatch.setattr(paged, "_staged", lambda k, v, dev: copies.append(k.data_ptr()) or staged(k, v, dev))
    assert torch.equal(run(model, tokens, offloaded(), steps=3), want)
    assert len(copies) == 3 * 6        # 3 chunks (256, 256, 88 queries) x 6 host-stored layers; decode: none


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_layer_by_layer_prefill_equals_chunk_by_chunk(fp8, monkeypatch):
    """Offloaded, ``prefill`` runs every chunk through a layer before the next layer, holding that
    layer's pages in device memory: the chunk-by-chunk logits and store, bit for bit, also after a
    reused prefix (its pages copied into the held layer first)."""
    from infinitehip.engine import layer_prefill

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device=device)
    a, tokens = model.args, prompt().to(device)

    def offloaded():
        return OffloadKVCache(a.n_layers, 1, PROMPT + 4, a.n_kv_heads, a.head_dim, dtype=model.dtype,
                              device=device, layer_configs=model.net.layer_configs, config=OffloadConfig(fp8=fp8))

    by_chunk, by_layer = offloaded(), offloaded()
    with monkeypatch.context() as m:
        m.setattr(layer_prefill, "fits", lambda *args: False)
        want = prefill(model, tokens, by_chunk, chunk_size=256)
    held, hold = [], OffloadKVCache.hold
    monkeypatch.setattr(OffloadKVCache, "hold", lambda c, layer, filled=0: held.append(layer) or hold(c, layer, filled))
    assert torch.equal(prefill(model, tokens, by_layer, chunk_size=256), want)
    assert held == [0, 1, 2, 3, 4, 5, None]
    for s1, s2 in zip(by_chunk.stores, by_layer.stores):
        assert torch.equal(s1.k.view(torch.uint8), s2.k.view(torch.uint8))
    prefill(model, tokens[:, :256], reused := offloaded(), chunk_size=256)      # one chunk: chunk by chunk
    assert torch.equal(prefill(model, tokens, reused, chunk_size=256, start=256), want)
    if not fp8:
        on_device = KVCache(a.n_layers, 1, PROMPT + 4, a.n_kv_heads, a.head_dim, dtype=model.dtype, device=device)
        assert torch.equal(want, prefill(model, tokens, on_device, chunk_size=256))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_layer_by_layer_prefill_of_a_last_chunk_of_one_token(fp8, monkeypatch):
    """A prompt one token past a whole number of chunks ends in a 1-token chunk, which ``update``
    did not mirror into the held layer (it mirrored prefill writes of T > 1 only): the last token
    attended over a held page without its own key (NaN logits on the CPU). Found in review with
    513 tokens in chunks of 256, into row 1 of a 2-row cache as ``stream`` prefills."""
    from infinitehip.engine import layer_prefill

    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.bfloat16, device="cpu")
    a, tokens = model.args, prompt(513)

    def row1():
        return OffloadKVCache(a.n_layers, 2, 520, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu",
                              layer_configs=model.net.layer_configs,
                              config=OffloadConfig(fp8=fp8)).select(slice(1, 2))

    with monkeypatch.context() as m:
        m.setattr(layer_prefill, "fits", lambda *args: False)
        want = prefill(model, tokens, row1(), chunk_size=256)
    assert torch.equal(prefill(model, tokens, row1(), chunk_size=256), want)


def test_layer_by_layer_prefill_needs_room_for_the_hidden_states_and_one_layer(bf16_model, monkeypatch):
    """On a GPU: the prompt's hidden states (T x dim) and one layer's K/V of the row's capacity in
    half the free memory, else chunk by chunk; on the CPU always; never for a cache on the device."""
    from types import SimpleNamespace

    from infinitehip.engine import layer_prefill

    model, (on_device, offloaded) = bf16_model, caches(bf16_model)
    assert layer_prefill.fits(model, offloaded, 600) and not layer_prefill.fits(model, on_device, 600)
    a = model.args
    need = 600 * a.dim * 2 + 2 * offloaded.capacity * a.n_kv_heads * a.head_dim * 2      # bf16 hidden states, K + V
    gpu = SimpleNamespace(args=a, dtype=model.dtype, device=torch.device("cuda"))
    for free, ok in ((2 * need + 2, True), (2 * need - 2, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 1 << 40))
        assert layer_prefill.fits(gpu, offloaded, 600) == ok


def test_a_long_offloaded_prompt_without_room_for_layer_by_layer_says_so(bf16_model, monkeypatch, caplog):
    """Chunk by chunk is quadratic in an offloaded prompt (hours at a million tokens): when layer by
    layer has no room, prefill warns with the bytes it needed; a one-chunk prompt goes quietly."""
    from infinitehip.engine import layer_prefill

    model, (_, offloaded) = bf16_model, caches(bf16_model)
    monkeypatch.setattr(layer_prefill, "fits", lambda *args: False)
    with caplog.at_level("WARNING", logger="infinitehip.engine"):
        prefill(model, prompt()[:, :256], offloaded, chunk_size=256)
        assert not caplog.records
        prefill(model, prompt(), offloaded, chunk_size=256)
    need = layer_prefill.device_bytes(model, offloaded, prompt().shape[1]) / 2**30
    assert len(caplog.records) == 1
    assert f"prefilling {prompt().shape[1]:,} offloaded tokens chunk by chunk" in caplog.text
    assert f"({need:.1f} GiB)" in caplog.text and "free device memory, or shorten the prompt" in caplog.text


def test_offload_small_pages_and_evictions_stay_exact(bf16_model):
    """Pages smaller than a chunk and a cache just big enough: evictions, still the same logits."""
    model = bf16_model
    on_device, offloaded = caches(model, page=2, headroom=1.0, decode_cache=True)
    want = run(model, prompt(seed=1), on_device)
    assert torch.equal(run(model, prompt(seed=1), offloaded), want)
    assert sum(c.stats.evictions for c in offloaded.page_caches) > 0
    _, mixed = caches(model, page=2, headroom=1.0, decode_cache=True, gpu_layers=1)
    assert torch.equal(run(model, prompt(seed=1), mixed), want)
    assert sum(c.stats.evictions for c in mixed.page_caches) > 0


@pytest.mark.parametrize("page,stride,fp8", [(2, 16, False), (32, 16, False), (8, 8, True), (32, 16, True)])
def test_probe_copy_follows_the_store(bf16_model, page, stride, fp8):
    """After a prefill and decode steps, each host store's GPU probe copy holds its keys at every
    multiple of the stride (pages shorter and longer than the stride; FP8 pages re-encoded)."""
    _, offloaded = caches(bf16_model, batch=2, page=page, probe_stride=stride, fp8=fp8)
    for row in (1, 0):           # each row through a view of it (its store rows start at row * capacity)
        run(bf16_model, prompt(seed=4 + row), offloaded.select(slice(row, row + 1)), steps=5)
    for store in offloaded.stores:
        keys = store.dk.view(-1, *store.dk.shape[2:])[::stride]
        assert store.dk_probe.shape[0] == keys.shape[0] + 1                       # + the dump row
        assert torch.equal(store.dk_probe[:-1].view(torch.uint8), keys.view(torch.uint8))
        assert keys.float().abs().sum() > 0


def test_generate_offload_batch_same_tokens(bf16_model):
    model = bf16_model
    prompts = [prompt(560, seed=2)[0].tolist(), prompt(600, seed=3)[0].tolist()]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [(e.row, e.token) for e in stream(model, prompts, params, offload=False, chunk_size=256)]
    got = [(e.row, e.token) for e in stream(model, prompts, params, offload=True, chunk_size=256)]
    assert got == want
    mixed = OffloadConfig(gpu_layers=3)
    assert [(e.row, e.token) for e in stream(model, prompts, params, offload=mixed, chunk_size=256)] == want


class FP8RoundTripCache(KVCache):
    """An on-device cache whose pages go through the FP8 round trip on every write: what an FP8
    host store should give, computed without any offload code."""

    def update(self, layer, start, k, v, plan=None):
        kf, vf = super().update(layer, start, k, v, plan)
        for t in (kf, vf):
            pages = t.view(-1, 8, *t.shape[2:])                          # (B * capacity / 8, 8, K, D)
            pages.copy_(fp8_decode(*fp8_encode(pages), t.dtype))
        return kf, vf


def test_fp8_host_store_equals_fp8_round_trip():
    model = infinitehip.load("builtin", config=CONFIG, dtype=torch.float32, device="cpu")   # bf16 would round differently
    a = model.args
    on_device, offloaded = caches(model, fp8=True)
    simulated = FP8RoundTripCache(a.n_layers, 1, PROMPT + 4, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    want, got = run(model, prompt(), on_device, steps=3), run(model, prompt(), offloaded, steps=3)
    assert torch.equal(got, run(model, prompt(), simulated, steps=3))
    mixed = caches(model, fp8=True, gpu_layers=2)[1]     # FP8 codes in device memory, read in place
    assert torch.equal(run(model, prompt(), mixed, steps=3), got)
    # The accuracy effect of FP8 K/V on the prompt's logits (measured: docs/offload.md).
    assert (got[0] - want[0]).abs().max() / want[0].abs().max() < 0.15
    assert offloaded.host_nbytes < 0.55 * on_device.nbytes


def test_offload_errors(bf16_model):
    model = bf16_model
    a = model.args
    with pytest.raises(CapacityError, match="host memory.*fp8"):
        plan_offload(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1, capacity=10**6,
                     dtype=model.dtype, device=torch.device("cpu"), layer_configs=model.net.layer_configs,
                     free_host=1 << 20)
    # The dense backend reads the cache as stored: FP8 codes would reach SDPA (it used to crash there).
    with pytest.raises(ValueError, match="dense.*cannot read FP8 codes.*fp8=False"):
        next(stream(model, ["hello"], backend="dense", offload=OffloadConfig(fp8=True)))
    from infinitehip.engine.batch import BatchRunner
    with pytest.raises(ValueError, match="cannot read FP8 codes"):
        BatchRunner(model, max_batch=2, max_context=64, backend="dense", offload=OffloadConfig(fp8=True))


def plan(model, capacity, **kw):
    a = model.args
    return plan_offload(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1, capacity=capacity,
                        dtype=model.dtype, device=torch.device("cpu"), layer_configs=model.net.layer_configs, **kw)


def test_auto_placement_uses_the_gpu_only_when_host_memory_is_short(bf16_model):
    model, n, mib = bf16_model, 4096, 1 << 20
    layer = n * layer_bytes_per_token(model.args.n_kv_heads, model.args.head_dim, model.dtype)   # 2 MiB
    roomy = plan(model, n, free_host=100 * mib, free_gpu=100 * mib)
    assert roomy.gpu_layers == () and roomy.config.gpu_layers == 0 and roomy.host_bytes == 6 * layer
    short = plan(model, n, free_host=int(3.5 * layer / HOST_USE), free_gpu=12 * mib)   # host: 3 of 6 layers
    g = len(short.gpu_layers)
    assert 3 <= g < 6 and short.host_bytes <= 3 * layer and short.gpu_bytes <= GPU_USE * 12 * mib
    with pytest.raises(CapacityError, match="GPU"):     # as many as fit: one more does not
        plan(model, n, free_host=int(3.5 * layer / HOST_USE), free_gpu=int(GPU_USE * 12 * mib),
             config=OffloadConfig(gpu_layers=g + 1))
    a = model.args
    cache = OffloadKVCache(a.n_layers, 1, n, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu",
                           layer_configs=model.net.layer_configs, config=short.config)
    assert cache.gpu_layers == short.gpu_layers            # the plan's bytes are what is allocated
    assert (cache.host_nbytes, cache.gpu_nbytes) == (short.host_bytes, short.gpu_bytes)


def test_longest_context_uses_host_and_gpu(bf16_model):
    model, mib = bf16_model, 1 << 20
    a = model.args
    kw = dict(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1, dtype=model.dtype,
              device=torch.device("cpu"), layer_configs=model.net.layer_configs, free_host=16 * mib, free_gpu=16 * mib)
    host_only, _ = longest_offload_context(config=OffloadConfig(gpu_layers=0), **kw)
    n, p = longest_offload_context(**kw)
    assert n > 1.5 * host_only and p.gpu_layers and p.host_bytes <= HOST_USE * 16 * mib
    with pytest.raises(CapacityError):
        plan(model, n + 8, free_host=16 * mib, free_gpu=16 * mib)


def test_capacity_errors_name_both_memories(bf16_model):
    model, mib = bf16_model, 1 << 20
    with pytest.raises(CapacityError, match=r"host memory.*GPU memory.*tokens per sequence fit.*offload-fp8"):
        plan(model, 10**6, free_host=mib, free_gpu=mib)
    with pytest.raises(CapacityError, match="host memory.*offload-gpu-layers"):     # forced to the host
        plan(model, 10**6, free_host=mib, free_gpu=10**12, config=OffloadConfig(gpu_layers=0))
    with pytest.raises(CapacityError, match="GPU part.*fewer layers in GPU memory"):
        plan(model, 10**6, free_host=10**12, free_gpu=mib, config=OffloadConfig(gpu_layers=2))
    with pytest.raises(ValueError, match="gpu_layers=7 must be between 0 and 6"):
        plan(model, 1024, config=OffloadConfig(gpu_layers=7))


def test_layers_kept_on_a_gpu_less_device_count_against_host_memory(bf16_model):
    """Without a GPU (the device is the host) the "GPU-stored" layers' stores are in host memory
    too: the plan checked only the other layers' there, so gpu_layers=6 planned 5.7 GiB of KV into
    64 MiB of free memory (no CapacityError: the allocation itself then failed), and the longest
    context it gave for gpu_layers=3 was twice what fits."""
    model, mib = bf16_model, 1 << 20
    for g in (0, 3, 6):
        with pytest.raises(CapacityError, match=r"6 of 6 layers there; cpu is the host.*\. Use a shorter prompt"):
            plan(model, 10**6, free_host=64 * mib, config=OffloadConfig(gpu_layers=g))
    a = model.args
    kw = dict(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1, dtype=model.dtype,
              device=torch.device("cpu"), layer_configs=model.net.layer_configs, free_host=64 * mib)
    n, _ = longest_offload_context(config=OffloadConfig(gpu_layers=3), **kw)
    assert n == longest_offload_context(config=OffloadConfig(gpu_layers=0), **kw)[0]     # bf16: same bytes either way
    plan(model, n, free_host=64 * mib, config=OffloadConfig(gpu_layers=3))
    with pytest.raises(CapacityError):
        plan(model, n + 16, free_host=64 * mib, config=OffloadConfig(gpu_layers=3))


def test_fp8_hint_states_the_factor_of_the_models_dtype(model):
    """The capacity error said FP8 "halves" the host store; for a float32 model (the CPU default)
    it quarters it: one byte a value instead of 4."""
    mib, size = 1 << 20, torch.finfo(model.dtype).bits // 8
    host = {fp8: plan(model, 4096, free_host=10**12, config=OffloadConfig(fp8=fp8, gpu_layers=0)).host_bytes
            for fp8 in (False, True)}
    assert host[False] == size * host[True]
    cut = {2: "halves it", 4: "quarters it"}[size]
    for config in (OffloadConfig(), OffloadConfig(gpu_layers=0)):     # automatic placement, and forced to the host
        with pytest.raises(CapacityError, match=rf"offload-fp8: 1 byte a value instead of \w+'s {size}\) {cut}"):
            plan(model, 10**6, free_host=mib, free_gpu=mib, config=config)


def test_streaming_decode_through_the_page_cache_equals_on_device(bf16_model):
    """Streaming (sink + window, an empty mask made each step) fetches every step, its window
    moving (a prompt of 603 tokens: the first decode token opens no page): the page cache's
    logits are the on-device ones, bit for bit."""
    model, tokens = bf16_model, prompt(PROMPT + 3)
    on_device, cached = caches(model, capacity=PROMPT + STEPS + 4, page=4)
    logits = {}
    for name, cache in (("on_device", on_device), ("cached", cached)):
        out = [prefill(model, tokens, cache, chunk_size=256, backend="streaming")]
        state, seqlens = DecodeState("streaming"), torch.tensor([tokens.shape[1]])
        for _ in range(STEPS):
            out.append(decode_one_token(model, out[-1].argmax(-1), seqlens, cache, state,
                                        kv_limit=int(seqlens[0]) + 1))
            seqlens += 1
        logits[name] = torch.cat(out)
    assert torch.equal(logits["cached"], logits["on_device"])
    assert sum(c.stats.misses for c in cached.page_caches) > 0


def test_reused_masks_fetch_nothing(bf16_model, monkeypatch):
    """Only the decode steps that refresh a mask ask the page cache for units: their fetch makes
    the window's pages resident up to the next refresh (``mask.lookahead``), so the steps that
    reuse the mask read the pool as it is, through page openings (pages of 4 open at 604 and 608),
    with the on-device logits. A joining row's prefill through a row view reads in place (its
    plan could evict units of rows that reuse their masks)."""
    from infinitehip.cache import offload_kv

    needed, calls = offload_kv.needed_units, []
    monkeypatch.setattr(offload_kv, "needed_units", lambda *a, **kw: calls.append(1) or needed(*a, **kw))
    model, tokens = bf16_model, prompt(PROMPT + 1)       # decode positions 601..609
    on_device, cached = caches(model, capacity=PROMPT + STEPS + 2, page=4)
    logits, fetched = [prefill(model, tokens, cached, chunk_size=256)], []
    state, seqlens = DecodeState("hip"), torch.tensor([tokens.shape[1]])
    for _ in range(STEPS):
        before = len(calls)
        logits.append(decode_one_token(model, logits[-1].argmax(-1), seqlens, cached, state,
                                       kv_limit=int(seqlens[0]) + 1))
        fetched.append(len(calls) > before)
        seqlens += 1
    assert fetched == [CONFIG.refresh_stage(t) < CONFIG.n_stages for t in range(STEPS)]
    assert not all(fetched)
    assert torch.equal(torch.cat(logits), run(model, tokens, on_device))
    calls.clear()
    view = cached.select(slice(0, 1))
    prefill(model, tokens[:, :PROMPT + 1], view, chunk_size=PROMPT - 3)    # a last chunk of 4 queries
    assert view.is_view and not cached.is_view and calls == []
