"""Continuous batching (engine/batch.py): requests joining, leaving and sharing decode steps get
exactly the tokens a run of their own gives (engine.stream), on a tiny random checkpoint."""
import pytest
import torch

pytest.importorskip("transformers")
from checkpoints import make_checkpoint  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip.cache import CapacityError  # noqa: E402
from infinitehip.engine import BatchRunner, PrefixCache, SamplingParams, stream  # noqa: E402

LENGTHS = (5, 40, 170, 300, 12, 90, 260, 420)    # some beyond sink + window (160): hip prunes for real
ADMIT_AT = (0, 0, 1, 3, 5, 6, 9, 12)              # the step at which each request arrives
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama"), config="tiny")


def prompt(n, seed=None):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed or n)).tolist()


def alone(model, ids, params=GREEDY, backend="hip"):
    """The reference: the engine's own generation for this one prompt."""
    return [e.token for e in stream(model, [ids], params, backend=backend, chunk_size=64)]


def runner(model, backend="hip", **kw):
    kw = {"max_batch": 4, "max_context": 512, "chunk_size": 64, **kw}
    return BatchRunner(model, backend=backend, **kw)


def drive(r, arrivals, max_steps=500):
    """arrivals: {step: [(key, ids, params)]}. Steps until idle; returns {key: [tokens]}, {key: [events]}
    (requests added before the call are keyed by their request id)."""
    keys, tokens, events = {}, {}, {}
    for step in range(max_steps):
        for key, ids, params in arrivals.get(step, []):
            keys[r.add(ids, params)] = key
        for e in r.step():
            key = keys.get(e.request, e.request)
            tokens.setdefault(key, []).append(e.token)
            events.setdefault(key, []).append(e)
        if not r.has_work and step >= max(arrivals, default=0):
            return tokens, events
    raise AssertionError("the runner did not finish")


@pytest.mark.parametrize("backend", ["hip", "dense", "streaming"])
def test_requests_joining_at_different_steps_match_alone(model, backend):
    prompts = [prompt(n) for n in LENGTHS]
    arrivals = {}
    for i, (ids, at) in enumerate(zip(prompts, ADMIT_AT)):
        arrivals.setdefault(at, []).append((i, ids, GREEDY))
    r = runner(model, backend)
    got, _ = drive(r, arrivals)
    assert [got[i] for i in range(8)] == [alone(model, p, backend=backend) for p in prompts]
    # 8 requests over 4 slots: they really shared decode steps, and freed slots were reused
    assert r.stats.batched_steps > 0 and r.stats.max_decoding == 4 and r.stats.finished == 8
    assert r.n_active == 0 and r.n_free == 4


def test_cancel_frees_the_slot_for_a_waiting_request(model):
    r = runner(model, max_batch=1)
    first = r.add(prompt(30), SamplingParams(max_new_tokens=100, ignore_eos=True))
    second = r.add(prompt(50), GREEDY)
    gone = r.add(prompt(60), GREEDY)
    for _ in range(3):
        assert {e.request for e in r.step()} == {first}          # one slot: the others wait
    assert r.cancel(gone) and r.n_waiting == 1                    # a waiting request just leaves
    assert r.cancel(first) and not r.cancel(first) and r.n_active == 0
    tokens = []
    while r.has_work:
        events = r.step()
        assert {e.request for e in events} <= {second}
        tokens += [e.token for e in events]
    assert tokens == alone(model, prompt(50)) and r.stats.cancelled == 2


def test_seeded_sampling_does_not_depend_on_neighbours(model):
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    neighbours = [(1, prompt(90), SamplingParams(max_new_tokens=12, temperature=1.0, seed=1, ignore_eos=True)),
                  (2, prompt(20), SamplingParams(max_new_tokens=6, temperature=0.7, ignore_eos=True)),  # unseeded
                  (3, prompt(200), GREEDY)]
    got, _ = drive(runner(model), {0: neighbours[:2], 1: [(0, prompt(40), sampled)], 2: neighbours[2:]})
    want = alone(model, prompt(40), sampled)
    assert got[0] == want
    assert want != alone(model, prompt(40)), "sampling at temperature 1 should differ from greedy"
    got_again, _ = drive(runner(model), {0: [(0, prompt(40), sampled)]})
    assert got_again[0] == want


