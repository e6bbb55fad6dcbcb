"""`infinitehip eval` end to end at a short length, and the endpoint mode against a stub server."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infinitehip.cli import app
from infinitehip.eval.runner import EvalSpec, endpoint_completer, run_eval
from infinitehip.eval.tasks import TokenCounter

FIELDS = {"task", "method", "length", "length_over_trained", "depth", "accuracy", "samples", "model", "device", "date"}


def test_eval_of_a_missing_model_says_so(tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--tasks", "passkey", "--lengths", "1x"])
    assert res.exit_code != 0 and "does not exist" in res.output, res.output


@pytest.mark.parametrize("option, value, message", [
    ("--depths", "", "no depths given"),        # an empty table, then "Number of columns must be a positive integer"
    ("--tasks", "", "no tasks given"),
    ("--methods", " , ", "no methods given"),
    ("--lengths", "", "no lengths given"),
    ("--lengths", "8k,abc", "length 'abc' is not a length"),   # float()'s "could not convert string to float"
    ("--lengths", "nanx", "length 'nanx' is not a length"),    # "cannot convert float NaN to integer"
    ("--depths", "0.5,mid", "--depths 0.5,mid: write numbers in [0, 1]"),
    # the same cell twice was run twice and averaged twice in the table and plots
    ("--lengths", "512,1x", "lengths [512] given more than once"),
    ("--depths", "0.5,0.50", "depths [0.5] given more than once"),
    ("--lengths", "64.9", "length '64.9' is not a whole number of tokens"),   # silently 64
    # both said "need samples >= 1 and every length >= 64 tokens", whichever was wrong
    ("--samples", "0", "samples=0: give at least 1 prompt per cell (--samples)"),
    ("--lengths", "32,1x", "lengths [32] are too short: give at least 64 tokens"),
])
def test_eval_bad_lists_are_one_line_errors_before_any_work(tmp_path, option, value, message):
    args = {"--tasks": "passkey", "--lengths": "1x", "--methods": "hip", "--depths": "0.5", option: value}
    res = CliRunner().invoke(app, ["eval", "builtin", "--samples", "1", "--out", str(tmp_path),
                                   *[x for kv in args.items() for x in kv]])
    assert res.exit_code == 1 and f"error: {message}" in res.output and "accuracy" not in res.output, res.output
    assert not (tmp_path / "eval.json").exists()


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

    served = "stub"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["temperature"] == 0.0
        if body["model"] != self.served:   # as `serve` does: the model id is the directory's name
            return self._reply(404, {"error": {"message": f"model {body['model']!r} is not served here"}})
        key = body["prompt"].split("The pass key is ")[1].split(".")[0]
        self._reply(200, {"choices": [{"text": " " + key, "index": 0}]})

    def _reply(self, status, payload):
        out = json.dumps(payload).encode()
        self.send_response(status)
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


def test_eval_of_a_model_directory_asks_the_endpoint_for_its_served_name(tmp_path, monkeypatch):
    """With --endpoint, MODEL is a directory (its tokenizer counts the lengths) and the request
    names the served id, the directory's name (the full path got a 404 on every request; "."
    asked for model ""); a server's error comes back with its message."""
    from typer.testing import CliRunner

    from infinitehip.assets import resolve_model_path
    from infinitehip.cli import app

    model_dir = tmp_path / "stub"
    model_dir.mkdir()
    for f in Path(resolve_model_path("builtin")).iterdir():
        if f.is_file():
            (model_dir / f.name).write_bytes(f.read_bytes())
    server = HTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        args = ["--tasks", "passkey", "--lengths", "300", "--samples", "1", "--depths", "0.5", "--endpoint", url,
                "--out", str(tmp_path / "out")]
        res = CliRunner().invoke(app, ["eval", str(model_dir), *args])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "out" / "eval.json").read_text())["records"][0]["accuracy"] == 1.0
        monkeypatch.chdir(model_dir)
        res = CliRunner().invoke(app, ["eval", ".", *args])
        assert res.exit_code == 0, res.output
        (tmp_path / "other").mkdir()
        for f in model_dir.iterdir():
            (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
        res = CliRunner().invoke(app, ["eval", str(tmp_path / "other"), *args])
        assert res.exit_code == 1 and "answered 404: model 'other' is not served here" in res.output, res.output
    finally:
        server.shutdown()


def test_methods_with_an_endpoint_is_refused(tmp_path):
    """--endpoint evaluated the server's one backend and ignored --methods (a table of "endpoint"
    rows for --methods dense): a one-line error before any request; without --endpoint it runs."""
    args = ["eval", "builtin", "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--depths", "0.5",
            "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args + ["--endpoint", "http://127.0.0.1:9", "--methods", "dense"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "--methods dense picks local attention backends" in res.output and "leave --methods out" in res.output
    res = CliRunner().invoke(app, args + ["--methods", "dense"])
    assert res.exit_code == 0, res.output
    assert [r["method"] for r in json.loads((tmp_path / "eval.json").read_text())["records"]] == ["dense"]


def test_unknown_method_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """--methods hipp was found only by the first completion, after the model loaded and the
    prompts were built (minutes for a large checkpoint); found by trying a misspelt method."""
    import infinitehip.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load", no_load)
    res = CliRunner().invoke(app, ["eval", "builtin", "--tasks", "passkey", "--lengths", "1x", "--methods", "hip,hipp",
                                   "--samples", "1", "--depths", "0.5", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "unknown method(s) ['hipp']" in res.output, res.output
    with pytest.raises(ValueError, match="unknown method"):
        EvalSpec(("passkey",), (512,), ("Dense",))


@pytest.mark.parametrize("argv, message", [
    # found by the first prefill, after the model loaded (and named chunk_size=, not the option)
    (["--chunk-size", "0"], "--chunk-size 0 must be >= 1"),
    # loaded the model, then "backend='endpoint'; choose one of ('hip', 'dense', 'streaming')"
    (["--endpoint", " ", "--methods", None], "--endpoint is empty: give the server's URL"),
    # found when its cell came, after every cell of the tasks before it had run
    (["--tasks", "passkey,niah_multivalue", "--lengths", "100,2x"],
     "length 100 is too short for niah_multivalue: its question and needles alone take"),
])
def test_eval_arguments_that_fail_later_are_refused_before_the_model_loads(tmp_path, monkeypatch, argv, message):
    import infinitehip.eval.command as command
    import infinitehip.models.loader as loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(command, "run_eval", lambda *a, **k: pytest.fail("ran the eval"))
    args = {"--tasks": "passkey", "--lengths": "1x", "--methods": "hip", "--samples": "1", "--depths": "0.5",
            "--out": str(tmp_path), **dict(zip(argv[::2], argv[1::2]))}
    res = CliRunner().invoke(app, ["eval", "builtin", *[x for kv in args.items() if kv[1] is not None for x in kv]])
    assert res.exit_code == 1 and f"error: {message}" in res.output and isinstance(res.exception, SystemExit), \
        res.output


@pytest.mark.parametrize("answer", [b"{}", b'{"choices": []}', b"<html>Not Found</html>"])
def test_an_endpoint_that_is_no_completions_server_is_a_one_line_error(answer):
    """A 200 answer without choices[0].text (another kind of server, a wrong path behind a proxy)
    was a KeyError or IndexError traceback, or JSON's bare "Expecting value: line 1 column 1";
    a server that is not running said "<urlopen error [Errno 111] Connection refused>"."""

    class Odd(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/completions"
        with pytest.raises(ValueError, match=rf"{url} did not answer like an OpenAI-compatible completions endpoint "
                                             r"\(no choices\[0\]\.text in b'.*'\): check --endpoint"):
            endpoint_completer(url.removesuffix("/completions"), "stub")("prompt", 4)
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match=r"cannot reach http://127\.0\.0\.1:9/v1/completions \(.*\): is the server "
                                         r"running \(infinitehip serve\)\?"):
        endpoint_completer("http://127.0.0.1:9", "stub")("prompt", 4)


def test_local_model_options_with_an_endpoint_are_refused(tmp_path):
    """--preset, --hip, --device and --dtype configure the local model: with --endpoint they were
    silently ignored (and --preset / --hip written into eval.json's spec as if they had applied)."""
    args = ["eval", "builtin", "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--depths", "0.5",
            "--out", str(tmp_path), "--endpoint", "http://127.0.0.1:9"]
    for extra, flags in ((["--hip", "budget=64"], "--hip"), (["--preset", "fast", "--dtype", "float32"],
                                                              "--preset, --dtype")):
        res = CliRunner().invoke(app, args + extra)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert f"error: {flags} configure the local model" in res.output and f"leave {flags} out" in res.output
    assert not (tmp_path / "eval.json").exists()


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_run(tmp_path, monkeypatch):
    """--out naming a file: the whole eval ran, then saving its results failed ("File exists")."""
    import infinitehip.eval.command as command

    monkeypatch.setattr(command, "run_eval", lambda *a, **k: pytest.fail("ran the eval"))
    (tmp_path / "results.txt").write_text("")
    res = CliRunner().invoke(app, ["eval", "builtin", "--tasks", "passkey", "--lengths", "300", "--samples", "1",
                                   "--depths", "0.5", "--methods", "hip", "--out", str(tmp_path / "results.txt")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"error: --out {tmp_path / 'results.txt'}: cannot make the results folder there" in res.output
