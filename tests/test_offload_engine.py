"""KV offload through the engine (on the CPU, also on a GPU machine): the same tokens and logits, bit for bit, as the all-on-device
path (on CPU the host store, its device alias and the block-cache pool are still separate
tensors exercising the same code); FP8 host storage measured against it."""
import pytest
import torch

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache import CapacityError
from infinitehip.cache.kv import KVCache
from infinitehip.cache.offload import fp8_decode, fp8_encode
from infinitehip.cache.offload_kv import OffloadConfig, OffloadKVCache, plan_offload
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
    masks = []
    logits = [prefill(model, tokens, cache, chunk_size=256, masks=masks)]
    state = DecodeState("hip")
    state.admit(0, 1, masks)
    seqlens = torch.tensor([tokens.shape[1]])
    for _ in range(steps):
        logits.append(decode_one_token(model, logits[-1].argmax(-1), seqlens, cache, state,
                                       kv_limit=int(seqlens[0]) + 1))
        seqlens += 1
    return torch.cat(logits)


def prompt(n=PROMPT, seed=0):
    return torch.randint(3, 400, (1, n), generator=torch.Generator().manual_seed(seed))


def test_offload_logits_equal_on_device_bit_for_bit(model):
    on_device, offloaded = caches(model)
    want = run(model, prompt(), on_device)
    got = run(model, prompt(), offloaded)
    assert torch.equal(got, want)
    stats = [c.stats for c in offloaded.caches]
    assert sum(s.hits for s in stats) > sum(s.misses for s in stats) > 0     # the working set is reused


def test_offload_small_pages_and_evictions_stay_exact(bf16_model):
    """Pages smaller than a chunk and a cache just big enough: evictions, still the same logits."""
    model = bf16_model
    on_device, offloaded = caches(model, page=2, headroom=1.0)
    assert torch.equal(run(model, prompt(seed=1), offloaded), run(model, prompt(seed=1), on_device))
    assert sum(c.stats.evictions for c in offloaded.caches) > 0


def test_generate_offload_batch_same_tokens(bf16_model):
    model = bf16_model
    prompts = [prompt(560, seed=2)[0].tolist(), prompt(600, seed=3)[0].tolist()]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = [(e.row, e.token) for e in stream(model, prompts, params, offload=False, chunk_size=256)]
    got = [(e.row, e.token) for e in stream(model, prompts, params, offload=True, chunk_size=256)]
    assert got == want


class FP8RoundTripCache(KVCache):
    """An on-device cache whose pages go through the FP8 round trip on every write: what an FP8
    host store should give, computed without any offload code."""

    def update(self, layer, start, k, v):
        kf, vf = super().update(layer, start, k, v)
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
    with pytest.raises(ValueError, match="cuda_graph"):
        list(stream(model, ["hi"], SamplingParams(max_new_tokens=2), offload=True, cuda_graph=True))
