"""`infinitehip eval` end to end at a short length, and the endpoint mode against a stub server."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from infinitehip.cli import app
from infinitehip.eval.runner import EvalSpec, endpoint_completer, parse_length, run_eval
from infinitehip.eval.tasks import TokenCounter

FIELDS = {"task", "method", "length", "length_over_trained", "depth", "accuracy", "samples", "model", "device", "date"}


def test_parse_length():
    assert parse_length("4096", None) == 4096
    assert parse_length("8k", None) == 8192
    assert parse_length("32x", 512) == 16384
    with pytest.raises(ValueError):
        parse_length("2x", None)


def test_eval_of_a_missing_model_says_so(tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--tasks", "passkey", "--lengths", "1x"])
    assert res.exit_code != 0 and "does not exist" in res.output, res.output


def test_eval_command_end_to_end(tmp_path):
    res = CliRunner().invoke(app, ["eval", "builtin", "--tasks", "passkey", "--lengths", "0.75x,2x",
                                   "--methods", "hip,streaming", "--samples", "1", "--depths", "0.2",
                                   "--device", "cpu", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "eval.json").read_text())
    recs = data["records"]
    assert len(recs) == 4 and all(FIELDS <= set(r) for r in recs)
    assert {r["length"] for r in recs} == {384, 1024}
    assert {r["length_over_trained"] for r in recs} == {0.75, 2.0}
    assert (tmp_path / "eval_accuracy_vs_length.png").stat().st_size > 0
    assert (tmp_path / "eval_depth_hip.png").stat().st_size > 0
    hip = {r["length"]: r["accuracy"] for r in recs if r["method"] == "hip"}
    assert hip[384] == 1.0


class _Echo(BaseHTTPRequestHandler):
    """Answers every completion with the pass key found in the prompt (a perfect model)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["temperature"] == 0.0
        key = body["prompt"].split("The pass key is ")[1].split(".")[0]
        out = json.dumps({"choices": [{"text": " " + key, "index": 0}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_endpoint_mode():
    server = HTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        words = TokenCounter(lambda s: s.split())
        complete = endpoint_completer(f"http://127.0.0.1:{server.server_port}", "stub")
        spec = EvalSpec(("passkey",), (300,), ("endpoint",), (0.5,), samples=2)
        recs = run_eval(spec, {"endpoint": complete}, words, model_name="stub", device="endpoint", trained=None)
        assert [r["accuracy"] for r in recs] == [1.0]
    finally:
        server.shutdown()
