"""Every Triton kernel variant that the attention and the model launch compiles for a Hopper GPU
(sm90), checked on a CPU: ``_sm90_compile.py`` captures the launches of small CPU calls and hands
each kernel to Triton's GPU compiler and ptxas (shipped in the triton wheel). The interpreter
tests check what the kernels compute; this checks that the GPU can build them."""
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
def test_every_kernel_compiles_for_sm90():
    script = Path(__file__).with_name("_sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    compiled = [line for line in run.stdout.splitlines() if line.endswith(": ok")]
    kinds = {line.split(":")[0] for line in compiled}
    # prefill, decode refresh and reuse, the bf16 probes, the model's fused steps, the cache write
    assert {"_pool_kernel", "_score_chunks_kernel", "_keep_top_kernel", "_bsa_kernel", "_block_geometry_kernel",
            "_rms_norm_kernel", "_silu_mul_kernel", "_rows_kernel"} <= kinds, report
