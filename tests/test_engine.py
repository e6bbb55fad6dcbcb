"""Engine: chunked prefill, decode with mask reuse, sampling, batches, streaming, memory planning, CLI."""
import pytest
import torch
from checkpoints import hf_model, make_checkpoint

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache import CapacityError, KVCache, kv_bytes, plan_kv_cache
from infinitehip.engine import DecodeState, SamplingParams, decode_one_token, prefill, stream
from infinitehip.engine.sampling import StopChecker, sample
from infinitehip.models import AttentionCall

pytest.importorskip("transformers")
# The tiny preset with a budget that covers every key and exact RoPE: hip must then equal dense.
FULL = HiPConfig.preset("tiny", stage_budgets=(None, 1024, 512), budget=512, dense_layer_budget=512,
                        rope_prune="exact", rope_attend="exact")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine"), "qwen3")


@pytest.fixture(scope="module")
def model(ckpt):
    return infinitehip.load(ckpt, config="tiny")


@pytest.fixture(scope="module")
def long_model(ckpt):
    """Trained length set past the test contexts: RoPE stays exact, whichever chunk a query is in.

    (With "auto" RoPE modes the mode is chosen per call from the call's key count, so a chunk
    ending within the trained length and one-shot prefill past it legitimately differ.)
    """
    return infinitehip.load(ckpt, config=HiPConfig.preset("tiny", model_context_length=4096))


