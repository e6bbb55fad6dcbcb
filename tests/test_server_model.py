"""The server over a real (tiny, random) checkpoint: answers equal infinitehip.generate's."""
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from checkpoints import make_checkpoint  # noqa: E402
from test_server_api import running  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip.server.app import create_app  # noqa: E402
from infinitehip.server.engine import ModelEngine  # noqa: E402

PROMPTS = ["the quick brown fox", "a needle in a haystack", "hello world", "0123456789 + -",
           "sparse attention reads", "the lazy dog", "a million tokens", "café naïve"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama"), config="tiny")
    with running(create_app(ModelEngine(model, model_id="tiny", max_context=512, max_batch=4))) as base:
        yield model, base


@pytest.fixture
def setup(server):
    model, base = server
    return model, openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completion_equals_generate_and_usage(setup):
    model, client = setup
    want = infinitehip.generate(model, PROMPTS[0], max_new_tokens=8, ignore_eos=False)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0]))
    assert 1 <= r.usage.completion_tokens <= 8


def test_completion_takes_token_ids(setup):
    """OpenAI's prompt may be token ids (evaluation harnesses send them): it was a 400."""
    from infinitehip.engine.generate import encode_prompt

    model, client = setup
    ids = encode_prompt(model, PROMPTS[1])
    answers = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
               for p in (PROMPTS[1], ids, [ids], [PROMPTS[1]])]
    assert len({a.choices[0].text for a in answers}) == 1 and answers[1].usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError, match="2 prompts in one request"):
        client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(model="tiny", prompt=[5, 10 ** 7], max_tokens=2)
    # Streamed, the same 400 (it was a 200 and then an error event: the runner refused the ids later)
    with pytest.raises(openai.BadRequestError, match="token ids must be in"):
        client.completions.create(model="tiny", prompt=[5, -1], max_tokens=2, stream=True)


def test_chat_and_stream(setup):
    model, client = setup
    msgs = [{"role": "user", "content": "hello world"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    assert full == infinitehip.generate(model, "hello world", chat=True, max_new_tokens=8)
    parts = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, stream=True, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == full


def test_eight_concurrent_requests_match_alone(setup, server):
    _, client = setup
    ask = lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text  # noqa: E731
    alone = [ask(p) for p in PROMPTS]
    before = httpx.get(server[1] + "/metrics").json()["batch"]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, PROMPTS)) == alone
    after = httpx.get(server[1] + "/metrics").json()["batch"]
    assert after["batched_steps"] > before["batched_steps"] and after["max_decoding"] > 1, "they shared decode steps"


def test_seeded_sampling_is_reproducible_under_load(setup):
    _, client = setup
    ask = lambda p, seed: client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=1.0,  # noqa: E731
                                                    seed=seed).choices[0].text
    alone = ask(PROMPTS[0], 3)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]], [3, 4, 3, None]))
    assert together[0] == together[2] == alone


def test_prompt_beyond_capacity_is_400(setup):
    _, client = setup
    with pytest.raises(openai.BadRequestError, match="capacity of 512 tokens"):
        client.completions.create(model="tiny", prompt="hello world " * 400, max_tokens=4)


def test_second_question_about_a_document_skips_its_prefill(tmp_path):
    from infinitehip.engine import PrefixCache

    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config="tiny")
    engine = ModelEngine(model, model_id="tiny", max_context=2048, prefix_cache=PrefixCache(block_tokens=64, min_tokens=64))
    doc = " ".join(f"the quick brown fox {i}" for i in range(80))
    with running(create_app(engine)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        answers = [client.completions.create(model="tiny", prompt=doc + q, max_tokens=5, temperature=0).choices[0].text
                   for q in (" first?", " second?")]
        cached = httpx.get(base + "/metrics").json()["context_cache"]
    stats = engine.prefix_cache.stats
    assert stats.hits == 1 and stats.reused_tokens >= len(model.tokenizer.encode(doc)) - 64
    assert cached["reused_tokens"] == stats.reused_tokens and cached["prefill_seconds_saved"] > 0
    assert answers == [infinitehip.generate(model, doc + q, max_new_tokens=5) for q in (" first?", " second?")]


def test_builtin_model_over_http():
    """`infinitehip serve` with no argument serves the built-in model: completion, stream, stop, usage."""
    model = infinitehip.load("builtin")
    prompt = "The pass key is 52731. Remember it. What is the pass key? The pass key is"
    want = infinitehip.generate(model, prompt, max_new_tokens=10)
    with running(create_app(ModelEngine(model, model_id="builtin", max_context=1024, max_batch=4))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model="builtin", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == want and r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        stop = want.strip()[1:3]
        cut = client.completions.create(model="builtin", prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
        parts = client.completions.create(model="builtin", prompt=prompt, max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in parts) == want
        with pytest.raises(openai.BadRequestError, match="no chat template"):  # the built-in model has none
            client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "hi"}])


def test_empty_prompt_is_400_streaming_too(tmp_path):
    """A tokenizer that adds no BOS (Qwen's) makes "" zero tokens, which the runner refuses: a 400
    without streaming, but with stream: true the refusal came after the 200, as an error event
    typed server_error. Now both are a 400 before anything is queued."""
    import json

    path = make_checkpoint(tmp_path, "qwen2")
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = None                                   # no BOS
    (path / "tokenizer.json").write_text(json.dumps(spec))
    model = infinitehip.load(path, config="tiny")
    assert model.tokenizer.encode("") == []
    with running(create_app(ModelEngine(model, model_id="tiny", max_context=256, max_batch=1))) as base:
        for stream in (False, True):
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "", "stream": stream})
            assert r.status_code == 400 and "empty" in r.json()["error"]["message"], (stream, r.text)
            assert r.json()["error"]["param"] == "prompt"