def test_long_prefill_is_interleaved_with_decoding(model):
    """A long prompt is prefilled one chunk per step while running requests keep decoding."""
    r = runner(model, chunk_size=32)
    running = r.add(prompt(20), SamplingParams(max_new_tokens=40, ignore_eos=True))
    r.step()
    long = r.add(prompt(420), GREEDY)
    steps_until_long_starts = 0
    while True:
        events = r.step()
        steps_until_long_starts += 1
        assert [e.request for e in events if e.request == running] == [running]   # one token every step
        first = [e.token for e in events if e.request == long]
        if first:
            break
    assert steps_until_long_starts == -(-420 // 32)                 # one chunk per step
    tokens, _ = drive(r, {})
    assert first + tokens[long] == alone(model, prompt(420)) and r.stats.batched_steps > 0


def test_stop_strings_and_lengths_are_per_request(model):
    text = model.tokenizer.decode(alone(model, prompt(70)))
    stop = text[3:5]
    with_stop = SamplingParams(max_new_tokens=10, ignore_eos=True, stop=(stop,))
    _, events = drive(runner(model), {0: [(0, prompt(70), with_stop), (1, prompt(80), GREEDY)]})
    assert "".join(e.text for e in events[0]) == text[:text.index(stop)]
    assert events[0][-1].finish_reason == "stop" and events[1][-1].finish_reason == "length"
    assert [e.token for e in events[1]] == alone(model, prompt(80))


def test_shared_document_is_prefilled_once(model):
    doc = prompt(300, seed=1)
    cache = PrefixCache(block_tokens=64, min_tokens=64)
    r = runner(model, prefix_cache=cache)
    questions = [doc + prompt(9, seed=2), doc + prompt(13, seed=3)]
    first, _ = drive(r, {0: [(0, questions[0], GREEDY)]})
    prefilled = r.stats.prefilled_tokens
    second, _ = drive(r, {0: [(1, questions[1], GREEDY)]})
    assert [first[0], second[1]] == [alone(model, q) for q in questions]
    assert cache.stats.hits == 1 and r.stats.reused_tokens == 256           # the document's whole blocks
    assert r.stats.prefilled_tokens - prefilled == len(questions[1]) - 256
    assert r.stats.prefill_seconds_saved > 0


def test_capacity_is_checked_up_front(model):
    with pytest.raises(CapacityError, match="lower max_batch"):
        BatchRunner(model, max_batch=8, max_context=1 << 40)
    r = runner(model)
    with pytest.raises(ValueError, match="capacity of 512 tokens"):
        r.add(prompt(500), SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="empty prompt"):
        r.add([], GREEDY)


@pytest.mark.parametrize("bad", [dict(prefill_budget=0), dict(prefill_budget=-1), dict(chunk_size=64.0),
                                 dict(max_context=512.0), dict(prefill_budget=32.5)])
def test_sizes_are_checked_at_construction(model, bad):
    """A prefill_budget < 1 never prefilled (the request waited forever, has_work stayed True) and
    a float chunk_size failed in every step's prefill: refused when the runner is made."""
    with pytest.raises(ValueError, match="need integers"):
        runner(model, **bad)



def test_token_ids_outside_the_vocabulary_are_refused_at_add(model):
    """Such a prompt was queued, and its prefill's IndexError in a later step failed that step for
    every request holding a slot (the server aborts them all): refused by ``add`` instead."""
    r = runner(model)
    running = r.add(prompt(30), SamplingParams(max_new_tokens=6, ignore_eos=True))
    tokens = [e.token for e in r.step()]
    for bad in (prompt(10) + [model.args.vocab_size], [-1] + prompt(10)):
        with pytest.raises(ValueError, match="vocabulary"):
            r.add(bad, GREEDY)
    rest, _ = drive(r, {})
    assert tokens + rest[running] == alone(model, prompt(30), SamplingParams(max_new_tokens=6, ignore_eos=True))


def test_add_takes_integer_token_ids_only(model):
    """int() made text "123" the ids [1, 2, 3] and cut 1.5 to 1: a request for another prompt, silently."""
    r = runner(model)
    for bad in ("123", [1.5, 2], 7):
        with pytest.raises(ValueError, match="token ids \\(integers\\).*encode text first"):
            r.add(bad, GREEDY)
    assert r.n_waiting == 0
    r.add(torch.tensor([5, 6, 7]), GREEDY)                   # an integer tensor's items still pass
    assert r.n_waiting == 1


def test_abort_drops_running_requests_and_keeps_waiting_ones(model):
    r = runner(model, max_batch=2)
    ids = [r.add(prompt(n), GREEDY) for n in (10, 20, 30)]
    r.step()
    assert sorted(r.abort()) == ids[:2] and r.n_active == 0 and r.n_waiting == 1
    tokens, _ = drive(r, {})
    assert tokens == {ids[2]: alone(model, prompt(30))}


def test_offloaded_slots_give_the_same_tokens_and_share_documents(model):
    """The batch runner on the offloaded KV cache (host store + GPU page cache; on CPU two separate
    stores exercising the same code): the same tokens as on the device, a shared document reused."""
    doc = prompt(320, seed=7)
    asks = [doc + prompt(n, seed=n) for n in (6, 9)] + [prompt(200, seed=3)]
    arrivals = {0: [(0, asks[0], GREEDY)], 4: [(2, asks[2], GREEDY)], 12: [(1, asks[1], GREEDY)]}
    on_device, _ = drive(runner(model, prefix_cache=PrefixCache(block_tokens=32, min_tokens=64)), arrivals)
    cache = PrefixCache(block_tokens=32, min_tokens=64)
    r = runner(model, offload=True, prefix_cache=cache)
    assert type(r.cache).__name__ == "OffloadKVCache"
    offloaded, _ = drive(r, arrivals)
    assert offloaded == on_device
    assert cache.stats.reused_tokens >= 288       # the second question read the document from the cache


def test_fp8_offloaded_slots_match_alone(model):
    """FP8 host KV under batching: a slot reused after a longer request, and rows prefilling in
    chunks that end mid-page while others decode, give the tokens of an FP8 run of their own (an
    FP8 page re-encoded around what an earlier request left past a row's end, or around a parked
    row's throwaway token, used to re-quantize the row's prompt)."""
    from infinitehip.cache.offload_plan import OffloadConfig

    fp8 = OffloadConfig(fp8=True)
    prompts = [prompt(n) for n in LENGTHS]
    arrivals = {}
    for i, (ids, at) in enumerate(zip(prompts, ADMIT_AT)):
        arrivals.setdefault(at, []).append((i, ids, GREEDY))
    got, _ = drive(runner(model, offload=fp8, chunk_size=60), arrivals)
    want = [[e.token for e in stream(model, [p], GREEDY, chunk_size=60, offload=fp8)] for p in prompts]
    assert [got[i] for i in range(8)] == want


def test_a_parked_row_writes_its_throwaway_token_past_its_prompt_pages(model, monkeypatch):
    """A row prefilling in chunks that end mid-page (60 tokens, 8-token pages) takes a throwaway
    token in each decode step of its neighbours: on the next page (64), so the FP8 page holding the
    end of its prompt (56-63) is not re-encoded around it (which re-quantized positions 56-59).
    (Chunk by chunk; layer by layer: test_runner_layer_prefill.py.)"""
    from infinitehip.cache.offload_plan import OffloadConfig
    from infinitehip.engine import layer_prefill

    monkeypatch.setattr(layer_prefill, "fits", lambda *args: False)

    r = runner(model, offload=OffloadConfig(fp8=True), chunk_size=60, prefill_budget=60)
    r.add(prompt(40), SamplingParams(max_new_tokens=20, ignore_eos=True))
    r.step()                                                  # the neighbour prefills and decodes
    r.add(prompt(170), GREEDY)
    r.step()                                                  # 60 prompt tokens of slot 1, a decode step
    assert r._prefilling is not None and r._prefilling.filled == 60 and list(r._decoding) == [0]
    c = r.cache
    for s in c.stores:
        row = s.dk.view(c.batch, c.capacity, *s.dk.shape[2:])[1].float()     # slot 1's positions
        assert (row[56:60] != 0).any() and not row[60:64].any() and row[64].any()


@pytest.mark.parametrize("layered", [False, True], ids=["chunk_by_chunk", "layer_by_layer"])
def test_a_prompt_ending_in_its_slots_last_fp8_page_is_stored_as_alone(model, layered, monkeypatch):
    """510 prompt tokens in a 512-token FP8 slot, chunks of 101: after 505 the next page would be
    past the slot, so the parked row's throwaway token went to 505, and the FP8 page 504-511 was
    re-encoded around it (row 504 re-quantized: stored K/V other than a run of its own). Now decode
    waits that round. Layer by layer, every position up to the prompt's end is written in some
    layer from the first step: no page past the prompt, so decode waits for the whole prompt."""
    from infinitehip.cache.offload_plan import OffloadConfig
    from infinitehip.engine import layer_prefill

    if not layered:
        monkeypatch.setattr(layer_prefill, "fits", lambda *args: False)

    def stored_prompt(with_neighbour: bool):
        r = runner(model, offload=OffloadConfig(fp8=True), chunk_size=101, prefill_budget=101)
        if with_neighbour:
            r.add(prompt(40), SamplingParams(max_new_tokens=30, ignore_eos=True))
            r.step()
        r.add(prompt(510), SamplingParams(max_new_tokens=2, ignore_eos=True))   # decoding after: its slot stays its own
        slot = None
        while slot is None or r._prefilling is not None:   # until its prompt is in
            r.step()
            slot = r._prefilling.slot if slot is None and r._prefilling is not None else slot
        return r, slot, r.stats.decode_steps

    (a, slot_a, steps), (b, slot_b, _) = stored_prompt(True), stored_prompt(False)
    assert steps >= (1 if layered else 4)   # the neighbour decoded beside the first chunks
    for sa, sb in zip(a.cache.stores, b.cache.stores):
        for x, y in ((sa.dk, sb.dk), (sa.dv, sb.dv)):
            ra = x.view(a.cache.batch, a.cache.capacity, *x.shape[2:])[slot_a, :510]
            rb = y.view(b.cache.batch, b.cache.capacity, *y.shape[2:])[slot_b, :510]
            assert torch.equal(ra.float(), rb.float())


@pytest.mark.parametrize("fp8", [False, True])
def test_a_slot_reused_after_abort_reads_nothing_of_its_last_request(model, fp8, monkeypatch):
    """abort() leaves the GPU page cache of an offloaded KV as it was: units of the dropped rows'
    pages stay resident (one step failed halfway, some layers having written their token). They
    are never served to the slot's next request: every prefill write drops its pages' resident
    units (``PageCache.invalidate``) and every decode write updates them in place. So the next
    requests get exactly the tokens and logits of a fresh runner."""
    from infinitehip.cache.offload_plan import OffloadConfig
    from infinitehip.engine import batch

    logits, now = [], {}          # now: the runner being run, and its request ids' keys
    real = batch.decode_one_token

    def recorded(*a, **kw):   # each decode step's logits of the rows decoding, by request key
        out = real(*a, **kw)
        logits.append({now["keys"][q.rid]: out[slot].clone() for slot, q in now["runner"]._decoding.items()})
        return out
    monkeypatch.setattr(batch, "decode_one_token", recorded)

    def run(r, arrivals):
        logits.clear()
        now.update(runner=r, keys={})
        tokens = {}
        for step in range(500):
            for key, ids in arrivals.get(step, []):
                now["keys"][r.add(ids, GREEDY)] = key
            for e in r.step():
                tokens.setdefault(now["keys"][e.request], []).append(e.token)
            if not r.has_work and step >= max(arrivals):
                return tokens, list(logits)
        raise AssertionError("the runner did not finish")

    config = OffloadConfig(fp8=fp8)
    fresh = lambda: runner(model, max_batch=2, offload=config, prefill_budget=64)   # noqa: E731
    arrivals = {0: [("b", prompt(200, seed=5))], 2: [("d", prompt(90, seed=6))]}
    want = run(fresh(), arrivals)

    r = fresh()
    now.update(runner=r, keys={r.add(prompt(330, seed=1), SamplingParams(max_new_tokens=100, ignore_eos=True)): "a"})
    for _ in range(9):                                  # 6 prefill rounds, then decoding
        r.step()
    now["keys"][r.add(prompt(250, seed=2), GREEDY)] = "c"
    r.step()                                            # slot 1 prefilling, slot 0 decoding
    update = type(r.cache).update

    def failing(cache, layer, start, k, v, plan=None):   # the decode write of the last layer fails
        if k.shape[1] == 1 and layer == cache.n_layers - 1:
            raise RuntimeError("injected")
        return update(cache, layer, start, k, v, plan)
    monkeypatch.setattr(type(r.cache), "update", failing)
    with pytest.raises(RuntimeError, match="injected"):
        r.step()
    monkeypatch.setattr(type(r.cache), "update", update)
    assert len(r.abort()) == 2 and r.n_free == 2
    resident = [int((c.owner >= 0).sum()) for c in r.cache.page_caches]
    assert r.cache.page_caches and min(resident) > 0        # the dropped rows' units are still there
    (tokens, steps), (want_tokens, want_steps) = run(r, arrivals), want
    assert tokens == want_tokens and len(steps) == len(want_steps)
    for got_step, want_step in zip(steps, want_steps):
        assert got_step.keys() == want_step.keys() and all(torch.equal(got_step[k], want_step[k]) for k in got_step)


def test_graphs_with_a_refresh_lag_are_refused(model):
    """Pruning beside decode needs graphs of one phase; the runner's rows are at several: refused
    up front (before its cache is allocated), and left off by the server's default (None)."""
    import dataclasses

    lagged = dataclasses.replace(model, hip=model.hip.replace(refresh_lag=2))
    with pytest.raises(ValueError, match="cuda_graph with HiPConfig.refresh_lag"):
        BatchRunner(lagged, cuda_graph=True, max_batch=1, max_context=512)
    assert BatchRunner(lagged, cuda_graph=None, max_batch=1, max_context=512)._graphs is None   # auto: off


class _EagerGraphs:
    """GraphDecoder's contract on the CPU: each step decodes at full capacity with the state it was given."""

    def __init__(self, model, cache, state):
        self.model, self.cache, self.state = model, cache, state

    def __call__(self, tokens, seqlens):
        from infinitehip.engine.generate import decode_one_token

        return decode_one_token(self.model, tokens, seqlens, self.cache, self.state)


def test_graphs_after_an_abort_step_the_runners_new_state(model, monkeypatch):
    """abort() gave the runner a new DecodeState, but its GraphDecoder kept stepping the old one:
    a request admitted after it continued the dropped request's refresh schedule (and its mask)."""
    from infinitehip.engine import batch

    monkeypatch.setattr(batch, "GraphDecoder", _EagerGraphs)
    r = runner(model, max_batch=2, cuda_graph=True)
    r.add(prompt(300, seed=1), SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(11):
        r.step()
    assert len(r.abort()) == 1
    got, _ = drive(r, {0: [("b", prompt(280, seed=2), GREEDY)]})
    assert got["b"] == alone(model, prompt(280, seed=2)) and r._graphs.state is r.state
