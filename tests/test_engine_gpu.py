"""CUDA-graph decode gives the same greedy tokens as eager decode, for every backend; the dense
graph (FlashAttention over each row's valid keys) equals eager dense decode in bf16."""
import json

import pytest
import torch
import torch.nn.functional as F
from checkpoints import make_checkpoint

import infinitehip
from infinitehip.cache import KVCache
from infinitehip.config import HiPConfig
from infinitehip.engine import DecodeState, SamplingParams, decode_one_token, prefill, stream
from infinitehip.models.llama import Step, full_cache_decode

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("backend", ["hip", "dense", "streaming"])
def test_cuda_graph_decode_equals_eager(tmp_path, backend):
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config="tiny", dtype="float32")
    prompts = ["the quick brown fox " * 20, "hello world"]    # past sink + window: sparse decode
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    eager = [(e.row, e.token) for e in stream(model, prompts, params, backend=backend)]
    graph = [(e.row, e.token) for e in stream(model, prompts, params, backend=backend, cuda_graph=True)]
    assert graph == eager


@needs_cuda
@pytest.mark.parametrize("backend,offload", [("hip", False), ("dense", False), ("streaming", False), ("hip", True)])
def test_batch_runner_graph_decode_equals_eager(tmp_path, backend, offload):
    """The server's runner replaying decode from CUDA graphs, requests joining at different steps
    (rows at different refresh phases: hip's ("rows", stage) graphs): the eager runner's tokens,
    with the slots on the GPU or offloaded (host memory behind the GPU page cache)."""
    from test_batch import ADMIT_AT, LENGTHS, drive, prompt

    from infinitehip.engine import BatchRunner

    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config="tiny", dtype="float32")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    arrivals = {}
    for i, (n, at) in enumerate(zip(LENGTHS, ADMIT_AT)):
        arrivals.setdefault(at, []).append((i, prompt(n), params))
    got = {}
    for graphs in (False, True):
        r = BatchRunner(model, backend=backend, max_batch=4, max_context=512, chunk_size=64, cuda_graph=graphs,
                        offload=offload)
        got[graphs], _ = drive(r, arrivals)
    assert got[True] == got[False]
    auto = BatchRunner(model, backend=backend, max_batch=4, max_context=512, chunk_size=64, cuda_graph=None,
                       offload=offload)
    assert auto._graphs is not None                           # the server's default: graphs here
    if backend == "hip":   # mixed phases replayed graphs, not eager steps
        assert any(key[0] == "rows" for key in r._graphs.graphs), list(r._graphs.graphs)


@needs_cuda
def test_batch_runner_graphs_after_an_abort(tmp_path):
    """abort() gave the runner a new DecodeState while its GraphDecoder kept stepping the old one:
    a request admitted after it continued the dropped one's refresh schedule (test_batch has the
    CPU form with GraphDecoder's contract)."""
    from test_batch import prompt

    from infinitehip.engine import BatchRunner

    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config="tiny", dtype="float32")
    got = {}
    for graphs in (False, True):
        r = BatchRunner(model, max_batch=2, max_context=512, chunk_size=64, cuda_graph=graphs)
        r.add(prompt(300, seed=1), SamplingParams(max_new_tokens=100, ignore_eos=True))
        for _ in range(11):
            r.step()
        r.abort()
        r.add(prompt(280, seed=2), SamplingParams(max_new_tokens=24, ignore_eos=True))
        got[graphs] = [e.token for _ in range(40) for e in r.step()]
    assert got[True] == got[False] and len(got[True]) == 24

def test_cuda_graph_needs_cuda_model(tmp_path):
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        infinitehip.generate(model, "hi", cuda_graph=True, max_new_tokens=2)


