"""``infinitehip generate --offload`` / ``--offload-fp8`` and the offload lines of ``infinitehip info``."""
from typer.testing import CliRunner

from infinitehip.assets import builtin_model_path
from infinitehip.cli import app
from infinitehip.models.loader import inspect_checkpoint

PROMPT = "the " * 560      # past the built-in model's trained 512 tokens


def test_generate_offload_flags_give_the_same_text():
    runner = CliRunner()
    base = ["generate", "builtin", "--prompt", PROMPT, "-n", "3", "--preset", "tiny", "--chunk-size", "256"]
    plain = runner.invoke(app, base + ["--no-offload"])
    assert plain.exit_code == 0, plain.output
    offloaded = runner.invoke(app, base + ["--offload"])
    assert offloaded.exit_code == 0, offloaded.output
    assert offloaded.stdout == plain.stdout
    fp8 = runner.invoke(app, base + ["--offload-fp8"])
    assert fp8.exit_code == 0, fp8.output
    bad = runner.invoke(app, base + ["--offload", "--cuda-graph"])
    assert bad.exit_code == 1 and "cuda_graph" in bad.output and "Traceback" not in bad.output


def test_info_reports_offload_capacity():
    r = CliRunner().invoke(app, ["info", "builtin"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "longest context, KV offload" in out and "KV offload + FP8" in out and "free host memory" in out
    info = inspect_checkpoint(builtin_model_path())
    assert info["max_context_offload_fp8"] > info["max_context_offload"] > 0