def test_a_prompt_is_tokenized_once_and_not_by_the_worker(setup, server, monkeypatch):
    """The app counted a prompt's tokens (in a thread) and the worker tokenized it again: for a
    long document seconds (600K tokens: 2.9 s on CPU) during which no running request got a token."""
    import threading

    model, client = setup
    calls, encode = [], model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode",
                        lambda *a, **k: calls.append(threading.current_thread().name) or encode(*a, **k))
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(encode(PROMPTS[1]))
    assert len(calls) == 1 and calls[0] != "infinitehip-worker", calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama"), config="tiny")


def _boom(*_, **__):
    raise RuntimeError("boom")


def test_a_request_that_finished_in_a_failed_step_is_ended(tiny, monkeypatch):
    """A step that finished request A (max_tokens 1) and then failed on B's prefill lost A's
    last event, and abort() named only the requests still holding a slot: A's client waited
    forever (and its place counted against the queue for good). It now gets the 500."""
    import threading

    import infinitehip.engine.batch as batch
    from infinitehip.engine.sampling import SamplingParams
    from infinitehip.server.scheduler import EngineFailure, Scheduler

    a_ids = tiny.tokenizer.encode("hello world")
    b_ids = list(range(7, 7 + len(a_ids) + 3))                   # longer: only its prefill fails
    prefill = batch.prefill
    monkeypatch.setattr(batch, "prefill", lambda m, tokens, *a, **k: (
        _boom() if tokens.shape[1] == len(b_ids) else prefill(m, tokens, *a, **k)))
    engine = ModelEngine(tiny, model_id="tiny", max_context=256, max_batch=2)
    add, both_queued = engine.add, threading.Event()
    engine.add = lambda prompt, params: both_queued.wait(10) and add(prompt, params)   # one step takes both
    sched = Scheduler(engine, max_queue=4)
    a = sched.submit(a_ids, SamplingParams(max_new_tokens=1))
    b = sched.submit(b_ids, SamplingParams(max_new_tokens=4))
    both_queued.set()
    ends = {}
    for name, job in (("a", a), ("b", b)):   # daemon threads: a job that never ends fails the test, not hangs it
        def wait(name=name, job=job):
            try:
                list(job.results())
            except EngineFailure:
                ends[name] = "500"
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        thread.join(timeout=20)
    assert ends == {"a": "500", "b": "500"} and sched.outstanding == 0 and engine.runner.n_free == 2
    sched.close()


@pytest.mark.parametrize("where", ["reuse", "sample"])
def test_a_failed_step_frees_the_slot_it_took(tiny, monkeypatch, where):
    """A step failing while it copied a cached prefix in (reuse), or sampled a request's first
    token, left that request in no list abort() empties: its slot was gone for good (one fewer
    for every later request) and its client waited forever."""
    import infinitehip.engine.batch as batch
    from infinitehip.engine.sampling import SamplingParams

    engine = ModelEngine(tiny, model_id="tiny", max_context=256, max_batch=2)
    monkeypatch.setattr(engine.prefix_cache if where == "reuse" else batch, where, _boom)
    rid = engine.add(tiny.tokenizer.encode("hello world"), SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    assert engine.abort() == [rid] and engine.runner.n_free == 2 and not engine.has_work
    monkeypatch.undo()
    engine.add(tiny.tokenizer.encode("hello world"), SamplingParams(max_new_tokens=3))
    while engine.has_work:
        engine.step()
    assert engine.runner.stats.finished == 1


def test_serve_loads_the_context_cache_into_host_memory(tmp_path, monkeypatch):
    """`serve --context-cache` loaded the file's entries onto the GPU (device=the model's), after
    the KV slots were planned to fill it: a long document's KV might not fit there (an error at
    start), and took what the plan gave the slots. They live in host memory, as the entries made
    while serving (``read_prefix``). On a CPU-only machine this checks the round trip alone."""
    import torch
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import infinitehip.server.app as server_app
    from infinitehip.cli import app

    uvicorn = pytest.importorskip("uvicorn")
    path = tmp_path / "ctx.safetensors"
    argv = ["serve", "builtin", "--device", "cuda" if torch.cuda.is_available() else "cpu", "--dtype", "float32",
            "--max-batch", "1", "--max-context", "2048", "--context-cache", str(path)]
    doc = " ".join(f"the quick brown fox {i}" for i in range(150))     # ~1350 tokens: over 1024, kept

    def ask_then_stop(server, **_):
        with TestClient(server) as c:     # startup, a request, shutdown (which saves the file)
            r = c.post("/v1/completions", json={"model": "builtin", "prompt": doc, "max_tokens": 1})
            assert r.status_code == 200, r.text
    monkeypatch.setattr(uvicorn, "run", ask_then_stop)
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0 and path.exists(), r.output
    served, create_app = {}, server_app.create_app
    monkeypatch.setattr(server_app, "create_app", lambda e, **k: served.update(engine=e) or create_app(e, **k))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    entries = list(served["engine"].prefix_cache._entries.values())
    assert entries and all(t.device.type == "cpu" for e in entries for t in e.k + e.v)


def test_a_context_cache_save_cut_short_keeps_the_old_file(tmp_path, monkeypatch):
    """The file was written in place: a save cut short at shutdown (a full disk, a stop signal's
    kill) left it truncated, losing every entry and failing the next `serve` at start."""
    import infinitehip.engine.prefix_cache as prefix_cache

    path = tmp_path / "ctx.safetensors"
    prefix_cache.PrefixCache().save(path, owner="me")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prefix_cache, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        prefix_cache.PrefixCache().save(path, owner="me")
    prefix_cache.PrefixCache().load(path, owner="me")              # still readable
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
