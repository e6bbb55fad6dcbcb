"""The attention bench's in-graph decode timing (its CUDA parts replaced: this checks the wiring):
every layer's call attends with its own query, keys and mask, at the refresh kind being timed."""
import argparse
import contextlib
import importlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention
from infinitehip.bench import attention as bench


def test_decode_in_graph_times_each_layer_with_its_own_inputs(monkeypatch):
    timed = []
    monkeypatch.setattr(bench, "in_graph_ms", lambda calls: timed.append([c() for c in calls]) or 1.0)
    monkeypatch.setattr(bench, "_sdpa", lambda name: contextlib.nullcontext())
    cfg, rope = HiPConfig.preset("tiny", dense_threshold=0), RoPE.default(64)
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(1, 2, 900, 64, generator=g), torch.randn(1, 2, 900, 64, generator=g)
    qs = [torch.randn(1, 1, 8, 64, generator=g) for _ in range(3)]
    layers = [(kc[:, :, 100 * i:100 * i + 600], vc[:, :, 100 * i:100 * i + 600]) for i in range(3)]
    hip, dense = bench.decode_in_graph(qs, layers, cfg, rope)
    assert sorted(hip) == list(range(cfg.n_stages + 1)) and dense == 1.0
    assert len(timed) == cfg.n_stages + 2 and all(len(t) == 3 for t in timed)
    for i, (q, (k, v)) in enumerate(zip(qs, layers)):   # the full-refresh graph: what each layer alone gives
        want, _ = hip_attention(q, k.transpose(1, 2), v.transpose(1, 2), config=cfg, rope=rope, backend="triton")
        torch.testing.assert_close(timed[0][i][0], want)
        dense_want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)
        torch.testing.assert_close(timed[-1][i], dense_want)
    assert not torch.equal(timed[0][0][0], timed[0][1][0]), "layers differ"


def test_cli_bench_help_reaches_the_benchmark():
    """`infinitehip bench attention --help` is the benchmark's own help (its options), not the
    `bench` command's; `bench --help` alone still names the benchmarks."""
    from typer.testing import CliRunner

    from infinitehip.cli import app

    r = CliRunner().invoke(app, ["bench", "attention", "--help"])
    assert r.exit_code == 0 and "--decode" in r.output and "--stage0-levels" in r.output
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "attention, engine, offload" in r.output


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "128x"], "argument --contexts: '128x': positive token counts"),   # int() after the model was built
    (["--contexts", "32768,"], "argument --contexts: '32768,': positive token counts"),
    (["--contexts", "0"], "argument --contexts: '0': positive token counts"),
    (["--contexts", ""], "argument --contexts: '' is empty: give at least one context"),                                          # max() of nothing
    (["--backends", "hip,flash"], "--backends 'hip,flash': choose from hip, dense, streaming"),
    (["--decode-steps", "0"], "--decode-steps 0: time at least 1 decode step"),   # ZeroDivisionError
])
def test_engine_bench_refuses_bad_arguments_before_the_gpu_work(argv, message, monkeypatch, capsys):
    from infinitehip.bench import engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine, "copy_bandwidth", lambda *a, **k: pytest.fail("started the benchmark"))
    with pytest.raises(SystemExit) as e:
        engine.main(argv)
    assert message in f"{e.value.code} {capsys.readouterr().err}"


def test_context_lists_take_k_and_m_in_either_case():
    """eval --lengths took 8k where bench attention took only 8K; bench engine and offload took
    neither (128K was refused): all three parse their context flags with parse_contexts."""
    from infinitehip.bench import parse_contexts

    assert parse_contexts("128k, 1M,2m,4096") == [131072, 1 << 20, 2 << 20, 4096]
    assert parse_contexts("1.5M,0.5k") == [3 << 19, 512] and parse_contexts("") == []
    assert parse_contexts("max,256K", allow_max=True) == ["max", 1 << 18]


@pytest.mark.parametrize("bench_name, flag", [("attention", "--decode"), ("engine", "--contexts"),
                                              ("offload", "--contexts"), ("offload", "--on-gpu-contexts")])
