"""``infinitehip bench offload --quick`` runs on CPU and writes the documented JSON fields."""
import json

from infinitehip.bench import main


def test_bench_offload_quick(tmp_path):
    main(["offload", "--quick", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "offload_quick.json").read_text())
    assert (tmp_path / "offload_quick.png").exists()
    for r in records:
        for key in ("context", "gpu_kv_bytes", "gpu_kv_reduction", "tokens_per_s", "decode_ratio_vs_on_gpu",
                    "hit_rate", "device", "date"):
            assert key in r, key
    offload = [r for r in records if r["path"] == "offload" and r["decode_ratio_vs_on_gpu"] is not None]
    assert offload and all(r["tokens_identical_to_on_gpu"] for r in offload)
    assert all(r["first_step_logits_max_abs_diff"] == 0.0 for r in offload)
    assert all(0 < r["hit_rate"] <= 1 and r["bytes_per_step"]["total"] > 0 for r in records
               if r["path"] in ("offload", "offload_fp8"))
    assert [r for r in records if r["path"] == "offload_zero_copy"][0]["tokens_identical_to_on_gpu"]
