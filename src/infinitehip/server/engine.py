"""Adapts a loaded model (``infinitehip.load``) to what the HTTP layer needs."""
from __future__ import annotations

from typing import Iterator

from ..engine.generate import stream as generate_stream
from ..engine.prefix_cache import PrefixCache
from ..engine.sampling import SamplingParams


class ModelEngine:
    """One model, one request at a time (the scheduler's worker is its only caller)."""

    def __init__(self, model, *, model_id: str | None = None, backend: str = "hip",
                 max_context: int = 131_072, chunk_size: int = 4096, prefix_cache: PrefixCache | None = None):
        self.model, self.backend, self.chunk_size = model, backend, chunk_size
        self.model_id = model_id or model.name
        self.max_context = max_context
        # Documents shared by several requests are prefilled once (see engine/prefix_cache.py).
        self.prefix_cache = PrefixCache() if prefix_cache is None else prefix_cache

    def render_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's token ids (its text already holds the special tokens)."""
        tok = self.model.tokenizer
        return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)

    def count_tokens(self, prompt: str | list[int]) -> int:
        return len(prompt) if isinstance(prompt, list) else len(self.model.tokenizer.encode(prompt))

    def stream(self, prompt: str | list[int], *, max_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop: list[str], cancelled) -> Iterator[tuple[str, int]]:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, stop=tuple(stop))
        events = generate_stream(self.model, [prompt], params, backend=self.backend, chunk_size=self.chunk_size,
                                 prefix_cache=self.prefix_cache)
        try:
            for e in events:
                if e.text or e.finished:
                    yield e.text, e.n_generated
                if cancelled.is_set():  # the client left: stop decoding, the KV cache is released
                    return
        finally:
            events.close()