def test_every_bench_reads_its_contexts_alike(bench_name, flag, monkeypatch, capsys):
    """The same list gives the same token counts in every benchmark, and a bad one the same message."""
    module = importlib.import_module(f"infinitehip.bench.{bench_name}")
    parse, seen = argparse.ArgumentParser.parse_args, {}

    def parse_then_stop(self, args=None, namespace=None):   # the flags as parsed, then no GPU work
        seen.update(vars(parse(self, args, namespace)))
        raise SystemExit("parsed")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(SystemExit, match="parsed"):
        module.main([flag, "32768,128k,1M"])
    assert seen[flag[2:].replace("-", "_")] == [32768, 131072, 1 << 20]
    with pytest.raises(SystemExit):
        module.main([flag, "1.1K"])
    assert f"argument {flag}: '1.1K': positive token counts, comma-separated: 131072, 128K or 1m" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["1.1K", "abc", "-1", "0", "32768,", "1e3"])
def test_bad_context_lists_get_one_message(bad):
    from infinitehip.bench import parse_contexts

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{bad!r}: positive token counts, comma-separated: "
                                                                    "131072, 128K or 1m (K = 1024, M = 1024 * 1024)")):
        parse_contexts(bad)


@pytest.mark.parametrize("argv, message", [
    (["--decode", "0"], "argument --decode: '0': positive token counts"),          # reached the GPU run
    (["--prefill", "8K,-1"], "argument --prefill: '8K,-1': positive token counts"),
    (["--chunked", "1x"], "argument --chunked: '1x': positive token counts"),      # "invalid _ints value"
    (["--preset", "papr"], "unknown preset 'papr'"),                               # a traceback on the GPU
    (["--stage0-levels", "0"], "HiPConfig.stage0_levels=0 is invalid"),
    (["--decode", "", "--prefill", "", "--chunked", ""], "nothing to time"),       # max() of nothing
])
def test_attention_bench_refuses_bad_arguments_before_the_gpu_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("started the benchmark"))
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert message in f"{e.value.code} {capsys.readouterr().err}"


def test_engine_bench_speedups_and_plot(tmp_path):
    """bench engine's records get prefill and decode speedups over dense at their context, and
    its plot is drawn from them (the GPU run itself is not testable here)."""
    from infinitehip.bench import engine

    rec = dict(layers=32, weight_floor_ms=3.5, device="test GPU", date="2026-11-30")
    records = []
    for context, (hp, hd, dp, dd) in {32768: (2.0, 1.5, 7.0, 8.0), 262144: (14.5, 60.3, 4.75, 13.48)}.items():
        records.append(dict(rec, context=context, backend="hip", prefill_s=hp, decode_ms_per_token=dp))
        records.append(dict(rec, context=context, backend="dense", prefill_s=hd, decode_ms_per_token=dd))
        engine._compare_to_dense(records, context)
    hip = [r for r in records if r["backend"] == "hip"]
    assert [r["prefill_speedup_vs_dense"] for r in hip] == [0.75, 4.16]
    assert [r["decode_speedup_vs_dense"] for r in hip] == [1.14, 2.84]
    engine.plot(records, tmp_path / "engine.png")
    assert (tmp_path / "engine.png").stat().st_size > 10_000


def test_plots_label_contexts_as_users_write_them(tmp_path):
    """Every bench plot's x axis: a tick at each measured context, labelled 128K / 1M (matplotlib's
    minor labels of a log axis overlapped), and the attention plot drawn from its records."""
    from infinitehip.bench import attention, context_axis, pyplot, token_label

    assert [token_label(n) for n in (16384, 131072, 1 << 20, 3 << 19, 1000, 2746000)] == \
        ["16K", "128K", "1M", "1.5M", "1000", "2746000"]
    rec = dict(device="test GPU", preset="paper", dense_cudnn_ms=0.14, dense_flash_ms=0.15, dense_ms=0.14)
    records = [dict(rec, kind=kind, context=n, hip_ms=0.02, speedup=7.0)
               for kind in ("decode", "prefill") for n in (131072, 1 << 20)]
    attention.plot(records, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    plt = pyplot()
    fig, ax = plt.subplots()
    context_axis(ax, [1 << 20, 131072, 131072])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["128K", "1M"]
    plt.close(fig)


def test_the_attention_timeline_patch_applies(tmp_path):
    """scripts/attention_timeline.py stamps timers into a copy of the attention kernel by text
    substitution; a kernel edit broke it silently once (found only on the GPU): it must apply."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("attention_timeline", root / "scripts" / "attention_timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    shutil.copytree(timeline.SRC, tmp_path / "infinitehip")
    timeline.patch(tmp_path / "infinitehip")   # SystemExit naming the anchor that moved, if one did
    assert "log_ptr" in (tmp_path / "infinitehip" / "attention" / "triton" / "bsa.py").read_text()
