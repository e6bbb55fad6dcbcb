"""``infinitehip bench offload --quick`` runs on CPU and writes the documented JSON fields."""
import json
from argparse import Namespace

import pytest
import torch

from infinitehip.bench import main
from infinitehip.bench.offload import FILL_CHUNK, longest_context, prune_bytes_per_step, quick_model
from infinitehip.config import HiPConfig


def test_bench_offload_quick(tmp_path):
    main(["offload", "--quick", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "offload_quick.json").read_text())
    assert (tmp_path / "offload_quick.png").exists()
    for r in records:
        for key in ("context", "gpu_kv_bytes", "gpu_kv_reduction", "tokens_per_s", "decode_ratio_vs_on_gpu",
                    "hit_rate", "device", "date", "gpu_layers", "host_kv_bytes"):
            assert key in r, key
    offload = [r for r in records if r["path"] == "offload" and r["decode_ratio_vs_on_gpu"] is not None]
    assert offload and all(r["tokens_identical_to_on_gpu"] for r in offload)
    assert all(r["first_step_logits_max_abs_diff"] == 0.0 for r in offload)
    assert all(r["hit_rate"] is None and r["bytes_per_step"]["total"] > 0 for r in records
               if r["path"] in ("offload", "offload_fp8"))                # read in place: no cache
    for path in ("offload_page_cache", "offload_fp8_page_cache"):
        cached = [r for r in records if r["path"] == path][0]
        assert 0 < cached["hit_rate"] <= 1 and cached["bytes_per_step"]["block_fetch_h2d"] > 0, path
    bf16 = [r for r in records if r["path"] == "offload_page_cache"][0]
    assert bf16["tokens_identical_to_on_gpu"] and bf16["first_step_logits_max_abs_diff"] == 0.0
    assert all(r["gpu_layers"] == 0 for r in records if r["path"] != "on_gpu")    # the host holds these
    assert [r["path"] for r in records if r["context"] == 2048] == ["offload_page_cache"]   # past on-GPU: the default


def test_bench_offload_paths_are_selectable(tmp_path):
    main(["offload", "--quick", "--contexts", "1024", "--paths", "on_gpu,offload_page_cache", "--profile", "2",
          "--out", str(tmp_path)])
    records = json.loads((tmp_path / "offload_quick.json").read_text())
    assert [r["path"] for r in records] == ["on_gpu", "offload_page_cache"]
    assert records[1]["tokens_identical_to_on_gpu"]
    for r in records:       # where the step's time goes: the total first, then the costliest kernels
        total, *top = r["profile_per_step"]
        assert total["kernel"] == "all" and total["us"] >= sum(k["us"] for k in top) > 0
        assert top == sorted(top, key=lambda k: -k["us"]) and all(k["calls"] > 0 for k in top)
    with pytest.raises(SystemExit, match="--paths 'offload,cache'"):
        main(["offload", "--quick", "--paths", "offload,cache", "--out", str(tmp_path)])


def test_bench_offload_quick_gpu_layers(tmp_path):
    """One of the two layers' whole KV on the device: same tokens and logits, less host KV."""
    main(["offload", "--quick", "--contexts", "1024", "--gpu-layers", "1", "--out", str(tmp_path)])
    records = {r["path"]: r for r in json.loads((tmp_path / "offload_quick.json").read_text())}
    off = records["offload"]
    assert off["gpu_layers"] == 1 and off["tokens_identical_to_on_gpu"] and off["first_step_logits_max_abs_diff"] == 0.0
    assert 0 < off["host_kv_bytes"] < records["on_gpu"]["gpu_kv_bytes"]


def test_longest_context_adds_spare_gpu_memory():
    model, gib = quick_model(HiPConfig.preset("tiny", dense_threshold=0)), 1 << 30
    a = Namespace(page=8, headroom=1.5, gpu_layers=0, steps=8, warm=16, profile=0, probe_stride=16)
    host_only = longest_context(model, a, torch.device("cpu"), free_host=gib)
    a.gpu_layers = None
    both = longest_context(model, a, torch.device("cpu"), free_host=gib, free_gpu=4 * gib)   # 2 GiB of it workspace
    assert both % FILL_CHUNK == 0 and both > 1.5 * host_only > 0