def new_cache(model, batch=1, capacity=512):
    a = model.args
    return KVCache(a.n_layers, batch, capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")


def ids(n, seed=0, batch=1):
    return torch.randint(3, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def full_logits(model, tokens, backend="dense"):
    return model.net(tokens, torch.zeros(tokens.shape[0], dtype=torch.long), new_cache(model, tokens.shape[0]),
                     AttentionCall(backend))


def test_greedy_generation_matches_transformers(ckpt, model):
    prompt = "the quick brown fox"
    p = torch.tensor([model.tokenizer.encode(prompt)])
    with torch.no_grad():
        ref = hf_model(ckpt).generate(p, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, p.shape[1]:]
    for backend in ("dense", "hip"):
        events = list(stream(model, [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True), backend=backend))
        assert [e.token for e in events] == ref.tolist(), backend
        text = infinitehip.generate(model, prompt, max_new_tokens=12, ignore_eos=True, backend=backend)
        assert text == model.tokenizer.decode(ref.tolist())


@pytest.mark.parametrize("backend,chunk", [("dense", 7), ("hip", 64), ("streaming", 32)])
def test_chunked_prefill_equals_one_shot(long_model, backend, chunk):
    model = long_model
    tokens = ids(300)   # longer than sink + window (160): hip prunes for real
    one = prefill(model, tokens, c1 := new_cache(model), backend=backend, chunk_size=4096)
    many = prefill(model, tokens, c2 := new_cache(model), backend=backend, chunk_size=chunk)
    torch.testing.assert_close(many, one, atol=1e-4, rtol=0)
    torch.testing.assert_close(c2.k[1], c1.k[1], atol=1e-5, rtol=0)
    if backend == "dense":
        torch.testing.assert_close(one, full_logits(model, tokens)[:, -1], atol=1e-4, rtol=0)


def test_a_prompt_past_the_dense_cutoff_is_sparse_in_every_chunk(ckpt):
    """Chunked prefill attends as one call over the whole prompt would: past the cutoff sparsely in
    every chunk (deciding per chunk made the chunks under the cutoff dense: other logits than one
    call's, and twice the prefill time of a 70K prompt on a GPU), under it densely."""
    model = infinitehip.load(ckpt, config=HiPConfig.preset("tiny", model_context_length=4096, dense_threshold=400))
    tokens = ids(500, seed=4)
    one = prefill(model, tokens, new_cache(model), chunk_size=4096)
    torch.testing.assert_close(prefill(model, tokens, new_cache(model), chunk_size=64), one, atol=1e-4, rtol=0)
    # A batch runner gives the prompt a few chunks at a time, with the whole prompt's length.
    prefill(model, tokens[:, :192], cache := new_cache(model), chunk_size=64, prompt_len=500)
    torch.testing.assert_close(prefill(model, tokens, cache, chunk_size=64, start=192), one, atol=1e-4, rtol=0)
    short = tokens[:, :380]   # under the cutoff: exact in every chunk
    torch.testing.assert_close(prefill(model, short, new_cache(model), chunk_size=64),
                               prefill(model, short, new_cache(model), backend="dense", chunk_size=64),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prompt_len=100 must be the whole prompt's length, at least the 500"):
        prefill(model, tokens, new_cache(model), prompt_len=100)


@pytest.mark.parametrize("backend", ["dense", "hip"])
def test_decode_step_equals_full_forward(model, backend):
    tokens = ids(120, seed=1)   # within sink + window: hip is exact
    cache, state = new_cache(model), DecodeState(backend)
    prefill(model, tokens[:, :100], cache, backend=backend, chunk_size=32)
    ref = full_logits(model, tokens)
    for t in range(100, 120):
        logits = decode_one_token(model, tokens[:, t - 1 + 1], torch.tensor([t]), cache, state)
        torch.testing.assert_close(logits, ref[:, t], atol=1e-4, rtol=0)


def test_hip_long_context_full_budget_matches_dense(ckpt):
    # every decode step refreshes from stage 0: between refreshes, keys that slid out of the
    # window since the last refresh are not attended (the price of mask reuse)
    model = infinitehip.load(ckpt, config=FULL.replace(refresh_intervals=(1, 1, 1)))
    tokens = ids(420, seed=2)
    ref = full_logits(model, tokens)
    torch.testing.assert_close(full_logits(model, tokens, "hip"), ref, atol=1e-4, rtol=0)
    # decode with a fresh full-budget mask each step still equals dense
    cache, state = new_cache(model), DecodeState("hip")
    prefill(model, tokens[:, :400], cache, backend="hip", chunk_size=128)
    for t in range(400, 420):
        logits = decode_one_token(model, tokens[:, t], torch.tensor([t]), cache, state)
        torch.testing.assert_close(logits, ref[:, t], atol=1e-4, rtol=0)
    assert all(m is not None for m in state.masks)


def test_hip_long_context_sparse_runs_and_reuses_masks(model):
    tokens = ids(400, seed=3)
    cache, state = new_cache(model), DecodeState("hip")
    logits = prefill(model, tokens, cache, backend="hip", chunk_size=128)
    seqlen = torch.tensor([400])
    for step in range(6):
        masks_before = list(state.masks)
        logits = decode_one_token(model, logits.argmax(-1), seqlen + step, cache, state)
        assert torch.isfinite(logits).all()
        if model.hip.refresh_stage(step) == model.hip.n_stages:   # no refresh: the mask is reused as is
            assert all(torch.equal(a.starts, b.starts) for a, b in zip(masks_before, state.masks))
    dense = full_logits(model, tokens)[:, -1]
    sparse = full_logits(model, tokens, "hip")[:, -1]
    assert not torch.allclose(dense, sparse)   # it really is sparse beyond sink + window


def test_decode_prunes_from_scratch_at_its_first_step(model):
    """A new row's first decode step runs every pruning stage with its own query (not the
    prompt's pooled last block), then the refresh schedule counts from there."""
    tokens = ids(400, seed=5)
    cache, state = new_cache(model), DecodeState("hip")
    logits = prefill(model, tokens, cache, backend="hip", chunk_size=128)
    state.admit(0, 1)
    assert state.steps == [0] and state.refresh_stages(model.hip) == 0
    decode_one_token(model, logits.argmax(-1), torch.tensor([400]), cache, state)
    assert state.steps == [1] and all(m is not None for m in state.masks)
    fresh = DecodeState("hip")   # the same step from an empty state: the same masks
    decode_one_token(model, logits.argmax(-1), torch.tensor([400]), cache, fresh)
    assert all(torch.equal(a.starts, b.starts) for a, b in zip(state.masks, fresh.masks))


def _greedy_rows(model, prompts, admit_at, n_new, capacity=512):
    """Greedy decode in one batch; row b's prompt is prefilled into its slot at step admit_at[b]
    (before that the slot decodes a throwaway prompt), as continuous batching does."""
    B = len(prompts)
    cache, state = new_cache(model, B, capacity), DecodeState("hip")
    filler = ids(350, seed=99)[0]
    seqlens, logits, out = torch.zeros(B, dtype=torch.long), [None] * B, [[] for _ in range(B)]

    def start_row(b, toks):
        logits[b] = prefill(model, toks[None], cache.select(slice(b, b + 1)), backend="hip", chunk_size=128)[0]
        state.admit(b, B)
        seqlens[b] = len(toks)

    for b in range(B):
        start_row(b, prompts[b] if admit_at[b] == 0 else filler)
    for step in range(max(admit_at) + n_new):
        for b in range(B):
            if step == admit_at[b] and step > 0:
                start_row(b, prompts[b])
        nxt = torch.stack(logits).argmax(-1)
        for b in range(B):
            if admit_at[b] <= step < admit_at[b] + n_new:
                out[b].append(int(nxt[b]))
        new = decode_one_token(model, nxt, seqlens, cache, state, kv_limit=int(seqlens.max()) + 1)
        logits = list(new)
        seqlens += 1
    return out


def test_rows_joining_at_different_steps_decode_as_if_alone(model):
    """Continuous batching: a row's tokens must not depend on when its neighbours joined (each row
    refreshes its sparse mask on its own schedule)."""
    prompts = [ids(n, seed=n)[0] for n in (420, 330, 380)]
    admit_at, n_new = [0, 3, 6], 9
    together = _greedy_rows(model, prompts, admit_at, n_new)
    alone = [_greedy_rows(model, [p], [0], n_new)[0] for p in prompts]
    assert together == alone


def test_dense_fallback_below_the_crossover_but_not_for_the_streaming_baseline(ckpt):
    """Below dense_cutoff hip attends densely (exact); the streaming baseline stays sink + window."""
    m = infinitehip.load(ckpt, config=HiPConfig.preset("tiny", dense_threshold=4096, model_context_length=4096))
    tokens = ids(400, seed=8)
    dense = full_logits(m, tokens)[:, -1]
    torch.testing.assert_close(full_logits(m, tokens, "hip")[:, -1], dense, atol=1e-4, rtol=0)
    assert not torch.allclose(full_logits(m, tokens, "streaming")[:, -1], dense, atol=1e-3)


def test_batch_of_different_lengths_equals_one_by_one(model):
    prompts = ["hello world", "a needle in a haystack of a million tokens, the quick brown fox", "0 1"]
    params = dict(max_new_tokens=6, ignore_eos=True)
    together = infinitehip.generate(model, prompts, **params)
    assert together == [infinitehip.generate(model, p, **params) for p in prompts]


def test_batch_across_the_dense_cutoff_equals_one_by_one(ckpt):
    """A prompt under dense_cutoff batched with one past it: the step's key count was the long
    row's, so the short row attended sparsely where alone it attends densely (other tokens)."""
    m = infinitehip.load(ckpt, config=HiPConfig.preset("tiny", dense_threshold=400, model_context_length=4096))
    prompts = [ids(350, seed=0)[0].tolist(), ids(500, seed=50)[0].tolist()]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def tokens(batch):
        out = [[] for _ in batch]
        for e in stream(m, batch, params):
            out[e.row].append(e.token)
        return out

    assert tokens(prompts) == [tokens([p])[0] for p in prompts]


def test_sampling_controls(model):
    kw = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0)
    a = infinitehip.generate(model, "hello", seed=5, **kw)
    assert a == infinitehip.generate(model, "hello", seed=5, **kw)
    greedy = infinitehip.generate(model, "hello", max_new_tokens=8, ignore_eos=True)
    assert infinitehip.generate(model, "hello", seed=1, top_k=1, **kw) == greedy
    assert infinitehip.generate(model, "hello", seed=1, top_p=1e-6, **kw) == greedy
    pieces = list(infinitehip.generate(model, "hello", max_new_tokens=8, ignore_eos=True, stream=True))
    assert "".join(pieces) == greedy and len(pieces) > 1
    events = list(stream(model, ["hello"], SamplingParams(max_new_tokens=5, ignore_eos=True)))
    assert len(events) == 5 and events[-1].finished and events[-1].finish_reason == "length"
    stop = greedy[2:4]
    assert infinitehip.generate(model, "hello", max_new_tokens=8, ignore_eos=True, stop=[stop]) == \
        greedy[:greedy.index(stop)]
    # Seeded sampling per row: a prompt in a batch draws what it draws alone (as the server's
    # requests do), not from a generator its neighbours advance too.
    assert infinitehip.generate(model, ["hello", "a needle in a haystack"], seed=5, **kw)[0] == a


def test_eos_ends_generation(model):
    first = [e.token for e in stream(model, ["hello"], SamplingParams(max_new_tokens=3, ignore_eos=True))][0]
    model.tokenizer.eos_token_ids = (first,)
    try:
        events = list(stream(model, ["hello"], SamplingParams(max_new_tokens=3)))
    finally:
        model.tokenizer.eos_token_ids = (1,)
    assert len(events) == 1 and events[0].finish_reason == "stop" and events[0].text == ""


def test_sample_and_stop_checker_units():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=2.0, top_k=1), g).tolist() == [1, 0]
    s = StopChecker(("END",))
    out = s.push("abcE") + s.push("N") + s.push("Dxyz") + s.flush()
    assert out == "abc" and s.stopped
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"stop strings must be non-empty strings, got \['END', 5\]"):
        SamplingParams(stop=["END", 5])
    # Each reached torch as NaN probabilities, a comparison of str and int, a float top-k or seed.
    for kw, field in ((dict(temperature=float("nan")), "temperature"), (dict(temperature="0.7"), "temperature"),
                      (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p"),
                      (dict(top_k=2.5), "top_k"), (dict(seed=1.5), "seed"), (dict(seed=2 ** 64), "seed"),
                      (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=f"{field}=.* must be"):
            SamplingParams(**kw)


def test_a_tiny_temperature_samples_the_top_token(model):
    """logits / 1e-40 overflowed float32 (and / 1e-50, rounded to 0, was 0 / 0): NaN probabilities,
    a RuntimeError from inside torch.multinomial. The limit of temperature -> 0 is greedy."""
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, -2.0]])
    for t in (1e-40, 1e-50):
        assert sample(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(0)).tolist() == [1, 0]
    kw = dict(max_new_tokens=4, ignore_eos=True)
    assert infinitehip.generate(model, "hello", temperature=1e-40, seed=0, **kw) == \
        infinitehip.generate(model, "hello", **kw)


