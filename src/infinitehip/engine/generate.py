"""Generation verbs: ``prefill`` (chunked), ``decode_one_token`` (sparse mask reused on the refresh
schedule), ``stream`` (token events for a batch of prompts) and ``generate`` (text).

Legend: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..attention.api import KERNELS, triton_interpreted
from ..cache.kv import CapacityError, KVCache, plan_kv_cache
from ..cache.offload_kv import OffloadKVCache
from ..cache.offload_plan import OffloadConfig, plan_offload
from ..config import is_int
from ..models.llama import BACKENDS, AttentionCall
from ..models.loader import Model
from . import layer_prefill
from .prefix_cache import PrefixCache, fingerprint, stores_fp8
from .sampling import SamplingParams, TextOutput, sample
from .state import DecodeState


@dataclass
class Event:
    """One decoded token of batch row ``row`` and the text it releases (may be empty)."""

    row: int
    text: str
    token: int                           # the sampled token id (an end-of-sequence token included)
    n_generated: int                     # tokens of output so far (end-of-sequence not counted)
    finished: bool = False
    finish_reason: str | None = None     # "stop" (eos or stop string) or "length"


def prefill(model: Model, tokens: torch.Tensor, cache: KVCache, *, backend: str = "hip", chunk_size: int = 4096,
            kernel: str = "auto", progress: bool = False, start: int = 0, prompt_len: int | None = None) -> torch.Tensor:
    """Run the prompt ``tokens`` (1, T) through the model ``chunk_size`` tokens at a time.

    Writes its K/V to ``cache`` (one row) and returns the last token's logits (1, V). The first
    ``start`` tokens' K/V must already be in the cache (a reused prefix); they are not recomputed.
    ``prompt_len``: the whole prompt's length when ``tokens`` is only its start (a batch runner
    prefills a long prompt a few chunks a step); default T.

    hip attends densely or sparsely as one call over the whole prompt would: a prompt of more
    than ``dense_cutoff`` tokens attends sparsely in every chunk, also in those whose keys are
    under the cutoff. (Deciding per chunk made such a prompt's first chunks dense: not what one
    call computes, and twice as slow where the chunks have many queries: a 70,000-token prompt of
    the 8B shape took 6.83 s instead of 3.49, H200, ``scripts/prefill_threshold.py``.)
    """
    if not is_int(chunk_size) or chunk_size < 1:   # a float reached range(): a TypeError
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
    T = tokens.shape[1]
    if not 0 <= start < T:   # no chunk would run: an UnboundLocalError at the return
        raise ValueError(f"prefill runs at least the prompt's last token: start={start} of a {T}-token prompt")
    if prompt_len is not None and not (is_int(prompt_len) and prompt_len >= T):
        raise ValueError(f"prompt_len={prompt_len!r} must be the whole prompt's length, at least the {T} tokens given")
    if T > cache.capacity:   # a shape mismatch deep inside the first layer's cache write
        raise ValueError(f"a {T:,}-token prompt does not fit a cache of {cache.capacity:,} tokens a row")
    call = AttentionCall(backend=backend, kernel=kernel, sparse=sparse_prompt(model, backend, prompt_len or T))
    bar = _progress(T - start, progress)
    t0 = time.perf_counter()
    # Offloaded: layer by layer, one layer's K/V held in device memory (engine/layer_prefill.py).
    layered = layer_prefill.begin(model, tokens, cache, call, chunk_size=chunk_size, start=start) \
        if prompt_len in (None, T) else None
    if layered is not None:
        try:
            layered.run(bar=bar)
        finally:
            layered.close()
        logits = layered.logits[:, None]
    else:
        for s in range(start, T, chunk_size):
            e = min(s + chunk_size, T)
            pos = torch.tensor([s], device=tokens.device)
            logits = model.net(tokens[:, s:e], pos, cache, call, kv_limit=e, last_only=True)
            if bar is not None:
                bar.update(e - s)
    if bar is not None:
        bar.set_postfix_str(f"{(T - start) / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
        bar.close()
    return logits[:, -1]


def decode_one_token(model: Model, tokens: torch.Tensor, seqlens: torch.Tensor, cache: KVCache,
                     state: DecodeState, kv_limit: int | None = None) -> torch.Tensor:
    """One decode step for every row: tokens (B,) at positions seqlens (B,) -> logits (B, V).

    With the hip backend each row reruns pruning from ``config.refresh_stage`` of its own step
    (``n_stages``: its previous mask is reused as is). ``kv_limit``: read only the first kv_limit
    cache slots (None: all); a one-row dense step attends to every one of them (no length mask).
    """
    if not state.masks:
        state.masks = [None] * model.args.n_layers
    if not state.steps:
        state.steps = [0] * tokens.shape[0]
    call = state.call(model.hip)
    logits = model.net(tokens[:, None], seqlens, cache, call, kv_limit=kv_limit)
    state.keep_pruned(call, model.hip)
    state.steps = [s + 1 for s in state.steps]
    return logits[:, -1]


def encode_prompt(model: Model, prompt: str | list[int], chat: bool = False, system: str | None = None) -> list[int]:
    if not isinstance(prompt, str):
        if not _is_ids(prompt):
            raise ValueError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}: give a list of "
                             "prompts, e.g. ['text'] or [[1, 2, 3]] for token ids")
        if chat:   # the template wraps text: ids went to the model as they were, unwrapped
            raise ValueError("chat=True (--chat) wraps a text prompt in the chat template, but this prompt is token "
                             "ids: give the text, or the ids of an already rendered template with chat=False")
        return list(prompt)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_chat(model, messages)
    return model.tokenizer.encode(prompt)


def encode_chat(model: Model, messages: list[dict]) -> list[int]:
    """The chat template's token ids for ``messages`` (its text already holds the special tokens)."""
    return model.tokenizer.encode(model.tokenizer.apply_chat_template(messages), add_special_tokens=False)