def test_device_slug_and_copy_bandwidth():
    from infinitehip.bench import copy_bandwidth, device_slug

    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert device_slug("cpu") == "cpu"
    bw = copy_bandwidth("cpu", nbytes=1 << 20, repeats=2)
    assert 1e6 < bw < 1e14       # bytes/s: positive and physical


def test_prune_bytes_per_step_counts_probe_levels():
    """Paper preset at 1M keys, 8 kv heads of 128 bf16 dims: stage 0 4 MiB per step per layer
    (4,096 chunks x 16 probes, every 32 steps), stages 1-2 1.25 + 1.5 MiB; stage 0 stopped after
    3 of its 8 levels reads 3/8 of its bytes."""
    mib = 1 << 20
    full = prune_bytes_per_step(HiPConfig(), 1 << 20, 8, 128, 2)
    assert full == 6.75 * mib
    assert prune_bytes_per_step(HiPConfig(stage0_levels=3), 1 << 20, 8, 128, 2) == full - 4 * mib * 5 / 8
    # A GPU copy of every 16th key serves stage 0's first 3 levels (multiples of 64, 32, 16), no other.
    assert prune_bytes_per_step(HiPConfig(), 1 << 20, 8, 128, 2, probe_stride=16) == full - 4 * mib * 3 / 8
    assert prune_bytes_per_step(HiPConfig(stage0_levels=3), 1 << 20, 8, 128, 2, probe_stride=16) == full - 4 * mib
    assert prune_bytes_per_step(HiPConfig(), 1 << 20, 8, 128, 2, probe_stride=8) == full - 4 * mib / 2 - 1.25 * mib / 5


def test_bench_offload_stage0_levels(tmp_path):
    """--stage0-levels: offload still gives the on-GPU tokens, and reads fewer pruning bytes."""
    runs = {}
    for levels in (None, 2):
        extra = [] if levels is None else ["--stage0-levels", str(levels)]
        main(["offload", "--quick", "--contexts", "2048", "--paths", "on_gpu,offload", *extra, "--out", str(tmp_path)])
        runs[levels] = json.loads((tmp_path / "offload_quick.json").read_text())
    capped = runs[2]
    assert [r["stage0_levels"] for r in capped] == [2, 2] and capped[1]["tokens_identical_to_on_gpu"]
    prune = [r[1]["bytes_per_step"]["pruning_reads_est"] for r in (runs[None], capped)]
    assert prune[1] < prune[0]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0"),                            # a ZeroDivisionError in the step time
    (["--contexts", "abc"], "argument --contexts: 'abc': positive token counts"),   # int('abc') from deep inside
    (["--contexts", "0"], "positive token counts"),             # ran, and printed a GPU KV of 359%
    (["--contexts", ""], "argument --contexts: '' is empty: give at least one context"),
    (["--page", "3"], "OffloadConfig.page=3"),
    (["--on-gpu-contexts", "none"], "argument --on-gpu-contexts: 'none'"),   # int('none') from deep inside
    (["--refresh-lag", "-1"], "refresh_lag=-1"),
    (["--prune-programs", "-2"], "--prune-programs -2"),
    (["--warm", "-5"], "--warm -5: a count >= 0"),             # ran as 0
    (["--profile", "-1"], "--profile -1: a count >= 0"),       # printed an empty profile
    (["--layers", "0"], "--layers 0: a count >= 1"),
])
def test_bench_offload_bad_flags_are_one_line(tmp_path, args, message, capsys):
    from infinitehip.bench.offload import main as offload_main

    with pytest.raises(SystemExit) as e:   # ours (the code), or argparse's (a usage line, then the error)
        offload_main(["--quick", "--out", str(tmp_path), *args])
    assert message in f"{e.value.code} {capsys.readouterr().err}"
