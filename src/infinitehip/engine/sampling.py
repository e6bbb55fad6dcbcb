"""Sampling: greedy, temperature, top-k, top-p (nucleus), seeded; stop strings; a sequence's text."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import is_int, is_number
from ..tokenizer import StreamDecoder


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()    # generation ends before the first occurrence of any of these
    ignore_eos: bool = False

    def __post_init__(self):
        stop = self.stop
        if not isinstance(stop, (str, list, tuple)) and stop is not None:   # tuple(5) was a TypeError
            raise ValueError(f"stop={stop!r} must be a string or a list of strings")
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop or ()))
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        # `not x >= 0` also refuses NaN (which reached torch.multinomial) and non-numbers.
        if not is_number(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 64):
            raise ValueError(f"seed={self.seed!r} must be None or an integer in [0, 2**64)")
        if any(not isinstance(s, str) or not s for s in self.stop):   # a number reached len(): a TypeError
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> their argmax (B,) int64: on CUDA one Triton launch (``fused.argmax_triton``)."""
    if logits.is_cuda and logits.dim() == 2:
        from ..models.fused import argmax_triton
        return argmax_triton(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64."""
    if p.temperature == 0:
        return greedy(logits)
    # The top logit is shifted to 0 before dividing: a tiny temperature then sends the others to
    # -inf, where dividing first sent them all to +-inf (NaN in multinomial). Divided by at least
    # float32's smallest normal: a smaller temperature rounds to 0 there, and 0 / 0 is NaN.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(p.temperature, torch.finfo(torch.float32).tiny)
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > p.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StopChecker:
    """Cuts a stream of text at the first stop string, holding back what could start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, piece: str) -> str:
        """The text that is now safe to emit."""
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        cut = len(self.pending) - self.hold
        out, self.pending = self.pending[:max(cut, 0)], self.pending[max(cut, 0):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextOutput:
    """One sequence's output: detokenizes sampled tokens (UTF-8 safe), holds back text a stop
    string may start, and says when generation ends (end-of-sequence, a stop string, the length).
    ``prompt``: the prompt's ids, the decoder's context (``StreamDecoder``)."""

    def __init__(self, tokenizer, params: SamplingParams, eos: set[int], prompt=()):
        self.decoder, self.stops = StreamDecoder(tokenizer, prompt), StopChecker(params.stop)
        self.eos = set() if params.ignore_eos else eos
        self.max_new, self.count = params.max_new_tokens, 0

    def push(self, tok: int) -> tuple[str, str | None]:
        """The text ``tok`` releases, and the finish reason ("stop" / "length") or None.
        ``count`` is then the tokens of output so far (end-of-sequence not counted)."""
        at_eos = tok in self.eos
        piece = "" if at_eos else self.stops.push(self.decoder.push(tok))
        self.count += not at_eos
        if not (at_eos or self.stops.stopped or self.count == self.max_new):
            return piece, None
        if not self.stops.stopped:
            piece += self.stops.push(self.decoder.flush()) + self.stops.flush()
        return piece, "stop" if at_eos or self.stops.stopped else "length"
