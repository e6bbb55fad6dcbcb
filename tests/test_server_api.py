"""The HTTP layer with the real `openai` client, over a deterministic test engine.

The engine here spells the prompt's last word back one letter per token, so every answer is
known in advance; tests with the built-in model are in test_server_model.py.
"""
import itertools
import json
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infinitehip.engine.sampling import StopChecker  # noqa: E402
from infinitehip.server.app import create_app  # noqa: E402


class _Fatal(BaseException):
    pass


class SpellEngine:
    """A continuous-batching runner in miniature: each step spells one more letter of every
    active request's last prompt word; ``max_batch`` requests at a time, the rest wait. A prompt
    containing "explode" makes the step fail (an internal error)."""

    model_id = "spell"
    max_context = 200

    def __init__(self, max_batch=4, delay=0.002):
        self.max_batch, self.delay = max_batch, delay
        self.waiting, self.active, self.ids = deque(), {}, itertools.count()
        self.batched_steps, self.cancelled = 0, []

    def tokenize(self, text):    # a word is a token
        return text.split()

    def render_chat(self, messages):
        self.rendered = messages
        return self.tokenize(" ".join(m["content"] for m in messages))

    def add(self, prompt, params):
        words = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        if "addbug" in words:   # a bug while queueing a request: it killed the worker (every later one 503)
            raise RuntimeError("secret internal detail")
        if "fatal" in words:    # not an Exception: the worker thread stops
            raise _Fatal()
        rid = next(self.ids)
        self.waiting.append(SimpleNamespace(rid=rid, word=words[-1][:params.max_new_tokens], n=0,
                                            params=params, stops=StopChecker(params.stop), boom="explode" in words))
        return rid

    @property
    def has_work(self):
        return bool(self.waiting or self.active)

    def cancel(self, rid):
        self.cancelled.append(rid)
        self.waiting = deque(r for r in self.waiting if r.rid != rid)
        return self.active.pop(rid, None) is not None

    def abort(self):
        dropped, self.active = list(self.active), {}
        return dropped

    def step(self):
        time.sleep(self.delay)
        while self.waiting and len(self.active) < self.max_batch:
            r = self.waiting.popleft()
            self.active[r.rid] = r
        self.batched_steps += len(self.active) > 1
        if any(r.boom for r in self.active.values()):
            raise RuntimeError("secret internal detail")
        events = []
        for r in list(self.active.values()):
            r.n += 1
            text = r.stops.push(r.word[r.n - 1])
            done = r.stops.stopped or r.n == len(r.word)
            if done:
                text += r.stops.flush()
                del self.active[r.rid]
            reason = ("length" if r.n == r.params.max_new_tokens else "stop") if done else None
            events.append(SimpleNamespace(request=r.rid, text=text, n_generated=r.n, finished=done,
                                          finish_reason=reason))
        return events


def serve(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@contextmanager
def running(app):
    server, thread, base = serve(app)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def spell():
    engine = SpellEngine()
    with running(create_app(engine, max_queue=8)) as base:
        yield base, engine


@pytest.fixture
def url(spell):
    return spell[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["spell"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_completion_and_usage(client):
    r = client.completions.create(model="spell", prompt="say hello", max_tokens=3)
    assert r.choices[0].text == "hel" and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 3, 5)


def test_neutral_openai_fields_and_max_completion_tokens(client):
    """What clients send by default (n=1, penalties 0, a user id) is accepted; chat's
    max_completion_tokens is max_tokens (it was ignored: 16 tokens came back for 3)."""
    r = client.completions.create(model="spell", prompt="say hello", max_tokens=3, n=1, presence_penalty=0,
                                  frequency_penalty=0, user="me", logprobs=None)
    assert r.choices[0].text == "hel"
    r = client.chat.completions.create(model="spell", messages=[{"role": "user", "content": "spell banana"}],
                                       max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="spell", messages=[{"role": "user", "content": "spell banana"}],
                                       max_tokens=3, max_completion_tokens=3)   # both, agreeing
    assert r.usage.completion_tokens == 3


def test_chat_stop_and_stream(client):
    r = client.chat.completions.create(model="spell", messages=[{"role": "user", "content": "spell banana"}],
                                       max_tokens=50, stop=["nan"])
    assert r.choices[0].message.content == "ba" and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="spell", messages=[{"role": "user", "content": "spell world"}], max_tokens=50, stream=True)]
    assert "".join(p for p in pieces if p) == "world"


