"""The batch runner prefills a long prompt into an offloaded slot layer by layer, a chunk's worth
of (layer, chunk) units per step between its neighbours' decode steps (``layer_prefill.LayerPrefill``):
the same tokens and stored K/V as alone and as chunk by chunk."""
import pytest
import torch

pytest.importorskip("transformers")
from checkpoints import make_checkpoint  # noqa: E402
from test_batch import GREEDY, prompt, runner  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip.cache.offload_plan import OffloadConfig  # noqa: E402
from infinitehip.engine import SamplingParams, layer_prefill, stream  # noqa: E402

NEIGHBOUR = SamplingParams(max_new_tokens=40, ignore_eos=True)
LONG = 420                                              # 7 chunks of 64 (the last one ragged)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama"), config="tiny")


def run(model, offload, with_neighbour=True):
    """A neighbour decoding while the long prompt prefills; returns (the long prompt's K/V as
    stored when its prefill ended, tokens by request, the steps the long prompt prefilled in and
    the neighbour decoded beside). (Later a free slot rides along in decode at position 0.)"""
    r = runner(model, offload=offload)
    ids, tokens, kv, layered, beside = {}, {}, None, 0, 0
    if with_neighbour:
        ids["neighbour"] = r.add(prompt(40), NEIGHBOUR)
        for e in r.step():
            tokens.setdefault(e.request, []).append(e.token)
    ids["long"] = r.add(prompt(LONG), GREEDY)
    while r.has_work:
        steps = r.stats.decode_steps
        prefilling = r._prefilling
        for e in r.step():
            tokens.setdefault(e.request, []).append(e.token)
        if prefilling is not None and prefilling.rid == ids["long"]:
            layered += prefilling.layers is not None          # still layer by layer after this step
            beside += r.stats.decode_steps > steps
            if r._prefilling is None:
                kv = stored(r.cache, prefilling.slot, LONG)
    return kv, {k: tokens[rid] for k, rid in ids.items()}, layered, beside


def stored(c, slot, n):
    """The slot's first n positions of every layer's store (K and V), copied."""
    return [x.view(c.batch, c.capacity, *x.shape[2:])[slot, :n].float().clone() for s in c.stores for x in (s.dk, s.dv)]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_long_offloaded_prompt_goes_layer_by_layer_between_decode_steps(model, fp8, monkeypatch):
    offload = OffloadConfig(fp8=fp8)
    kv, got, layered, beside = run(model, offload)
    assert layered >= 2 and beside >= 2   # several steps of layer units, the neighbour decoding beside
    want = {"neighbour": prompt(40), "long": prompt(LONG)}
    for key, params in (("neighbour", NEIGHBOUR), ("long", GREEDY)):
        assert got[key] == [e.token for e in stream(model, [want[key]], params, chunk_size=64, offload=offload)]
    # The neighbour's throwaway tokens (parked past the prompt) left the stored prompt as a run
    # of its own leaves it, in every layer; and as chunk by chunk stores it.
    for x, y in zip(kv, run(model, offload, with_neighbour=False)[0]):
        assert torch.equal(x, y)
    monkeypatch.setattr(layer_prefill, "fits", lambda *args: False)
    kv_by_chunk, got_by_chunk, layered, _ = run(model, offload)
    assert layered == 0 and got_by_chunk == got
    for x, y in zip(kv, kv_by_chunk):
        assert torch.equal(x, y)


def test_cancelling_a_layer_by_layer_prefill_lets_go_of_its_layer(model):
    r = runner(model, offload=True)
    rid = r.add(prompt(LONG), GREEDY)
    r.step()
    r.step()
    work = r._prefilling.layers
    assert work is not None and work.logits is None
    assert any(work.cache.held(layer) for layer in range(model.args.n_layers))
    assert r.cancel(rid)
    assert work.cache is None and r._prefilling is None and r.n_free == 4
    r.add(prompt(300), GREEDY)                              # the slot again, from the start
    got = []
    while r.has_work:
        got += [e.token for e in r.step()]
    assert got == [e.token for e in stream(model, [prompt(300)], GREEDY, chunk_size=64, offload=True)]


def test_a_failed_layer_by_layer_prefill_lets_go_of_the_hidden_states(model, monkeypatch):
    """``prefill`` closes its ``LayerPrefill`` when a unit fails, but close() let go of the held
    layer only: the prompt's hidden states (T x dim: 8 GiB of GPU memory at 1M tokens of the 8B
    shape) stayed with the exception's traceback (kept by a notebook, a logger, a caller)."""
    from infinitehip.engine.generate import make_cache, prefill

    made, begin = [], layer_prefill.begin
    monkeypatch.setattr(layer_prefill, "begin", lambda *a, **kw: made.append(begin(*a, **kw)) or made[-1])

    def fail(*args, **kw):
        raise RuntimeError("a unit failed")

    monkeypatch.setattr(model.net.layers[1], "forward", fail)
    with pytest.raises(RuntimeError, match="a unit failed"):
        prefill(model, torch.tensor([prompt(LONG)], device=model.device), make_cache(model, 1, 512, 64, True), chunk_size=64)
    assert made[0] is not None and made[0].cache is None and made[0].x is None
