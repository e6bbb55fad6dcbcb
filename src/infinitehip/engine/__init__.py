"""Generation: chunked prefill, decode with sparse-mask reuse, sampling, streaming, continuous batching."""
from .batch import BatchRunner
from .requests import BatchEvent, BatchStats
from .generate import Event, decode_one_token, encode_prompt, generate, prefill, stream
from .state import DecodeState
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, sample

__all__ = ["generate", "stream", "prefill", "decode_one_token", "encode_prompt", "DecodeState", "Event",
           "SamplingParams", "sample", "PrefixCache",
           "BatchRunner", "BatchEvent", "BatchStats"]