def test_stream_with_usage_chunk(client):
    chunks = list(client.completions.create(model="spell", prompt="say hello", max_tokens=50, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_concurrent_requests_match_serial(client, spell):
    words = [f"w{i}abc{i}" for i in range(8)]
    alone = [client.completions.create(model="spell", prompt=w, max_tokens=20).choices[0].text for w in words]
    before = spell[1].batched_steps
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda w: client.completions.create(model="spell", prompt=w, max_tokens=20)
                                 .choices[0].text, words))
    assert together == alone == words
    assert spell[1].batched_steps > before, "concurrent requests shared steps"


def test_client_that_disconnects_mid_stream_is_cancelled(spell):
    base, engine = spell
    engine.delay = 0.01
    try:
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": "spell", "prompt": "x" * 150, "max_tokens": 150, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        deadline = time.time() + 10
        while not engine.cancelled and time.time() < deadline:
            time.sleep(0.02)
        assert engine.cancelled and not engine.active, "the slot was freed"
    finally:
        engine.delay = 0.002


@pytest.mark.parametrize("word", ["explode", "addbug"])   # failing in a step, or while queueing
def test_internal_error_is_500_without_details_and_the_server_stays_up(url, word):
    r = httpx.post(url + "/v1/completions", json={"model": "spell", "prompt": f"{word} now", "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    ok = httpx.post(url + "/v1/completions", json={"model": "spell", "prompt": "still here", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "here"


def test_full_queue_is_429_and_a_closed_server_is_503():
    app = create_app(SpellEngine(max_batch=1, delay=0.02), max_queue=1)   # 1 running + 1 waiting
    with running(app) as base:
        post = lambda i: httpx.post(base + "/v1/completions", timeout=30,  # noqa: E731
                                    json={"model": "spell", "prompt": f"abcdefghi{i}", "max_tokens": 20})
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, range(8)))
        codes = [r.status_code for r in replies]
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        answered = [(i, r.json()["choices"][0]["text"]) for i, r in enumerate(replies) if r.status_code == 200]
        assert all(text == f"abcdefghi{i}" for i, text in answered)
        assert all("server busy" in r.json()["error"]["message"] for r in replies if r.status_code == 429)
        app.state.scheduler.close()
        r = post(0)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert httpx.get(base + "/health").status_code == 503


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "spell"}).encode(), 400, "prompt"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "not served here"),
    (json.dumps({"model": "spell", "prompt": "x", "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"model": "spell", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    # Strict types, as OpenAI's API (these were converted: "5" -> 5, "yes" -> True, true -> 1.0).
    (json.dumps({"model": "spell", "prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "spell", "prompt": "x", "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "spell", "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "spell", "prompt": "x", "temperature": True}).encode(), 400, "temperature"),
    (json.dumps({"model": "spell", "prompt": "x", "seed": "7"}).encode(), 400, "seed"),
    (json.dumps({"model": "spell", "prompt": "x " * 199, "max_tokens": 5}).encode(), 400, "capacity of 200"),
    # Fields this server does not implement: a 400, not an answer that ignores them (n=2 gave one choice).
    (json.dumps({"model": "spell", "prompt": "x", "n": 2}).encode(), 400, "n is not supported"),
    (json.dumps({"model": "spell", "prompt": "x", "logprobs": 3}).encode(), 400, "logprobs is not supported"),
    (json.dumps({"model": "spell", "prompt": "x", "presence_penalty": 0.5}).encode(), 400, "presence_penalty"),
    (json.dumps({"model": "spell", "prompt": "x", "frobnicate": 1}).encode(), 400, "frobnicate"),
    # stream_options was taken as any dict: unknown keys and a non-boolean include_usage were ignored.
    (json.dumps({"model": "spell", "prompt": "x", "stream": True, "stream_options": {"bogus": 1}}).encode(),
     400, "stream_options.bogus"),
    (json.dumps({"model": "spell", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}).encode(),
     400, "stream_options.include_usage"),
    (json.dumps({"model": "spell", "prompt": "x", "stream_options": {"include_usage": True}}).encode(),
     400, "stream_options is only allowed when stream is true"),
    # Neutral values compare by JSON type too (true == 1 and 0 == false in Python: these passed).
    (json.dumps({"model": "spell", "prompt": "x", "n": True}).encode(), 400, "n is not supported"),
    (json.dumps({"model": "spell", "prompt": "x", "echo": 0}).encode(), 400, "echo is not supported"),
    # A completion's logprobs 0 asks for the sampled tokens' log probabilities (OpenAI's API): ignored.
    (json.dumps({"model": "spell", "prompt": "x", "logprobs": 0}).encode(), 400, "logprobs is not supported"),
    (json.dumps({"model": "spell", "prompt": None}).encode(), 400, "prompt"),   # null: the default, not for required
    # Both names of the limit, disagreeing: max_tokens won silently.
    (json.dumps({"model": "spell", "prompt": "x", "max_tokens": 3, "max_completion_tokens": 5}).encode(), 400,
     "max_tokens=3 and max_completion_tokens=5 disagree"),
    # A body that is not UTF-8: {"detail": ...}, not OpenAI's shape.
    (b'{"model": "spell", "prompt": "\xff"}', 400, "not valid JSON"),
])
def test_bad_requests_get_openai_errors(url, body, status, needle):
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_bounded_load(url):
    """500 mixed requests, a few at a time: every valid one answered, every invalid one a 4xx."""
    def one(i):
        valid = i % 3 != 0
        body = {"model": "spell", "prompt": f"x{i}", "max_tokens": 4} if valid else {"model": "spell", "max_tokens": -1}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        if valid:
            return r.status_code == 200 and r.json()["choices"][0]["text"] == f"x{i}"[:4]
        return 400 <= r.status_code < 500

    start = time.time()
    with ThreadPoolExecutor(4) as pool:
        ok = list(pool.map(one, range(500)))
    assert all(ok) and time.time() - start < 120
    assert httpx.get(url + "/health").status_code == 200


def test_serve_saves_the_context_cache_at_shutdown_even_when_the_process_ends_there(tmp_path, monkeypatch):
    """`serve --context-cache FILE` writes FILE during the app's shutdown: stopped by SIGTERM,
    uvicorn re-raises the signal once shut down and nothing after uvicorn.run runs (the file was
    never written), here a run that shuts the app down and then ends the process."""
    from fastapi.testclient import TestClient
    from safetensors import safe_open
    from typer.testing import CliRunner

    from infinitehip.cli import app

    def run_then_die(server, **_):
        with TestClient(server):    # startup, then shutdown
            pass
        raise SystemExit(143)
    monkeypatch.setattr(uvicorn, "run", run_then_die)
    path = tmp_path / "ctx.safetensors"
    r = CliRunner().invoke(app, ["serve", "builtin", "--max-batch", "1", "--max-context", "1024",
                                 "--context-cache", str(path)])
    assert r.exit_code == 143 and path.exists(), r.output
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "infinitehip-prefix-cache"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "spell", "prompt": "say \ud800x"}),
    ("/v1/chat/completions", {"model": "spell", "messages": [{"role": "user", "content": "say \ud800x"}]}),
])
def test_text_with_a_lone_surrogate_is_400(url, path, body):
    """JSON's \\ud800 escape decodes to a lone surrogate, which is no Unicode text: the tokenizer
    raised TypeError ("TextInputSequence must be str") and an engine that took it failed to write
    the answer, both a 500 with a traceback in the log."""
    r = httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_waiting_request_whose_client_left_is_dropped_at_once(stream):
    """A non-streaming client that gives up while its request waits for a slot: the request was
    only noticed at its first token, so it kept its place (429s for others) and was prefilled
    for nobody once a slot freed. It is now cancelled while still waiting (a stream too)."""
    engine = SpellEngine(max_batch=1, delay=0.02)
    app = create_app(engine, max_queue=4)
    with running(app) as base:
        post = lambda prompt, timeout, stream=False: httpx.post(  # noqa: E731
            base + "/v1/completions", timeout=timeout,
            json={"model": "spell", "prompt": prompt, "max_tokens": 150, "stream": stream})
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, "x" * 150, 30)     # holds the only slot for ~3 s
            while not engine.active:
                time.sleep(0.01)
            with pytest.raises(httpx.TimeoutException):
                post("waits", 0.3, stream)
            deadline = time.time() + 2
            while not engine.cancelled and time.time() < deadline:
                time.sleep(0.02)
            assert engine.cancelled and engine.active and not engine.waiting, "dropped while the slot was busy"
            assert app.state.scheduler.outstanding == 1
            assert first.result().json()["choices"][0]["text"] == "x" * 150


