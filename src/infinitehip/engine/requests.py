"""What a ``BatchRunner`` (``batch.py``) keeps of each request, reports of each token, and counts."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layer_prefill
from .sampling import SamplingParams, TextOutput


@dataclass
class BatchEvent:
    """One sampled token of request ``request`` and the text it releases (may be empty)."""

    request: int
    text: str
    token: int
    n_generated: int                     # tokens of output so far (end-of-sequence not counted)
    finished: bool = False
    finish_reason: str | None = None     # "stop" (eos or stop string) or "length"


@dataclass
class BatchStats:
    """Counters for monitoring and tests (``batched_steps`` > 0 proves rows shared a step)."""

    decode_steps: int = 0        # batched forward passes
    batched_steps: int = 0       # ... of which with more than one request decoding
    max_decoding: int = 0        # most requests decoding in one step
    prefill_chunks: int = 0
    prefilled_tokens: int = 0    # prompt tokens run through the model
    prefill_seconds: float = 0.0
    reused_tokens: int = 0       # prompt tokens whose KV came from the prefix cache instead
    finished: int = 0
    cancelled: int = 0

    @property
    def prefill_seconds_saved(self) -> float:
        """Estimated: reused tokens at this runner's measured prefill speed."""
        return self.reused_tokens * self.prefill_seconds / max(self.prefilled_tokens, 1)

    def as_dict(self) -> dict:
        return {**self.__dict__, "prefill_seconds_saved": round(self.prefill_seconds_saved, 6)}


@dataclass
class Request:
    rid: int
    ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output: TextOutput
    slot: int = -1
    filled: int = 0              # prompt tokens whose KV is in the slot
    reused: int = 0              # ... of which copied from the prefix cache
    sparse: bool = False         # prefilled sparsely in every chunk (past the dense cutoff)
    seqlen: int = 0              # decode: where the next token goes
    last: int = 0                # decode: the token fed at the next step
    tokens: torch.Tensor | None = None              # (1, T) the prompt on the device, while prefilling
    layers: layer_prefill.LayerPrefill | None = None  # an offloaded prompt prefilled layer by layer
    logits: torch.Tensor | None = None              # (1, V) after the last prefill chunk


def check_token_ids(ids: list[int], vocab: int):
    """A ValueError unless every id of the (non-empty) prompt is in the model's vocabulary."""
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"a prompt's token ids must be in [0, {vocab}) (the model's vocabulary); got "
                         f"{min(ids)}..{max(ids)}")