def _is_ids(prompt) -> bool:
    try:
        return all(is_int(t) for t in prompt)
    except TypeError:   # not iterable: None, a number, or a 0-d tensor (an item of a 1-D tensor of ids)
        return False


def stream(model: Model, prompts: list[str | list[int]], params: SamplingParams | None = None, *,
           backend: str = "hip", chat: bool = False, system: str | None = None, chunk_size: int = 4096,
           kernel: str = "auto", progress: bool = False, cuda_graph: bool = False,
           prefix_cache: PrefixCache | None = None, offload: bool | OffloadConfig | None = None) -> Iterator[Event]:
    """Generate for a batch of prompts (text, or token ids); yield text pieces as they are decoded.

    Prompts are prefilled one at a time (they may differ in length), then decoded together,
    one token per row per step, each row at its own position. ``cuda_graph``: replay the decode
    step from CUDA graphs (GPU only; reads the cache at full capacity; an offloaded cache too).
    ``prefix_cache``: reuse the KV of a cached prompt prefix (a shared document) instead of
    prefilling it again. ``offload``: keep the KV cache in host memory behind a GPU page cache
    (True, or an ``OffloadConfig``); None (default) offloads only when it does not fit on the GPU.
    """
    if not isinstance(model, Model):   # a path: "'str' object has no attribute 'tokenizer'" deep inside
        raise TypeError(f"model must be what infinitehip.load(path) returns, got {type(model).__name__} {model!r:.60}")
    params = params or SamplingParams()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {KERNELS} (which code runs the attention)")
    if kernel == "triton" and model.device.type != "cuda" and not triton_interpreted():
        # Said here: hip_attention's own message names its parameter, backend=, which here is hip/dense/streaming.
        raise ValueError(f"kernel='triton' runs on CUDA and the model is on {model.device}: use kernel='reference' "
                         "(or 'auto')")
    if system is not None and not chat:   # only the chat template has a place for it: it was dropped
        raise ValueError("system= is the chat template's system message: give chat=True (--chat) too, "
                         "or write it into the prompt")
    if isinstance(prompts, str):   # iterated, it was a batch of one-character prompts
        raise ValueError("prompts is a list of prompts (texts or lists of token ids): give [text] for one text")
    ids = [encode_prompt(model, p, chat, system) for p in prompts]
    if not ids or any(len(x) == 0 for x in ids):
        raise ValueError("empty prompt: give at least one token of text" if ids else "no prompts: give at least one")
    vocab = model.net.args.vocab_size
    if any(min(x) < 0 or max(x) >= vocab for x in ids):
        raise ValueError(f"a prompt's token ids must be in [0, {vocab}) (the model's vocabulary)")
    n_new = params.max_new_tokens
    groups = _decode_groups(model, ids, n_new, backend)                  # rows decoded in one batch
    caches = [make_cache(model, len(g), max(len(ids[b]) for b in g) + n_new, chunk_size, offload, backend)
              for g in groups]
    states = [DecodeState(backend, kernel=kernel) for _ in groups]
    graphs = [None] * len(groups)
    if cuda_graph:
        from .cuda_graph import GraphDecoder

        graphs = [GraphDecoder(model, cache, state) for cache, state in zip(caches, states)]
    # What is wrong with the call is said here, at the call; the prefill and decode run as the
    # events are read.
    return _events(model, ids, params, groups, caches, states, graphs, prefix_cache, backend=backend,
                   chunk_size=chunk_size, kernel=kernel, progress=progress)


