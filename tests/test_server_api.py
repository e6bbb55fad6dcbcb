"""The HTTP layer with the real `openai` client, over a deterministic test engine.

The engine here spells the prompt's last word back one letter per token, so every answer is
known in advance; tests with the built-in model are in test_server_model.py.
"""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from infinitehip.server.app import create_app  # noqa: E402


class SpellEngine:
    model_id = "spell"
    max_context = 200

    def render_chat(self, messages):
        return " ".join(m["content"] for m in messages)

    def count_tokens(self, text):
        return len(text.split())

    def stream(self, prompt, *, max_tokens, temperature, top_p, seed, stop, cancelled):
        word = prompt.split()[-1][:max_tokens]
        for s in stop:  # OpenAI semantics: the answer ends before the first stop string
            word = word.split(s)[0]
        for n, ch in enumerate(word, 1):
            time.sleep(0.002)
            yield ch, n


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


@pytest.fixture(scope="module")
def url():
    server, thread, base = serve(create_app(SpellEngine(), max_queue=8))
    yield base
    server.should_exit = True
    thread.join(timeout=10)


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


def test_chat_stop_and_stream(client):
    r = client.chat.completions.create(model="spell", messages=[{"role": "user", "content": "spell banana"}],
                                       max_tokens=50, stop=["nan"])
    assert r.choices[0].message.content == "ba" and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="spell", messages=[{"role": "user", "content": "spell world"}], max_tokens=50, stream=True)]
    assert "".join(p for p in pieces if p) == "world"


def test_concurrent_requests_match_serial(client):
    words = [f"w{i}abc{i}" for i in range(8)]
    alone = [client.completions.create(model="spell", prompt=w, max_tokens=20).choices[0].text for w in words]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda w: client.completions.create(model="spell", prompt=w, max_tokens=20)
                                 .choices[0].text, words))
    assert together == alone == words


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "spell"}).encode(), 400, "prompt"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "not served here"),
    (json.dumps({"model": "spell", "prompt": "x", "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"model": "spell", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "spell", "prompt": "x " * 199, "max_tokens": 5}).encode(), 400, "capacity of 200"),
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
