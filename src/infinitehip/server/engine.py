"""Adapts a loaded model (``infinitehip.load``) to what the HTTP layer needs: a tokenizer front
and a continuous-batching runner (``engine.batch.BatchRunner``) behind it."""
from __future__ import annotations

from ..engine.batch import BatchRunner
from ..engine.requests import BatchEvent, check_token_ids
from ..engine.generate import encode_chat, encode_prompt
from ..engine.prefix_cache import PrefixCache
from ..engine.sampling import SamplingParams


class ModelEngine:
    """One model, ``max_batch`` requests decoding together; only the scheduler's worker thread
    calls ``add``, ``step``, ``cancel`` and ``abort``. ``tokenize`` and ``render_chat`` run in
    the HTTP handlers' threads, beside it (the tokenizer only reads its state)."""

    def __init__(self, model, *, model_id: str | None = None, backend: str = "hip", max_context: int = 131_072,
                 max_batch: int = 8, chunk_size: int = 4096, prefix_cache: PrefixCache | None = None,
                 offload=False, cuda_graph: bool | None = None):
        self.model = model
        self.model_id = model_id or model.name
        self.max_context, self.max_batch = max_context, max_batch
        # Documents shared by several requests are prefilled once (see engine/prefix_cache.py).
        self.prefix_cache = PrefixCache() if prefix_cache is None else prefix_cache
        self.runner = BatchRunner(model, max_batch=max_batch, max_context=max_context, backend=backend,
                                  chunk_size=chunk_size, prefix_cache=self.prefix_cache, offload=offload,
                                  cuda_graph=cuda_graph)

    def check_ids(self, ids: list[int]):
        """A token-id prompt's ids, checked as ``add`` would (before a stream's 200)."""
        check_token_ids(ids, self.model.net.args.vocab_size)

    def save_context_cache(self, path: str):
        """Write the context cache to ``path``: its entries and the prompts the slots hold."""
        self.runner.keep_prompts()
        self.prefix_cache.save(path, owner=self.runner.owner)

    def tokenize(self, text: str) -> list[int]:
        return encode_prompt(self.model, text)

    def render_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.model, messages)

    def add(self, prompt: str | list[int], params: SamplingParams) -> int:
        """Queue a prompt: token ids (the app's), or text, tokenized here, on the worker thread."""
        return self.runner.add(encode_prompt(self.model, prompt), params)

    def step(self) -> list[BatchEvent]:
        return self.runner.step()

    def cancel(self, request: int) -> bool:
        return self.runner.cancel(request)

    def abort(self) -> list[int]:
        return self.runner.abort()

    @property
    def has_work(self) -> bool:
        return self.runner.has_work

    def metrics(self) -> dict:
        """Batching and context-caching counters (``GET /metrics``)."""
        p = self.prefix_cache.stats
        return {"batch": {"max_batch": self.max_batch, "max_context": self.max_context,
                          "waiting": self.runner.n_waiting, "active": self.runner.n_active,
                          **self.runner.stats.as_dict()},
                "context_cache": {"entries": len(self.prefix_cache), "in_slots": self.runner.n_slot_prompts,
                                  "lookups": p.lookups, "hits": p.hits,
                                  "reused_tokens": p.reused_tokens, "prefilled_tokens": p.prefilled_tokens,
                                  "prefill_seconds_saved": round(self.runner.stats.prefill_seconds_saved, 6)}}