@needs_cuda
@pytest.mark.parametrize("lengths", [(3000,), (3000, 1234)])
def test_dense_graph_decode_equals_eager_dense_bf16(lengths):
    """Teacher-forced steps, graph vs eager over exactly the written keys (SDPA), same logits
    within bf16 tolerance; one graph serves every step."""
    from infinitehip.bench.engine import random_model
    from infinitehip.engine.cuda_graph import GraphDecoder

    model = random_model(2, HiPConfig(dense_threshold=0))
    B, steps, a = len(lengths), 12, model.args
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = [torch.randint(0, a.vocab_size, (1, n), device="cuda", generator=g) for n in lengths]
    caches = []
    for _ in range(2):
        cache = KVCache(a.n_layers, B, max(lengths) + steps + 1, a.n_kv_heads, a.head_dim, dtype=torch.bfloat16,
                        device="cuda")
        for b, p in enumerate(prompts):
            prefill(model, p, cache.select(slice(b, b + 1)), backend="dense", chunk_size=1024)
        caches.append(cache)
    eager_state, graph_state = DecodeState("dense"), DecodeState("dense")
    graph = GraphDecoder(model, caches[1], graph_state)
    tokens = torch.randint(0, a.vocab_size, (steps, B), device="cuda", generator=g)
    seqlens_e, seqlens_g = torch.tensor(lengths, device="cuda"), torch.tensor(lengths, device="cuda")
    for t in range(steps):
        eager = decode_one_token(model, tokens[t], seqlens_e, caches[0], eager_state, kv_limit=max(lengths) + t + 1)
        replay = graph(tokens[t], seqlens_g)
        assert (replay - eager).abs().max() <= 0.02 * eager.abs().max(), t
        seqlens_e += 1
        seqlens_g += 1
    assert list(graph.graphs) == [(0,)]


@needs_cuda
def test_hip_graph_decode_with_pdl_equals_without(monkeypatch):
    """bf16 decode, its fused GEMVs, cache write, attention and mask refreshes chained by
    programmatic dependent launch and replayed as CUDA graphs: bit for bit the logits of the same
    steps without PDL (every kernel waits for its predecessor before it touches anything)."""
    from infinitehip.attention.triton import pdl
    from infinitehip.bench.engine import random_model
    from infinitehip.engine.cuda_graph import GraphDecoder

    model = random_model(2, HiPConfig(dense_threshold=0))
    a, steps, lengths = model.args, 10, (3000, 2100)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = [torch.randint(0, a.vocab_size, (1, n), device="cuda", generator=g) for n in lengths]
    tokens = torch.randint(0, a.vocab_size, (steps, len(lengths)), device="cuda", generator=g)
    logits = {}
    for use in (False, True):
        monkeypatch.setattr(pdl, "USE", use)
        cache = KVCache(a.n_layers, len(lengths), max(lengths) + steps + 1, a.n_kv_heads, a.head_dim,
                        dtype=torch.bfloat16, device="cuda")
        for b, p in enumerate(prompts):
            prefill(model, p, cache.select(slice(b, b + 1)), backend="hip", chunk_size=1024)
        graph, seqlens = GraphDecoder(model, cache, DecodeState("hip")), torch.tensor(lengths, device="cuda")
        out = []
        for t in range(steps):
            out.append(graph(tokens[t], seqlens).clone())
            seqlens += 1
        logits[use] = torch.stack(out)
    assert torch.equal(logits[True], logits[False])