def test_rendering_a_long_chat_does_not_stall_other_clients():
    """The chat template's tokenization (a long document: seconds) ran on the event loop: every
    other client, streams and /health included, stalled meanwhile (a 620K-token chat took 0.9 s
    on CPU). Like counting a completion's tokens, it now runs in a thread."""
    rendering = threading.Event()

    class SlowChat(SpellEngine):
        def render_chat(self, messages):
            rendering.set()
            time.sleep(1.5)
            return super().render_chat(messages)

    with running(create_app(SlowChat())) as base:
        with ThreadPoolExecutor(1) as pool:
            chat = pool.submit(httpx.post, base + "/v1/chat/completions", timeout=30, json={
                "model": "spell", "messages": [{"role": "user", "content": "spell long"}]})
            assert rendering.wait(10)
            start = time.time()
            assert httpx.get(base + "/health", timeout=30).status_code == 200
            assert time.time() - start < 0.75, "the event loop was blocked"
            assert chat.result().json()["choices"][0]["message"]["content"] == "long"


def test_a_stopped_worker_ends_its_jobs_and_refuses_new_ones():
    """The worker stopping (here: a BaseException while queueing) ends the job it held and every
    queued one, and submit refuses new ones even in the window before the thread is seen dead
    (is_alive still True): none waits forever on a worker that is gone."""
    from infinitehip.engine.sampling import SamplingParams
    from infinitehip.server.scheduler import Scheduler, Unavailable

    sched = Scheduler(SpellEngine(), max_queue=4)
    job = sched.submit("fatal now", SamplingParams(max_new_tokens=3))
    with pytest.raises(Unavailable, match="stopped before this request started"):
        list(job.results())
    sched._worker.join(timeout=10)
    sched._worker.is_alive = lambda: True           # the race: submit checked before the thread ended
    with pytest.raises(Unavailable, match="worker stopped"):
        sched.submit("still here", SamplingParams(max_new_tokens=3))
    assert sched.outstanding == 0


