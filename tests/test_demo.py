"""`infinitehip demo` at a small length finds the hidden pass key."""
import pytest
from typer.testing import CliRunner

from infinitehip.cli import app
from infinitehip.demo import run_demo


def test_run_demo_finds_the_pass_key():
    r = run_demo(context=1024, depth=0.3, seed=0, methods=("hip",), device="cpu")
    assert r.context <= 1024 and r.trained_context == 512
    assert r.correct["hip"] and r.answers["hip"].startswith(r.expected)


def test_demo_command():
    res = CliRunner().invoke(app, ["demo", "--context", "1024", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "InfiniteHiP" in res.output and "sink + window" in res.output and "expected" in res.output


@pytest.mark.parametrize("argv, message", [
    (["--context", "100"], "--context 100: give at least 256 tokens"),      # said "need 0 <= depth <= 1 and ..."
    (["--depth", "1.5"], "--depth 1.5: the needle's depth is a fraction"),
])
def test_demo_names_the_bad_value(argv, message):
    res = CliRunner().invoke(app, ["demo", "--device", "cpu", *argv])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_demo_below_the_trained_context_gives_the_fraction(monkeypatch):
    """--context 256 (legal: at least 256) printed "256-token prompt = 0x the model's trained context"."""
    import infinitehip.demo as demo

    each = lambda value: dict.fromkeys(demo.METHODS, value)   # noqa: E731
    result = demo.DemoResult(256, 512, 0.35, "What is the pass key?", "12345", each("12345"), each(True), each(1.0),
                             "cpu")
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: result)
    res = CliRunner().invoke(app, ["demo", "--context", "256", "--device", "cpu"])
    assert res.exit_code == 0 and "256-token prompt = 0.5x the model's" in " ".join(res.output.split()), res.output
