"""``infinitehip generate --offload`` / ``--offload-fp8`` / ``--offload-gpu-layers`` and the offload
lines of ``infinitehip info``."""
import torch
from typer.testing import CliRunner

from infinitehip.assets import builtin_model_path
from infinitehip.cli import _offload_row, app
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
    if torch.cuda.is_available():   # whole layers in GPU memory (a CPU has none: refused, below)
        mixed = runner.invoke(app, base + ["--offload-gpu-layers", "2"])
        assert mixed.exit_code == 0, mixed.output
        assert mixed.stdout == plain.stdout
    fp8 = runner.invoke(app, base + ["--offload-fp8"])
    assert fp8.exit_code == 0, fp8.output
    bad = runner.invoke(app, base + ["--offload", "--cuda-graph", "--device", "cpu"])
    assert bad.exit_code == 1 and "needs a CUDA device" in bad.output and isinstance(bad.exception, SystemExit)
    if torch.cuda.is_available():   # offloaded decode replayed from CUDA graphs: the same text
        graph = runner.invoke(app, base + ["--offload", "--cuda-graph"])
        assert graph.exit_code == 0, graph.output
        assert graph.stdout == plain.stdout


def test_offload_gpu_layers_without_a_gpu_is_refused():
    """On the CPU --offload-gpu-layers 2 ran: its "GPU" layers sat in host memory, uncounted by the
    capacity check. Now a one-line error; 0 (every layer in host memory) still runs."""
    runner = CliRunner()
    base = ["generate", "builtin", "--prompt", PROMPT, "-n", "3", "--preset", "tiny", "--chunk-size", "256",
            "--device", "cpu"]
    bad = runner.invoke(app, base + ["--offload-gpu-layers", "2"])
    assert bad.exit_code == 1 and isinstance(bad.exception, SystemExit), bad.output
    assert "--offload-gpu-layers 2 keeps layers in GPU memory" in bad.output and "runs on cpu" in bad.output
    none = runner.invoke(app, base + ["--offload-gpu-layers", "0"])
    assert none.exit_code == 0, none.output
    negative = runner.invoke(app, base + ["--offload-gpu-layers", "-1"])   # said it keeps layers in GPU memory
    assert negative.exit_code == 1 and "OffloadConfig.gpu_layers=-1 must be None (automatic) or" in negative.output


def test_generate_hip_overrides():
    """--hip FIELD=VALUE changes the preset's config (stage 0 stopped after 2 levels: it still
    runs); a bad field or value is a one-line error naming it."""
    runner = CliRunner()
    base = ["generate", "builtin", "--prompt", PROMPT, "-n", "3", "--preset", "tiny", "--chunk-size", "256"]
    ok = runner.invoke(app, base + ["--hip", "stage0_levels=2", "--offload"])
    assert ok.exit_code == 0, ok.output
    for bad, message in ((["--hip", "levels=2"], "no field 'levels'"), (["--hip", "stage0_levels=0"], "stage0_levels"),
                         (["--hip", "budget"], "FIELD=VALUE")):
        r = runner.invoke(app, base + bad)
        assert r.exit_code == 1 and message in r.output and isinstance(r.exception, SystemExit), r.output


def test_info_reports_offload_capacity():
    r = CliRunner().invoke(app, ["info", "builtin"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "longest context, KV offload" in out and "KV offload + FP8" in out and "free host memory" in out
    info = inspect_checkpoint(builtin_model_path())
    assert info["max_context_offload_fp8"] > info["max_context_offload"] > 0


def test_info_offload_rows_count_spare_gpu_memory():
    """On a GPU machine (numbers given: deterministic) the offload rows add whole layers in the GPU
    memory the weights leave when the host is short, and say how much of each memory."""
    mib = 1 << 20
    r = {"offload_useful": True, "dtype": "bfloat16", "device": "cuda", "layers": 6, "weights_bytes": 64 * mib,
         "free_bytes": 64 * mib + 600 * mib, "host_free_bytes": 64 * mib}
    row = _offload_row(str(builtin_model_path()), r, fp8=False)
    assert "layers whole on the GPU" in row and "GiB host" in row and "GiB GPU memory" in row
    tokens = int(row.split(" tokens")[0].replace(",", ""))
    host_only = int(0.9 * 64 * mib / (6 * 2 * 2 * 64 * 2))    # bf16: 6 layers x K 2 x D 64, K and V
    assert tokens > 2 * host_only
    fp8 = _offload_row(str(builtin_model_path()), r, fp8=True)
    assert int(fp8.split(" tokens")[0].replace(",", "")) > 1.5 * tokens
    # Prefill goes layer by layer while the hidden states (dim 256, bf16) and one layer's K/V fit
    # in half the GPU memory left: here that is the whole context; with a host holding far more, up
    # to where they fill it.
    assert "prefill layer by layer throughout" in row
    short = _offload_row(str(builtin_model_path()), {**r, "host_free_bytes": 4096 * mib}, fp8=False)  # ~1M tokens
    assert "prefill layer by layer up to" in short and "chunk by chunk (slow: quadratic) past it" in short
    reach = int(short.split("layer by layer up to ")[1].split(" tokens")[0].replace(",", ""))
    assert 0 < reach < int(short.split(" tokens")[0].replace(",", ""))


def test_info_offload_on_cpu_leaves_the_weights_their_host_memory(monkeypatch):
    """On the CPU the weights and the offloaded store share host memory: the context `info` reports
    must pass generate's plan, made from what is free once the weights are loaded (it counted
    the weights' bytes as free: 39,328 tokens where 35,936 fit), and rounds to whole pages."""
    import infinitehip
    import infinitehip.cache.kv as kv
    from infinitehip.cache.offload_plan import OffloadConfig, plan_offload

    free = 256 << 20
    monkeypatch.setattr(kv, "free_memory", lambda device: free)
    info = inspect_checkpoint(builtin_model_path(), device="cpu")
    model = infinitehip.load(builtin_model_path(), device="cpu")
    a = model.args
    for fp8, key in ((False, "max_context_offload"), (True, "max_context_offload_fp8")):
        plan_offload(n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, batch=1,
                     capacity=info[key], dtype=model.dtype, device=model.device,
                     layer_configs=model.net.layer_configs, config=OffloadConfig(fp8=fp8),
                     free_host=free - info["weights_bytes"])


def test_info_on_a_gpu_with_a_bad_recommended_config_is_a_one_line_error(tmp_path, monkeypatch):
    """On a GPU `info` works out the offload rows with the checkpoint's recommended config: a bad
    one in config.json was a traceback there (the table was drawn outside the error handling)."""
    import json
    import shutil

    import infinitehip.models.loader as loader

    path = tmp_path / "m"
    shutil.copytree(builtin_model_path(), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "infinitehip": {"preset": "papr"}}))
    real = loader.inspect_checkpoint
    monkeypatch.setattr(loader, "inspect_checkpoint", lambda *a, **k: {**real(*a, **k), "offload_useful": True})
    r = CliRunner().invoke(app, ["info", str(path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output   # not the ValueError itself
    assert "error: config.json's \"infinitehip\" recommendation is invalid: unknown preset 'papr'" in r.output


def test_info_without_a_trained_context_says_so(tmp_path):
    """A config.json without max_position_embeddings printed "trained context 0 tokens"."""
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(builtin_model_path(), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("max_position_embeddings")
    (path / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["info", str(path)])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "trained context │ unknown (config.json has no" in out, out   # a wrapped cell