def test_null_is_the_default_as_in_openai_api(url):
    """OpenAI's optional fields are nullable: a client that sends every field, unset ones as null,
    got a 400 ("temperature: Input should be a valid number", "n is not supported")."""
    nulls = dict.fromkeys(["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
                           "stream_options", "user", "n", "best_of", "logprobs", "echo", "suffix", "presence_penalty",
                           "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice"])
    r = httpx.post(url + "/v1/completions", json={"model": "spell", "prompt": "spell abcdefghijklmnopqrstu", **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "abcdefghijklmnop"        # max_tokens: the default 16
    msg = {"role": "user", "content": "spell hi", "name": None, "tool_calls": None}   # e.g. an answer sent back
    r = httpx.post(url + "/v1/chat/completions", json={"model": "spell", "messages": [msg], **nulls})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi", r.text


def test_chat_takes_text_parts_and_the_developer_role(spell, client):
    """OpenAI's content parts ([{"type": "text", ...}]) and the developer role (its newer name for
    system) were 400s, though text-only clients send them."""
    url, engine = spell
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "spell"}, {"type": "text", "text": "cat"}]}]
    r = client.chat.completions.create(model="spell", messages=messages, max_tokens=10)
    assert r.choices[0].message.content == "cat"
    assert engine.rendered == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "spell\ncat"}]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "spell", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}]})
    assert r.status_code == 400 and "'image_url' is not supported" in r.json()["error"]["message"], r.text


