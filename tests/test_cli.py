"""The command line: clean one-line errors and exit codes, generate and info end to end."""
import pytest
import torch
from checkpoints import make_checkpoint
from typer.testing import CliRunner

from infinitehip.cli import app

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "gpu"], "device='gpu' is not a device"),             # a traceback: demo caught nothing
    (["generate", "builtin", "-p", "hi", "--device", "gpu"], "device='gpu' is not a device"),   # torch's RuntimeError
    (["generate", "builtin", "-p", "hi", "-n", "2", "--temperature", "nan"], "temperature=nan must be"),
    (["serve", "builtin", "--port", "99999"], "--port 99999 is not a TCP port"),   # uvicorn's OverflowError
    (["generate", "builtin", "-p", "hi", "--system", "be brief"], "system= is the chat template's"),  # dropped
])
def test_cli_bad_values_are_one_line_errors(argv, message):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 1 and f"error: {message}" in r.output and isinstance(r.exception, SystemExit), r.output


@pytest.mark.parametrize("argv, message", [
    (["--max-queue", "-1"], "--max-queue -1 must be >= 0"),                  # served with one slot fewer
    (["--context-cache", "no/such/dir/c.st"], "--context-cache no/such/dir/c.st: its folder does not exist"),
    (["--device", "cpu", "--cuda-graph"], "cuda_graph=True needs a CUDA device"),
])                                                                          # ^ served, then lost the cache at exit
def test_cli_serve_refuses_bad_values_before_serving(argv, message, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served"))
    r = CliRunner().invoke(app, ["serve", "builtin", "--max-batch", "1", "--max-context", "1024", *argv])
    assert r.exit_code == 1 and f"error: {message}" in r.output and isinstance(r.exception, SystemExit), r.output


def test_cli_serve_takes_dtype(monkeypatch):
    """serve's out-of-memory error says "Use a smaller dtype (bfloat16/float16)", but serve had no
    --dtype (generate, eval and info have one): on the CPU it could only serve float32."""
    uvicorn = pytest.importorskip("uvicorn")
    import infinitehip.server.app as server_app

    served = {}
    create_app = server_app.create_app
    monkeypatch.setattr(server_app, "create_app",
                        lambda engine, **k: served.update(dtype=engine.model.dtype) or create_app(engine, **k))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    r = CliRunner().invoke(app, ["serve", "builtin", "--device", "cpu", "--max-batch", "1", "--max-context", "1024",
                                 "--dtype", "bfloat16"])
    assert r.exit_code == 0 and served == {"dtype": torch.bfloat16}, r.output


def test_cli_version():
    from infinitehip import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"infinitehip {__version__}", r.output


def test_cli_serve_help_names_the_server_extra():
    """typer renders help as rich markup: an unescaped [server] vanished, leaving `pip install infinitehip`."""
    for argv in (["serve", "--help"], ["--help"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0 and "infinitehip[server]" in r.output, r.output


def test_cli_generate_and_info(ckpt, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "hello", "-n", "4", "--preset", "tiny",
                            "--backend", "dense"])
    assert r.exit_code == 0, r.output
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("hello")
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt-file", str(prompt_file), "--chat", "-n", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(ckpt)])
    assert r.exit_code == 0 and "Qwen3ForCausalLM" in r.output and "longest context" in r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert r.exit_code == 1 and "error: model directory" in r.output and isinstance(r.exception, SystemExit)
    r = runner.invoke(app, ["generate", str(ckpt)])
    assert r.exit_code == 1 and "exactly one of --prompt and --prompt-file" in r.output
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))   # the codec's words, no file named
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt-file", str(tmp_path / "latin1.txt")])
    assert r.exit_code == 1 and f"--prompt-file {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3" in r.output


def test_cli_prompt_file_reads_stdin_and_refuses_what_has_no_prompt(tmp_path):
    """--prompt-file - said "No such file or directory: '-'"; an empty file went to the model as its
    start token alone, silently; a folder said "[Errno 21] Is a directory: ..." without the option."""
    runner = CliRunner()
    argv = ["generate", "builtin", "-n", "3", "--device", "cpu"]
    want = runner.invoke(app, [*argv, "--prompt", "The grass"])
    got = runner.invoke(app, [*argv, "--prompt-file", "-"], input="The grass")
    assert got.exit_code == 0 and got.stdout == want.stdout and got.stdout.strip(), got.output
    (tmp_path / "empty.txt").write_text("\n")
    for path, stdin, message in ((tmp_path / "empty.txt", None, "has no text: give a file with the prompt"),
                                 ("-", "", "has no text"), (tmp_path, None, "cannot read it (Is a directory)"),
                                 (tmp_path / "missing.txt", None, "cannot read it (No such file or directory)")):
        r = runner.invoke(app, [*argv, "--prompt-file", str(path)], input=stdin)
        assert r.exit_code == 1 and f"error: --prompt-file {path}" in r.output and message in r.output, r.output
        assert isinstance(r.exception, SystemExit)


def test_cli_serve_offloads_in_fp8(monkeypatch):
    """serve's out-of-memory advice named --offload-fp8, which serve lacked; its context cache must
    not hand KV computed through FP8 storage to a server storing bf16 (or the reverse)."""
    uvicorn = pytest.importorskip("uvicorn")
    import infinitehip.server.app as server_app
    from infinitehip.engine.prefix_cache import fingerprint

    served = {}
    create_app = server_app.create_app
    monkeypatch.setattr(server_app, "create_app", lambda engine, **k: served.update(engine=engine) or create_app(engine, **k))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    r = CliRunner().invoke(app, ["serve", "builtin", "--device", "cpu", "--max-batch", "1", "--max-context", "1024",
                                 "--offload-fp8"])
    assert r.exit_code == 0, r.output
    runner = served["engine"].runner
    assert runner.cache.config.fp8
    assert runner.owner == fingerprint(runner.model, "hip", fp8=True) != fingerprint(runner.model, "hip")
    r = CliRunner().invoke(app, ["serve", "builtin", "--device", "cpu", "--no-offload", "--offload-fp8"])
    assert r.exit_code == 1 and "--no-offload contradicts --offload-fp8" in r.output, r.output