def test_prefill_refuses_what_it_cannot_run(model):
    """engine.prefill (public): nothing left to run was an UnboundLocalError, a prompt past the
    cache a shape mismatch inside the first layer's cache write."""
    tokens = ids(8)
    with pytest.raises(ValueError, match="at least the prompt's last token.*start=8 of a 8-token prompt"):
        prefill(model, tokens, new_cache(model), start=8)
    with pytest.raises(ValueError, match="start=0 of a 0-token prompt"):
        prefill(model, tokens[:, :0], new_cache(model))
    with pytest.raises(ValueError, match="a 600-token prompt does not fit a cache of 512 tokens a row"):
        prefill(model, ids(600), new_cache(model))


def test_memory_is_planned_before_allocating(model, monkeypatch):
    # 100,000 tokens are 391 blocks of 256: 100,096 tokens allocated, 12.22 GiB (not 12.21).
    with pytest.raises(CapacityError,
                       match=r"1 x 100,096 tokens needs 12\.22 GiB .* only 0\.00 GiB are free on cpu.*smaller dtype.*"
                             r"on the CPU the cache already lives in host memory"):   # it advised offloading
        plan_kv_cache(n_layers=32, n_kv_heads=8, head_dim=128, batch=1, capacity=100_000, dtype=torch.bfloat16,
                      device=torch.device("cpu"), free=1 << 20)
    with pytest.raises(CapacityError, match=r"or KV offload to host memory \(offload=True, --offload\)"):
        plan_kv_cache(n_layers=32, n_kv_heads=8, head_dim=128, batch=1, capacity=100_000, dtype=torch.bfloat16,
                      device=torch.device("cuda"), free=1 << 20)   # free= given: nothing touches a GPU
    import infinitehip.cache.kv as kv
    monkeypatch.setattr(kv, "free_memory", lambda device: 1 << 20)
    with pytest.raises(CapacityError, match="shorter prompt"):
        infinitehip.generate(model, "hello", max_new_tokens=4)