def test_chat_answers_up_to_the_capacity_by_default(url, client):
    """Chat's max_tokens defaulted to completions' 16 (OpenAI's chat has no such cut): answers were
    cut at 16 tokens unless the client asked for more."""
    word = "abcdefghijklmnopqrstuvwxyz"
    r = client.chat.completions.create(model="spell", messages=[{"role": "user", "content": f"spell {word}"}])
    assert r.choices[0].message.content == word and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="spell", prompt=f"spell {word}")         # completions: still 16
    assert r.choices[0].text == word[:16] and r.choices[0].finish_reason == "length"
    full = httpx.post(url + "/v1/chat/completions", json={"model": "spell", "messages": [
        {"role": "user", "content": "x " * 200}]})
    assert full.status_code == 400 and "leaving none to answer with" in full.json()["error"]["message"], full.text


def test_a_message_field_the_server_ignores_is_400(url):
    """Fields of a message were dropped unseen (tool_calls: the model answered without them)."""
    msg = {"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "type": "function"}]}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "spell", "messages": [msg]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.tool_calls", r.text


@pytest.mark.parametrize("method, path, status", [("POST", "/v1/nothing", 404), ("GET", "/v1/completions", 405)])
def test_routing_errors_are_openai_shaped(url, method, path, status):
    """Starlette's own errors answered {"detail": "Not Found"}: the openai client shows no message."""
    r = httpx.request(method, url + path)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_retrieve_model(client):
    """client.models.retrieve (GET /v1/models/{id}) was a 404 for the served model too."""
    assert client.models.retrieve("spell").id == "spell"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")


def test_an_error_mid_stream_is_openai_shaped(url):
    """After the 200, an error comes as an event: it lacked param and code, and was typed
    server_error even for a refused request."""
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"model": "spell", "prompt": "explode now", "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["error"] == {"message": "internal server error", "type": "server_error",
                                                            "param": None, "code": None}


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt.1: Input should be a valid integer"),
    ("/v1/completions", {"prompt": [[True]]}, "prompt.0: Input should be a valid integer"),
    ("/v1/completions", {"prompt": None}, "prompt: Input should be a valid string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                         "cache_control": {}}]}]},
     "messages.0.content.0.cache_control: Extra inputs are not permitted"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text: Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
     "messages.0.content.0.type: Field required"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop: Input should be a valid string"),      # was stop.str
    ("/v1/completions", {"prompt": "x", "stop": ["a", 5]}, "stop.1: Input should be a valid string"),
])
def test_a_string_or_list_field_names_the_real_error(url, path, body, message):
    """prompt, content and stop (a string or a list) reported the string member's error, with
    pydantic's name of it for the field: [1, "a"] or a text part with an unknown field was
    "prompt.function-after[_unicode(), str]: Input should be a valid string"; a part without a
    type was "of type None is not supported"."""
    r = httpx.post(url + path, json={"model": "spell", **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"] == message and error["param"] == message.split(":")[0], r.text