def _events(model: Model, ids: list[list[int]], params: SamplingParams, groups, caches, states, graphs,
            prefix_cache, *, backend: str, chunk_size: int, kernel: str, progress: bool) -> Iterator[Event]:
    """``stream``'s prefill and decode loop, over the caches and states it made (one per group)."""
    B, device, n_new = len(ids), model.device, params.max_new_tokens
    where = {b: (k, i) for k, g in enumerate(groups) for i, b in enumerate(g)}
    # Each group's rows of the batch, made once (not a host-to-device copy per step); the usual
    # single group is the whole batch, taken as it is.
    index = [slice(None)] if len(groups) == 1 else [torch.tensor(g, device=device) for g in groups]
    # Cached KV is reused only by the model and backend that wrote it (a PrefixCache may be shared).
    owner = fingerprint(model, backend, any(stores_fp8(c) for c in caches)) if prefix_cache is not None else ""
    rows = []
    for b, x in enumerate(ids):
        k, i = where[b]
        rows.append(_prefill_row(model, x, caches[k].select(slice(i, i + 1)), prefix_cache, owner, backend=backend,
                                 chunk_size=chunk_size, kernel=kernel, progress=progress))
        states[k].admit(i, len(groups[k]))
    logits = torch.cat(rows)                                                       # (B, V)
    # One generator per row, each seeded alike: a row samples what it would alone (as the batch
    # runner's requests do), whatever its neighbours draw.
    gens = None if params.seed is None else [torch.Generator(device=device).manual_seed(params.seed)
                                             for _ in range(B)]
    lengths = [len(x) for x in ids]
    seqlens = torch.tensor(lengths, device=device)
    outputs = [TextOutput(model.tokenizer, params, set(model.tokenizer.eos_token_ids), x) for x in ids]
    done = [False] * B
    for step in range(n_new):
        if gens is None or params.temperature == 0:
            tokens = sample(logits, params, None)                                  # (B,)
        else:
            tokens = torch.cat([sample(logits[b:b + 1], params, gens[b]) for b in range(B)])
        for b, tok in enumerate(tokens.tolist()):
            if done[b]:
                continue
            piece, reason = outputs[b].push(tok)
            done[b] = reason is not None
            yield Event(b, piece, tok, outputs[b].count, done[b], reason)
        if all(done) or step == n_new - 1:
            break
        logits = torch.empty_like(logits)
        for g, idx, cache, state, graph in zip(groups, index, caches, states, graphs):
            if graph is not None:
                logits[idx] = graph(tokens[idx], seqlens[idx])
            else:
                logits[idx] = decode_one_token(model, tokens[idx], seqlens[idx], cache, state,
                                               kv_limit=max(lengths[b] for b in g) + 1)
        seqlens += 1
        lengths = [n + 1 for n in lengths]


def sparse_prompt(model: Model, backend: str, n: int) -> bool:
    """Whether hip prefills an ``n``-token prompt sparsely (every chunk; ``prefill``)."""
    return backend == "hip" and n > model.net.dense_cutoff


def _decode_groups(model: Model, ids: list[list[int]], n_new: int, backend: str) -> list[list[int]]:
    """The rows that can decode in one batch and still get the tokens each gets alone.

    hip attends densely in a call of at most ``dense_cutoff`` keys, and a batched step has as many
    keys as its longest row: batched with a long prompt, a short one attended sparsely where alone
    it attends densely (other tokens from the second on). So rows decode together only when they
    turn from dense to sparse at the same step (or never, within ``n_new`` tokens); usually one group.
    """
    if backend != "hip":   # dense is exact at any key count; streaming falls back only below sink + window
        return [list(range(len(ids)))]
    cutoff = model.net.dense_cutoff
    groups: dict[int, list[int]] = {}
    for b, x in enumerate(ids):   # its decode step s (of n_new - 1) is dense while len(x) + s + 1 <= cutoff
        groups.setdefault(min(max(cutoff - len(x), 0), n_new - 1), []).append(b)
    return list(groups.values())