@needs_cuda
@pytest.mark.parametrize("lag", [8, 20])
def test_refresh_lag_graph_decode_equals_eager_bit_for_bit(lag):
    """Llama-3-8B's attention shape, bf16, refresh_lag 8 (one refresh in flight) and 20 (two):
    the graphs (pruning replayed on a side stream, masks copied in where they take effect) give
    eager decode's logits bit for bit, over a stage-0 refresh and the step it takes effect; one
    graph per (stage pruned for later, masks taking effect), one pruning graph per (stage, slot)."""
    from infinitehip.bench.engine import random_model
    from infinitehip.engine.cuda_graph import GraphDecoder

    model = random_model(2, HiPConfig(dense_threshold=0, refresh_lag=lag))
    a, steps, lengths = model.args, 42, (3000, 2100)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = [torch.randint(0, a.vocab_size, (1, n), device="cuda", generator=g) for n in lengths]
    tokens = torch.randint(0, a.vocab_size, (steps, len(lengths)), device="cuda", generator=g)
    logits = {}
    for mode in ("eager", "graph"):
        cache = KVCache(a.n_layers, len(lengths), max(lengths) + steps + 1, a.n_kv_heads, a.head_dim,
                        dtype=torch.bfloat16, device="cuda")
        for b, p in enumerate(prompts):
            prefill(model, p, cache.select(slice(b, b + 1)), backend="hip", chunk_size=1024)
        state, seqlens = DecodeState("hip"), torch.tensor(lengths, device="cuda")
        graph = GraphDecoder(model, cache, state) if mode == "graph" else None
        out = []
        for t in range(steps):
            step = graph(tokens[t], seqlens) if graph else decode_one_token(model, tokens[t], seqlens, cache, state)
            out.append(step.clone())
            seqlens += 1
        logits[mode] = torch.stack(out)
    assert torch.equal(logits["graph"], logits["eager"])
    if lag == 8:
        assert set(graph.graphs) == {(3, False), (2, False), (1, True), (2, True), (0, True)}
        assert set(graph.beside.prune_graphs) == {(2, 1), (1, 0), (0, 0)}     # (stage, slot)


def _reference(q, k, v, lens, scale):
    """Per-row fp32 attention over the first lens[b] keys (GQA by repeating kv heads)."""
    group = q.shape[2] // k.shape[2]
    out = []
    for b, n in enumerate(lens.tolist()):
        kb, vb = (x[b, :n].float().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))   # (H, n, D)
        out.append(F.scaled_dot_product_attention(q[b].float().transpose(0, 1), kb, vb, scale=scale).transpose(0, 1))
    return torch.stack(out)                                                                       # (B, 1, H, D)


@needs_cuda
def test_flash_full_capacity_decode_reads_each_rows_length_and_replays_in_a_graph():
    B, cap, H, K, D = 3, 8192, 32, 8, 128
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, cap, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([cap, 5000, 17], device="cuda")
    cu_q = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    step = Step(lens - 1, lens, None, None, flash=(cu_q, cu_q * cap, lens.to(torch.int32)))
    scale = D ** -0.5
    torch.testing.assert_close(full_cache_decode(q, k, v, step, scale).float(), _reference(q, k, v, lens, scale),
                               atol=2e-2, rtol=2e-2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        full_cache_decode(q, k, v, step, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = full_cache_decode(q, k, v, step, scale)
    for new in ([1, 4097, 8000], [cap, cap, cap]):          # lengths change between replays, shapes do not
        lens.copy_(torch.tensor(new))
        step.flash[2].copy_(lens)
        graph.replay()
        torch.testing.assert_close(out.float(), _reference(q, k, v, lens, scale), atol=2e-2, rtol=2e-2)


@needs_cuda
def test_engine_bench_records_graph_and_eager_decode(tmp_path):
    from infinitehip.bench.engine import main

    main(["--contexts", "4096", "--layers", "2", "--decode-steps", "4", "--eager-steps", "2", "--chunk-size", "2048",
          "--backends", "hip,dense,streaming", "--out", str(tmp_path)])
    from infinitehip.bench import device_slug

    records = json.loads((tmp_path / f"engine_{device_slug(torch.cuda.get_device_name())}.json").read_text())
    assert [r["backend"] for r in records] == ["hip", "dense", "streaming"]
    for r in records:
        assert r["decode_mode"] == "cuda_graph" and r["floor_ratio"] > 0 and r["decode_ms_per_token_eager"] > 0
        assert 5e2 < r["copy_bandwidth_gb_per_s"] < 2e4     # measured in the run: a GPU's HBM
    assert records[1]["kv_read_floor_ms"] > records[1]["weight_floor_ms"]
    assert records[1]["decode_speedup_vs_dense"] == 1.0
