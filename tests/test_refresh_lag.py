"""Deferred mask refreshes (``HiPConfig.refresh_lag``): a decode step prunes for a later step and
attends with the mask it pruned ``refresh_lag`` steps ago, so on a GPU the pruning can run beside
decode. What must hold: the schedule (which step prunes, which step's mask is attended), no key
lost while a mask waits (full budget == dense at every step), offload == on-device bit for bit
with fetches only where a mask takes effect, and rows at different steps get what they get alone."""
import pytest
import torch
from checkpoints import make_checkpoint

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache.kv import KVCache
from infinitehip.cache.offload_kv import OffloadKVCache
from infinitehip.cache.offload_plan import OffloadConfig
from infinitehip.engine import BatchRunner, DecodeState, SamplingParams, decode_one_token, prefill, stream
from infinitehip.models import AttentionCall

pytest.importorskip("transformers")
TINY = HiPConfig.preset("tiny", refresh_intervals=(8, 4, 2))
LAG = TINY.replace(refresh_lag=2)
PROMPT, STEPS = 600, 12     # past the built-in model's 512 trained tokens: sparse, adaptive RoPE


def test_config_bounds_the_lag():
    assert HiPConfig().refresh_lag == 0 and LAG.refresh_lag == 2
    for bad in (-1, 1.0, True, None):
        with pytest.raises(ValueError, match="refresh_lag"):
            TINY.replace(refresh_lag=bad)
    with pytest.raises(ValueError, match=r"window=9.*refresh_lag, 8 \+ 2.*lower refresh_lag"):
        TINY.replace(refresh_lag=2, window=9)
    # A schedule repeating every 32.8M steps (coprime intervals) would take the lag's bookkeeping minutes.
    with pytest.raises(ValueError, match="repeat only every 32,842,151 steps"):
        HiPConfig(refresh_intervals=(331, 317, 313), refresh_lag=1, window=2048)
    HiPConfig(refresh_intervals=(331, 317, 313), window=2048)   # without a lag nothing tabulates it


def test_schedule():
    """Only a row's first step prunes for itself; a refresh step prunes for ``lag`` steps later.
    Refresh j of a row (``refreshes_upto``) is kept in slot j % ``pending_slots``: the refreshes
    not yet in use plus the newest in use."""
    state = DecodeState("hip", steps=[0, 2, 3, 4, 6])
    assert state.refresh_stages(LAG) == [0, 3, 3, 3, 3]
    assert state.deferred_stages(LAG) == [3, 2, 3, 1, 2]
    assert state.taking_effect(LAG) == [False, False, False, True, True]   # refreshes of steps 2 and 4
    state.steps = [4, 4]
    assert state.taking_effect(LAG) is True and state.deferred_stages(LAG) == 1
    assert DecodeState("hip", steps=[0, 2]).refresh_stages(TINY) == [0, 2]   # lag 0: at once, as before
    assert [TINY.refreshes_upto(t) for t in (0, 1, 2, 3, 4, 9, 16, 17)] == [0, 0, 1, 1, 2, 4, 8, 8]
    paper = HiPConfig()
    assert [paper.replace(refresh_lag=lag).pending_slots for lag in (0, 8, 9, 24)] == [1, 2, 3, 4]
    assert TINY.replace(refresh_lag=5).pending_slots == 4      # refreshes at 2, 4 in flight, 6 made, 0 in use



def test_pending_slots_is_worked_out_once_per_schedule(monkeypatch):
    """Eager decode asks for ``pending_slots`` twice a step; working it out scans the schedule's
    whole period (lcm of the intervals: 2,100 steps for (60, 25, 7), milliseconds a step), so it
    is done once per schedule, not again every step."""
    from infinitehip import config as config_module

    config = HiPConfig(refresh_intervals=(60, 25, 7), refresh_lag=8)
    slots = config.pending_slots
    monkeypatch.setattr(config_module, "_refresh_counts", lambda *a: pytest.fail("the period scanned again"))
    assert config.replace(budget=1024).pending_slots == slots == 5   # 4 in 8 steps (7k, 7k + 7, 25m, 60n), 1 in use


def builtin(config, dtype=torch.float32):
    return infinitehip.load("builtin", config=config, dtype=dtype, device="cpu")


