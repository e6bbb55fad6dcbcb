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
