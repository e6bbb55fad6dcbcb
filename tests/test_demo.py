"""`infinitehip demo` at a small length finds the hidden pass key."""
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