def generate(model: Model, prompt: str | list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | list[str] = (),
             ignore_eos: bool = False, chat: bool = False, system: str | None = None, backend: str = "hip",
             chunk_size: int = 4096, kernel: str = "auto", progress: bool = False, stream: bool = False,
             cuda_graph: bool = False, offload: bool | OffloadConfig | None = None):
    """Generate text for ``prompt`` (or a list of prompts) with ``model`` from ``load``.

    Returns the completion text (a list for a list of prompts). With ``stream=True`` returns an
    iterator of text pieces (of ``(row, piece)`` pairs for a list of prompts).
    backend: "hip" (InfiniteHiP, default), "dense" (exact attention), "streaming" (sink + window).
    Greedy unless ``temperature > 0``; ``seed`` makes sampling reproducible; generation ends at an
    end-of-sequence token, before the first ``stop`` string, or after ``max_new_tokens``.
    cuda_graph: capture the decode step in CUDA graphs (GPU only).
    offload: KV cache in host memory behind a GPU page cache (True or an ``OffloadConfig``; None:
    only when it does not fit on the GPU; ``docs/offload.md``).
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop, ignore_eos=ignore_eos)
    single = isinstance(prompt, str)
    if not single and not isinstance(prompt, (list, tuple, torch.Tensor)):   # list(None) was a TypeError
        raise ValueError(f"prompt must be text or a list of prompts (texts or lists of token ids), got "
                         f"{type(prompt).__name__}")
    prompts = [prompt] if single else list(prompt)
    events = _stream(model, prompts, params, backend=backend, chat=chat, system=system, chunk_size=chunk_size,
                     kernel=kernel, progress=progress, cuda_graph=cuda_graph, offload=offload)
    if stream:
        return (e.text if single else (e.row, e.text) for e in events if e.text)
    texts = [""] * len(prompts)
    for e in events:
        texts[e.row] += e.text
    return texts[0] if single else texts


_stream = stream   # generate's stream= parameter hides the function there


def make_cache(model: Model, B: int, capacity: int, chunk_size: int, offload: bool | OffloadConfig | None,
               backend: str = "hip"):
    """The KV cache for B rows of ``capacity`` tokens: on the device, or offloaded to host memory
    (when asked, or when ``offload`` is None and it does not fit on a GPU). Checked before allocating."""
    if offload is not None and not isinstance(offload, (bool, OffloadConfig)):   # "fp8" silently offloaded in bf16
        raise TypeError(f"offload={offload!r} must be True, False, None (only when the cache does not fit) or an "
                        "OffloadConfig, e.g. OffloadConfig(fp8=True)")
    if backend == "dense" and isinstance(offload, OffloadConfig) and offload.fp8:
        raise ValueError("backend='dense' reads the KV cache as stored and cannot read FP8 codes: offload with "
                         "fp8=False (--offload without --offload-fp8), or use the hip or streaming backend")
    args = model.args
    workspace = min(chunk_size, capacity) * (4 * args.dim + 3 * args.intermediate_size) * 4 + (256 << 20)
    shape = dict(n_layers=args.n_layers, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, batch=B,
                 capacity=capacity, dtype=model.dtype, device=model.device)
    if not offload:
        try:
            plan_kv_cache(**shape, workspace=workspace)
            return KVCache(args.n_layers, B, capacity, args.n_kv_heads, args.head_dim, dtype=model.dtype,
                           device=model.device)
        except CapacityError:
            if offload is not None or model.device.type != "cuda":
                raise
    config = offload if isinstance(offload, OffloadConfig) else OffloadConfig()
    # The plan resolves gpu_layers=None (whole layers in spare GPU memory only when host memory is short).
    plan = plan_offload(**shape, layer_configs=model.net.layer_configs, config=config, workspace=workspace)
    return OffloadKVCache(args.n_layers, B, capacity, args.n_kv_heads, args.head_dim, dtype=model.dtype,
                          device=model.device, layer_configs=model.net.layer_configs, config=plan.config)


def _prefill_row(model: Model, ids: list[int], cache: KVCache, prefix_cache: PrefixCache | None, owner: str, *,
                 backend: str, **kw):
    """Prefill one prompt into a one-row cache, reusing and then remembering a cached prefix
    (``owner``: the reader's and writer's ``fingerprint``) prefilled as this prompt is."""
    sparse = sparse_prompt(model, backend, len(ids))
    start = prefix_cache.reuse(ids, cache, owner, sparse=sparse) if prefix_cache is not None else 0
    logits = prefill(model, torch.tensor([ids], device=model.device), cache, start=start, backend=backend, **kw)
    if prefix_cache is not None:
        prefix_cache.remember(ids, cache, reused=start, owner=owner, sparse=sparse)
    return logits


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="prefill", leave=False)