def test_kv_plan_counts_the_whole_blocks_allocated():
    """The plan checked capacity x bytes while KVCache allocates whole 256-token blocks: 3 rows
    of 257 tokens planned 1.5 MiB and allocated 3 MiB. It plans what is allocated now."""
    shape = dict(n_layers=2, n_kv_heads=2, head_dim=64, batch=3, dtype=torch.float32)
    per_token = kv_bytes(shape["n_layers"], shape["n_kv_heads"], shape["head_dim"], torch.float32)
    cache = KVCache(2, 3, 257, 2, 64, dtype=torch.float32, device="cpu")
    cpu = torch.device("cpu")
    assert plan_kv_cache(**shape, capacity=257, device=cpu, free=cache.nbytes) == cache.nbytes
    with pytest.raises(CapacityError, match=r"3 x 512 tokens needs .*at most ~256 tokens per sequence fit"):
        plan_kv_cache(**shape, capacity=257, device=cpu, free=per_token * 3 * 257)
    from infinitehip.models.loader import inspect_checkpoint
    assert inspect_checkpoint("builtin", device="cpu")["max_context"] % 256 == 0   # `info`'s figure: whole blocks


def test_offload_flags_that_contradict_are_refused():
    from infinitehip.cli import _offload_arg

    cpu = torch.device("cpu")
    assert _offload_arg(None, True, None, cpu).fp8 and _offload_arg(False, False, None, cpu) is False
    with pytest.raises(ValueError, match="--no-offload contradicts --offload-fp8"):   # it offloaded anyway
        _offload_arg(False, True, None, cpu)


