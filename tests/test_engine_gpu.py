"""CUDA-graph decode gives the same greedy tokens as eager decode, for every backend."""
import pytest
import torch
from checkpoints import make_checkpoint

import infinitehip
from infinitehip.engine import SamplingParams, stream

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["hip", "dense", "streaming"])
def test_cuda_graph_decode_equals_eager(tmp_path, backend):
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), config="tiny", dtype="float32")
    prompts = ["the quick brown fox " * 20, "hello world"]    # past sink + window: sparse decode
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    eager = [(e.row, e.token) for e in stream(model, prompts, params, backend=backend)]
    graph = [(e.row, e.token) for e in stream(model, prompts, params, backend=backend, cuda_graph=True)]
    assert graph == eager


def test_cuda_graph_needs_cuda_model(tmp_path):
    model = infinitehip.load(make_checkpoint(tmp_path, "llama"), device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        infinitehip.generate(model, "hi", cuda_graph=True, max_new_tokens=2)