def caches(model, batch=1, capacity=PROMPT + STEPS + 1):
    a = model.args
    on_device = KVCache(a.n_layers, batch, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    offloaded = OffloadKVCache(a.n_layers, batch, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype,
                               device="cpu", layer_configs=model.net.layer_configs, config=OffloadConfig(page=4))
    return on_device, offloaded


def decode(model, cache, steps=STEPS, on_step=None):
    """Greedy from a fixed prompt: (1 + steps, V) logits; ``on_step(t, state)`` after each step."""
    tokens = torch.randint(3, 400, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    logits, state, seqlens = [prefill(model, tokens, cache, chunk_size=256)], DecodeState("hip"), torch.tensor([PROMPT])
    for t in range(steps):
        logits.append(decode_one_token(model, logits[-1].argmax(-1), seqlens, cache, state,
                                       kv_limit=int(seqlens[0]) + 1))
        seqlens += 1
        if on_step:
            on_step(t, state)
    return torch.cat(logits)


@pytest.mark.parametrize("lag", [2, 5])
def test_a_pruned_mask_is_attended_lag_steps_later(lag):
    """Every step attends with the mask pruned ``lag`` steps before where one was (refreshes every
    2 steps: with a lag of 5 two more are in flight), else with the previous step's. Until the
    first one takes effect the logits are lag 0's, which uses step 2's mask at step 2 already."""
    config = TINY.replace(refresh_lag=lag)
    model, live, made, slots = builtin(config), {}, {}, config.pending_slots

    def record(t, state):
        live[t] = [m.starts.clone() for m in state.masks]
        if t == 0 or config.refresh_stage(t) < config.n_stages:
            made[t] = [kept[config.refreshes_upto(t) % slots].starts.clone() for kept in state.pruned]

    lagged = decode(model, caches(model)[0], on_step=record)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))   # noqa: E731
    for t in range(1, STEPS):
        want = made[t - lag] if t > lag and t - lag in made else live[t - 1]
        assert same(live[t], want), t
    assert not same(made[2], made[0]) and same(made[0], live[0])
    at_once = decode(builtin(TINY), caches(model)[0])
    torch.testing.assert_close(lagged[:3], at_once[:3], atol=1e-4, rtol=0)   # prefill, steps 0 and 1
    assert (lagged[3] - at_once[3]).abs().max() > 1e-2


def test_full_budget_lag_loses_no_key(tmp_path):
    """A budget covering every key and exact RoPE: hip equals dense at every step, also while
    masks wait 5 steps (their window stays anchored where they were pruned)."""
    full = HiPConfig.preset("tiny", stage_budgets=(None, 1024, 512), budget=512, dense_layer_budget=512,
                            rope_prune="exact", rope_attend="exact", refresh_intervals=(8, 4, 2), refresh_lag=5)
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config=full, device="cpu")
    tokens = torch.randint(3, 300, (1, 420), generator=torch.Generator().manual_seed(2))
    a = model.args
    cache = lambda: KVCache(a.n_layers, 1, 512, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")  # noqa: E731
    ref = model.net(tokens, torch.zeros(1, dtype=torch.long), cache(), AttentionCall("dense"))
    kv, state = cache(), DecodeState("hip")
    prefill(model, tokens[:, :400], kv, backend="hip", chunk_size=128)
    for t in range(400, 420):
        logits = decode_one_token(model, tokens[:, t], torch.tensor([t]), kv, state)
        torch.testing.assert_close(logits, ref[:, t], atol=1e-4, rtol=0)
    assert all(m is not None for m in state.masks)


@pytest.mark.parametrize("lag", [2, 5])
def test_offload_equals_on_device_and_fetches_where_masks_take_effect(monkeypatch, lag):
    """bf16, pages of 4 (page openings between fetches): the page cache gives the on-device logits
    bit for bit, fetching on the first step and where a deferred mask takes effect, not where it
    is pruned (the pruning probes the host store in place)."""
    from infinitehip.cache import offload_kv

    needed, calls = offload_kv.needed_units, []
    monkeypatch.setattr(offload_kv, "needed_units", lambda *a, **kw: calls.append(1) or needed(*a, **kw))
    config = TINY.replace(refresh_lag=lag)
    model = builtin(config, torch.bfloat16)
    on_device, cached = caches(model)
    fetched = []
    got = decode(model, cached, on_step=lambda t, s: fetched.append(len(calls)))
    assert torch.equal(got, decode(model, on_device))
    steps = [t for t, (a, b) in enumerate(zip([0] + fetched, fetched)) if b > a]
    assert steps == [0] + list(range(2 + lag, STEPS, 2))


def test_rows_at_different_steps_match_alone(tmp_path):
    """Continuous batching with a lag: requests joining at different steps (so their refreshes and
    the steps their masks take effect differ) get the tokens they get alone."""
    # tiny refreshes every 4 steps: a lag of 6 keeps two refreshes in flight
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config=HiPConfig.preset("tiny", refresh_lag=6),
                             device="cpu")
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (300, 170, 420)]
    greedy = SamplingParams(max_new_tokens=14, ignore_eos=True)
    alone = [[e.token for e in stream(model, [p], greedy, chunk_size=64)] for p in prompts]
    r = BatchRunner(model, max_batch=3, max_context=512, chunk_size=64)
    got = {}
    for step in range(200):
        if step in (0, 3, 6):
            r.add(prompts[step // 3], greedy)
        for e in r.step():
            got.setdefault(e.request, []).append(e.token)
        if not r.has_work and step > 6:
            break
    assert [got[i] for i in range(3)] == alone and r.stats.batched_steps > 0


def test_graph_keys_with_a_lag():
    """Which CUDA graph a step replays (decided on the host; no GPU needed): rows that prune for
    later or take masks in at different steps use different slots, so they step eagerly."""
    from types import SimpleNamespace

    from infinitehip.engine.cuda_graph import GraphDecoder

    decoder = object.__new__(GraphDecoder)      # only _key's inputs, no CUDA
    decoder.model, decoder.lag = SimpleNamespace(hip=HiPConfig(refresh_lag=24)), 24
    keys = {}
    for steps in ([8, 8], [8, 24], [5, 7], [32, 32], [0, 3]):
        decoder.state = DecodeState("hip", steps=steps)
        keys[tuple(steps)] = decoder._key()
    assert keys == {(8, 8): (2, False), (8, 24): None, (5, 7): (3, False), (32, 32): (0, True), (0, 3): None}