def test_engine_errors(model):
    with pytest.raises(ValueError, match="backend='flash'; choose one of"):
        infinitehip.generate(model, "hi", backend="flash")
    with pytest.raises(ValueError, match="empty prompt"):
        infinitehip.generate(model, [[]])
    with pytest.raises(ValueError, match=r"a prompt is text or a list of token ids, got int.*\[\[1, 2, 3\]\]"):
        infinitehip.generate(model, [1, 2, 3])                                  # a TypeError from list(int)
    with pytest.raises(ValueError, match=r"a prompt is text or a list of token ids, got Tensor"):
        infinitehip.generate(model, torch.tensor([1, 2, 3]))            # "TypeError: iteration over a 0-d tensor"
    for bad in (None, 5):                                                        # TypeErrors from list()
        with pytest.raises(ValueError, match=rf"prompt must be text or a list of prompts .*got {type(bad).__name__}"):
            infinitehip.generate(model, bad)
    with pytest.raises(ValueError, match="stop=5 must be a string or a list of strings"):   # tuple(5)
        infinitehip.generate(model, "hi", stop=5)
    # With stream=True too, a bad call fails at the call, not at the first piece read.
    for kw in (dict(backend="flash"), dict(kernel="cuda"), dict(system="be brief")):
        with pytest.raises(ValueError, match="choose one of|system="):
            infinitehip.generate(model, "hi", stream=True, **kw)
    with pytest.raises(ValueError, match="empty prompt"):
        infinitehip.generate(model, [[]], stream=True)
    with pytest.raises(ValueError, match="no prompts"):                             # it said "empty prompt"
        infinitehip.generate(model, [])
    with pytest.raises(ValueError, match=r"prompts is a list of prompts.*give \[text\]"):
        stream(model, "hello")                            # a batch of five one-character prompts, silently
    with pytest.raises(ValueError, match="kernel='cuda'; choose one of"):     # it said backend='cuda'
        infinitehip.generate(model, "hi", kernel="cuda")
    vocab = model.args.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\)"):    # an IndexError in the embedding
        infinitehip.generate(model, [[5, vocab]])
    with pytest.raises(ValueError, match=r"system= is the chat template's system message: give chat=True"):
        infinitehip.generate(model, "hi", system="be brief", max_new_tokens=2)          # silently dropped
    with pytest.raises(ValueError, match=r"chat=True \(--chat\) wraps a text prompt.*this prompt is token ids"):
        infinitehip.generate(model, [[5, 6]], chat=True, max_new_tokens=2)              # the template was skipped
    with pytest.raises(ValueError, match=r"chunk_size=2.5 must be an integer >= 1"):    # range()'s TypeError
        infinitehip.generate(model, "hi", chunk_size=2.5, max_new_tokens=2)


def test_triton_kernel_on_cpu_names_generates_argument(model, monkeypatch):
    if model.device.type != "cpu":
        pytest.skip("the model is on a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # the tests' CPU interpreter: as users run it
    with pytest.raises(ValueError, match="kernel='triton' runs on CUDA and the model is on cpu: use kernel="):
        infinitehip.generate(model, "hi", kernel="triton", max_new_tokens=2)   # it said backend='triton'
