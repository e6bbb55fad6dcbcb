"""Why the built-in model misses needles beyond its trained context: trace hip attention per layer
and answer token, and measure decode variants and oracles on the same prefills (CPU, reference path).

    python scripts/diagnose_builtin.py trace --task passkey --length 32x --samples 4
    python scripts/diagnose_builtin.py accuracy --tasks passkey,niah_multikey --samples 10 \\
        --variants base,refresh_every_step,force_needle

A prompt of 32x the trained context (16K tokens) takes about 35 s to prefill on one CPU thread and
about 15 ms per decoded token, so every variant that changes decode only (the refresh schedule, how
decode starts, the oracles) reuses one prefill per sample.

Every answer is decoded twice: free-running (scored like the eval) and teacher-forced (each answer
token predicted from the correct ones before it, so a failure is pinned to one token). For an
answer " 644208" the tokens are " ", "644", "208": the space comes from the prompt's last logits;
"644" and "208" are the decode steps 1 and 2, and each of them has to copy one needle token.

``trace`` prints, for every teacher-forced decode step and layer, where the needle token to copy
sits for each head group: ``win``dow, ``sink``, ``sel``ected, or missing -- ``s0``/``s1``/``s2`` =
dropped by that pruning stage in this step, ``old`` = missing from a mask reused from an earlier
step -- and the attention mass on it (max over the group's query heads).

Oracles (decode variants): ``force_needle`` puts the chunks of the needle's digit tokens into every
layer's final mask (the prompt's last query block and each decode step): the model then answers
from the same attention with the right keys, which says whether selection is what fails.
``compact`` runs the dense model on a short prompt made of the tokens hip attends at the first
answer step (the union over layers and head groups), at contiguous positions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import infinitehip  # noqa: E402
from infinitehip.attention import reference  # noqa: E402
from infinitehip.attention.mask import SENTINEL, Geometry, HiPMask  # noqa: E402
from infinitehip.attention.rope import apply_rope  # noqa: E402
from infinitehip.attention.stages import run_stages  # noqa: E402
from infinitehip.cache.kv import KVCache  # noqa: E402
from infinitehip.engine import DecodeState, decode_one_token  # noqa: E402
from infinitehip.models.llama import AttentionCall  # noqa: E402
from infinitehip.eval.runner import MAX_NEW_TOKENS, parse_length  # noqa: E402
from infinitehip.eval.tasks import TokenCounter, make_sample, score  # noqa: E402


# ---------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A HiPConfig change and how decode runs.

    overrides: HiPConfig fields replaced in the model's recommended config. Variants whose
        overrides differ only in ``refresh_intervals`` share one prefill.
    start: "prefill" -- decode starts from the prompt's last query block's masks (the engine);
        "last_row" -- from masks pruned with the query of the prompt's last row alone;
        "fresh" -- the first decode step prunes from scratch with its own one-token query.
    exact: decode steps score chunks by their best token (an oracle for the hierarchical top-1).
    base_prefill: prefill with the unchanged config, decode with the overrides (a quick screen of
        decode-time settings: one prefill serves them all; start "prefill" needs equal budgets).
    force: the oracle that adds chunks to every final mask: "needle" (the needle sentence) or
        "digits" (only the answer's digit tokens in it).
    compact: the oracle that answers densely from the attended tokens only.
    """

    overrides: dict = field(default_factory=dict)
    start: str = "prefill"
    force: str | None = None
    exact: bool = False
    base_prefill: bool = False
    compact: bool = False


VARIANTS = {
    "base": Variant(),
    "refresh_every_step": Variant(dict(refresh_intervals=(1, 1, 1))),
    "refresh_often": Variant(dict(refresh_intervals=(16, 4, 1))),
    "fresh_start": Variant(start="fresh"),
    "last_row_start": Variant(start="last_row"),
    "last_row_exact": Variant(start="last_row", exact=True),
    "refresh_every_step_exact": Variant(dict(refresh_intervals=(1, 1, 1)), exact=True),
    "fresh_start_every_step": Variant(dict(refresh_intervals=(1, 1, 1)), start="fresh"),
    "force_needle": Variant(force="needle"),
    "force_digits": Variant(force="digits"),
    "compact": Variant(compact=True),
    "exact_rope": Variant(dict(rope_attend="exact")),
    "exact_prune": Variant(dict(rope_prune="exact")),
    "head_sharing_all": Variant(dict(head_sharing="all")),
    "no_dense_layers": Variant(dict(dense_layers=())),
    "strides_1": Variant(dict(stage_strides=(1, 1, 1))),
    "chunk_16": Variant(dict(chunk_sizes=(16, 8, 2))),
    "window_256": Variant(dict(window=256, stage_budgets=(None, 512, 256), budget=128, dense_layer_budget=256)),
    "fresh_exact": Variant(start="fresh", exact=True),
    # Decode-time screens: prefill as the recommended config, decode with these.
    "screen_chunk_8": Variant(dict(chunk_sizes=(8, 4, 2)), start="fresh", base_prefill=True),
    "screen_chunk_16": Variant(dict(chunk_sizes=(16, 8, 2)), start="fresh", base_prefill=True),
    "screen_final_4": Variant(dict(chunk_sizes=(32, 8, 4)), start="fresh", base_prefill=True),
    "screen_chunk_8_every_step": Variant(dict(chunk_sizes=(8, 4, 2), refresh_intervals=(1, 1, 1)), start="fresh",
                                         base_prefill=True),
    "screen_chunk_8_final_4": Variant(dict(chunk_sizes=(8, 4, 4)), start="fresh", base_prefill=True),
}


def parse_variant(text: str) -> tuple[str, Variant]:
    """A name from VARIANTS, or ``name:field=value;field=value`` (values as Python literals; the
    pseudo-fields ``start``, ``force``, ``exact``, ``base_prefill`` and ``compact`` set the decode options)."""
    if ":" not in text:
        if text not in VARIANTS:
            raise SystemExit(f"unknown variant {text!r}; choose from {', '.join(VARIANTS)} or write name:field=value")
        return text, VARIANTS[text]
    import ast

    name, spec = text.split(":", 1)
    fields = {k.strip(): ast.literal_eval(v.strip()) for k, v in (kv.split("=", 1) for kv in spec.split(";") if kv)}
    options = {k: fields.pop(k) for k in ("start", "force", "exact", "base_prefill", "compact") if k in fields}
    return name, Variant(fields, **options)


# ---------------------------------------------------------------------------- needles
@dataclass
class Case:
    """One prompt and where its needle's answer tokens sit."""

    sample: object
    ids: list[int]                 # the prompt, BOS included
    target: list[int]              # the answer tokens (" ", digit groups, ...), then EOS
    copies: dict[int, list[int]]   # answer step -> prompt positions holding the token to copy
    needle: list[int]              # prompt positions of the needle sentence(s) holding the answer


def make_case(model, task: str, length: int, depth: float, seed: int) -> Case:
    tok = model.tokenizer
    counter = TokenCounter(lambda s: tok.encode(s, add_special_tokens=False))
    s = make_sample(task, counter, length, depth, seed)
    enc = tok.tok.encode(s.prompt)
    ids, offsets = enc.ids, enc.offsets
    target = tok.encode(s.target, add_special_tokens=False) + list(tok.eos_token_ids[:1])
    answer = s.answers[0]
    spans = [m.span() for m in re.finditer(rf"(?<![0-9]){re.escape(answer)}(?![0-9])", s.prompt)]
    # The needle: from the sentence boundary before the first answer to the period after the last.
    start = max((m.end() for m in re.finditer(r"[.!?;]\s", s.prompt[:spans[0][0]])), default=0)
    end = s.prompt.index(".", spans[-1][1]) + 1
    needle = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
    copies = {}
    for step, t in enumerate(target):
        copies[step] = [i for i in needle if ids[i] == t and any(a <= offsets[i][0] < b for a, b in spans)]
    return Case(s, ids, target, copies, needle)


# ---------------------------------------------------------------------------- tracing
@dataclass
class LayerRecord:
    """What one layer's attention did for the last query row of a call."""

    config: object
    refresh: int                   # first stage rerun (n_stages: mask reused)
    starts: torch.Tensor           # (G, n_selected) final chunk starts of the row's query block
    w0: int                        # window start (anchored)
    pos: int                       # the row's position
    idx: torch.Tensor              # (G, S) attended key positions
    valid: torch.Tensor            # (G, S) bool
    probs: torch.Tensor            # (G, heads per group, S) softmax weights
    stages: list = field(default_factory=list)   # StageRecord of each stage that ran


def _last_block(geo: Geometry) -> Geometry:
    return Geometry(geo.p0[:, -1:], geo.w0[:, -1:], geo.q_pos[:, -1:], geo.q_valid[:, -1:],
                    geo.exact_prune, geo.exact_attend)


def slot_probs(q, k, starts, geo: Geometry, config, rope, scale):
    """Softmax weights of the last query row over the attended slots, as ``reference.attend``
    computes them: idx (B, G, S), valid (B, G, S), probs (B, G, heads per group, S)."""
    B, tq, H, D = q.shape
    K, G = k.shape[2], starts.shape[1]
    bq = geo.q_pos.shape[-1]
    idx, pos, valid = reference.slot_indices(starts, geo, config)
    keys = reference.gather_kv(k, idx, G)                                # (B, G, 1, S, KG, D)
    row = (tq - 1) % bq
    x = q[:, tq - 1:].float()                                            # (B, 1, H, D)
    if rope is not None:
        base = geo.p0[..., None]
        qcos, qsin = rope.cos_sin(geo.q_pos[..., row:row + 1] - base)    # (B, 1, 1, D/2)
        x = apply_rope(x[:, None], qcos[..., None, :], qsin[..., None, :])[:, 0]
        kcos, ksin = rope.cos_sin(pos - base[:, None])
        keys = apply_rope(keys, kcos[..., None, :], ksin[..., None, :])
    x = x.view(B, G, K // G, H // K, D)
    s = torch.einsum("bgkjd,bgskd->bgkjs", x, keys[:, :, 0]) * scale
    ok = valid[:, :, 0, row]                                             # (B, G, S)
    s = s.masked_fill(~ok[:, :, None, None], float("-inf"))
    return idx[:, :, 0], ok, s.softmax(-1).flatten(2, 3)


@dataclass
class StageRecord:
    """One pruning stage of a traced query block, per head group."""

    stage: int
    chunk: int
    candidates: torch.Tensor       # (G, n) chunk starts scored
    scores: torch.Tensor           # (G, n) their hierarchical top-1 scores
    exact: torch.Tensor            # (G, n) the best score of any token of the chunk
    kept: torch.Tensor             # (G, m) chunk starts kept


def exact_scores(score_chunks, qp, q_valid, k, starts, chunk, geo, config, rope):
    """Chunk scores as the best of *every* token (not the hierarchical top-1 path): each chunk is
    scored as chunks of 2 tokens, whose two probes are exactly their two tokens."""
    if chunk <= 2:
        return score_chunks(qp, q_valid, k, starts, chunk, geo, config, rope)
    sub = torch.where(starts[..., None] == SENTINEL, SENTINEL,
                      starts[..., None] + torch.arange(0, chunk, 2, device=starts.device))
    scores = score_chunks(qp, q_valid, k, sub.flatten(-2), 2, geo, config, rope)
    return scores.view(sub.shape).amax(-1)


class Tracer:
    """Wraps the reference backend's pruning and attention functions to record, per layer, the
    last query row of the prompt (prefill) or of each decode step.

    Options: ``force`` (prompt positions whose chunks are put into every final mask of a decode
    step), ``exact`` (decode steps score chunks by their best token instead of the hierarchical
    top-1). In prefill it also keeps each layer's query of the prompt's last row (``last_rows``)."""

    def __init__(self, model):
        self.model, self.layer, self.want_pos = model, 0, None
        self.force, self.exact, self.decoding = (), False, False
        self.records: dict[int, LayerRecord] = {}
        self.last_rows: dict[int, tuple] = {}
        self.refresh = 0
        self._pending, self._call = [], None

    @contextmanager
    def active(self):
        originals = reference.score_chunks, reference.keep_top, reference.attend
        hooks = [block.attention.register_forward_pre_hook(lambda mod, args, i=i: self._enter_layer(i))
                 for i, block in enumerate(self.model.net.layers)]
        reference.score_chunks, reference.keep_top, reference.attend = (
            self._score_chunks(originals[0]), self._keep_top(originals[1]), self._attend(originals[2]))
        try:
            yield self
        finally:
            reference.score_chunks, reference.keep_top, reference.attend = originals
            for h in hooks:
                h.remove()

    def _enter_layer(self, i):
        self.layer, self._pending = i, []

    def _wanted(self, geo) -> bool:
        return self.want_pos is not None and bool((geo.q_pos[0, -1] == self.want_pos).any())

    def _score_chunks(self, fn):
        def wrapped(qp, q_valid, k, starts, chunk, geo, config, rope, *args, **kw):
            if self.exact and self.decoding:
                scores = exact_scores(fn, qp, q_valid, k, starts, chunk, geo, config, rope)
            else:
                scores = fn(qp, q_valid, k, starts, chunk, geo, config, rope, *args, **kw)
            exact = None
            if self._wanted(geo):   # the traced block only: the last one
                exact = exact_scores(fn, qp[:, -1:], q_valid[:, -1:], k, starts[:, :, -1:], chunk,
                                     _last_block(geo), config, rope)[0, :, -1]
            self._call = (chunk, geo, config, exact)
            return scores
        return wrapped

    def _keep_top(self, fn):
        def wrapped(starts, scores, m, split=None):
            chunk, geo, config, exact = self._call
            kept = fn(starts, scores, m)
            final = chunk == config.chunk_size and m == config.n_selected
            if final and self.force and self.decoding and self._wanted(geo):
                kept = _force(kept, scores, starts, self.force, geo, config)
            if self._wanted(geo):
                self._pending.append(StageRecord(config.chunk_sizes.index(chunk), chunk, starts[0, :, -1].clone(),
                                                 scores[0, :, -1].clone(), exact, kept[0, :, -1].clone()))
            return kept if split is None else reference.split_chunks(kept, *split)
        return wrapped

    def _attend(self, fn):
        def wrapped(q, k, v, starts, geo, config, rope, scale, *args, **kw):
            out = fn(q, k, v, starts, geo, config, rope, scale, *args, **kw)
            if self._wanted(geo):
                last = _last_block(geo)
                idx, ok, probs = slot_probs(q, k, starts[:, :, -1:], last, config, rope, scale)
                self.records[self.layer] = LayerRecord(
                    config, self.refresh, starts[0, :, -1].long(), int(last.w0[0, 0]), self.want_pos,
                    idx[0], ok[0], probs[0], self._pending)
                if not self.decoding:
                    self.last_rows[self.layer] = (q[:, -1:].clone(), k, config, rope)
            self._pending = []
            return out
        return wrapped


def _force(kept, scores, starts, positions, geo, config):
    """Replace the weakest kept chunks of the last query block by the chunks of ``positions``."""
    kept = kept.clone()
    for g in range(kept.shape[1]):
        kept[0, g, -1] = _force_row(kept[0, g, -1], starts[0, g, -1], scores[0, g, -1], positions,
                                    int(geo.w0[0, -1]), config)
    return kept


def _force_row(row, cand, scores, positions, w0: int, config):
    """``row`` (n_selected,) sorted chunk starts with the chunks of ``positions`` (those that are
    selectable, in [sink, w0)) put in place of the lowest-scoring ones (empty entries first)."""
    c = config.chunk_size
    want = sorted({p - p % c for p in positions if config.sink <= p < w0})
    missing = [x for x in want if x not in set(row.tolist())]
    if not missing:
        return row
    lookup = dict(zip(cand.tolist(), scores.tolist()))
    order = sorted(range(row.numel()), key=lambda j: (int(row[j]) != SENTINEL, lookup.get(int(row[j]), -1e30)))
    row = row.clone()
    for j, x in zip(order, missing):
        row[j] = x
    return row.sort().values


def force_masks(masks: list, records: dict, positions: list[int]) -> list:
    """The prompt's last-block masks (what decode starts from) with the needle's chunks forced in."""
    out = []
    for layer, m in enumerate(masks):
        r = records[layer]
        last = r.stages[-1]
        m = m.clone()
        for g in range(m.starts.shape[1]):
            row = _force_row(m.starts[0, g, -1].long(), last.candidates[g], last.scores[g], positions, r.w0, r.config)
            m.starts[0, g, -1] = row.to(m.starts.dtype)
        out.append(m)
    return out


@contextmanager
def fixed_mask_concat():
    """Work around ``HiPMask.cat_query_blocks`` joining ``w0`` (B, NQB) along the batch instead of
    the query blocks (it hits the reference backend when it cuts a prefill into slices, e.g. with
    small stage-0 chunks): decode would then anchor its window at the first slice's w0."""
    original = HiPMask.cat_query_blocks

    def cat(masks):
        joined = original([HiPMask(m.starts, m.stage_inputs, None) for m in masks])
        w0 = None if masks[0].w0 is None else torch.cat([m.w0 for m in masks], dim=1)
        return HiPMask(joined.starts, joined.stage_inputs, w0)

    HiPMask.cat_query_blocks = staticmethod(cat)
    try:
        yield
    finally:
        HiPMask.cat_query_blocks = staticmethod(original)


# ---------------------------------------------------------------------------- running
@dataclass
class Prefilled:
    cache: KVCache
    logits: torch.Tensor
    masks: list
    records: dict
    last_rows: dict


def set_config(model, config):
    model.hip = config
    model.net.set_hip_config(config)


def run_prefill(model, case: Case, tracer: Tracer, extra: int) -> Prefilled:
    a = model.args
    cache = KVCache(a.n_layers, 1, len(case.ids) + extra, a.n_kv_heads, a.head_dim, dtype=model.dtype,
                    device=model.device)
    tracer.want_pos, tracer.records, tracer.refresh, tracer.decoding = len(case.ids) - 1, {}, 0, False
    # One chunk, keeping every layer's mask: its last query block is what the "prefill" start reuses.
    call = AttentionCall(backend="hip", masks=[None] * a.n_layers)
    T = len(case.ids)
    with torch.inference_mode():
        logits = model.net(torch.tensor([case.ids], device=model.device), torch.tensor([0], device=model.device),
                           cache, call, kv_limit=T, last_only=True)[:, -1]
    masks = [None if m is None else m.query_blocks(slice(-1, None)) for m in call.masks]
    return Prefilled(cache, logits, masks, dict(tracer.records), dict(tracer.last_rows))


def last_row_masks(model, pre: Prefilled, T: int) -> list:
    """Per layer, the mask pruned from scratch with the prompt's last row as the only query."""
    masks = []
    for layer in sorted(pre.last_rows):
        q, k, _, rope = pre.last_rows[layer]
        config = model.net.layer_configs[layer]
        geo = reference.block_geometry(torch.tensor([T], device=q.device), 1, config)
        masks.append(run_stages(q, k, geo, config, rope, reference.score_chunks, keep_top=reference.keep_top))
    return masks


def run_decode(model, case: Case, pre: Prefilled, tracer: Tracer, variant: Variant, max_new: int,
               teacher: bool) -> tuple[list[int], list[dict]]:
    """Greedy decode (``teacher``: feed the answer tokens instead of the predictions).

    Returns the tokens predicted at each step and, per step, the layer records and the
    target's probability. The cache's prompt part is only read, so decodes can share it."""
    T = len(case.ids)
    state = DecodeState("hip")
    tracer.decoding, tracer.exact, tracer.want_pos = True, variant.exact, None
    tracer.force = {"needle": case.needle, "digits": sorted({p for ps in case.copies.values() for p in ps}),
                    None: ()}[variant.force]
    masks = last_row_masks(model, pre, T) if variant.start == "last_row" else pre.masks
    if tracer.force:
        masks = force_masks(masks, pre.records, tracer.force)
    state.admit(0, 1)
    if variant.start != "fresh":   # continue from these masks: step 0's pruning is done
        state.masks, state.steps = list(masks), [1]
    logits, seqlens = pre.logits, torch.tensor([T], device=model.device)
    preds, steps = [], []
    eos = set(model.tokenizer.eos_token_ids)
    for step in range(max_new):
        pred = int(logits[0].argmax())
        preds.append(pred)
        tgt = case.target[step] if step < len(case.target) else None
        p_tgt = float(logits[0].float().softmax(-1)[tgt]) if tgt is not None else None
        steps.append({"pred": pred, "target": tgt, "p_target": p_tgt,
                      "records": pre.records if step == 0 else dict(tracer.records)})
        if teacher:
            if step + 1 >= len(case.target):   # the last target (EOS) is predicted, never fed
                break
            nxt = case.target[step]
        else:
            if pred in eos or "\n" in model.tokenizer.decode([pred]):
                break
            nxt = pred
        tracer.want_pos, tracer.records = T + step, {}
        tracer.refresh = model.hip.refresh_stage(state.steps[0])
        logits = decode_one_token(model, torch.tensor([nxt], device=model.device), seqlens, pre.cache, state,
                                  kv_limit=T + max_new)
        seqlens += 1
    tracer.force, tracer.exact, tracer.decoding = (), False, False
    return preds, steps


def compact_answer(model, case: Case, records: dict, max_new: int) -> tuple[str, int]:
    """Dense greedy answer from the prompt tokens the last layer (whose heads copy the answer)
    attends at the first answer step -- sink, both head groups' chunks, window: fewer than the
    trained context -- kept in order at contiguous positions; and how many tokens that is."""
    r = records[max(records)]
    ids = [case.ids[i] for i in sorted(set(r.idx[r.valid].tolist())) if i < len(case.ids)]
    return infinitehip.generate(model, [ids], max_new_tokens=max_new, backend="dense", stop="\n")[0], len(ids)


# ---------------------------------------------------------------------------- analysis
def locate(r: LayerRecord, positions: list[int]) -> list[str]:
    """Per head group, where the first attended of ``positions`` is (or why none is)."""
    out = []
    cfg = r.config
    for g in range(r.starts.shape[0]):
        found = None
        for p in positions:
            if p < cfg.sink:
                found = "sink"
            elif p >= max(r.w0, cfg.sink):
                found = "win"
            elif bool(((r.starts[g] <= p) & (p < r.starts[g] + cfg.chunk_size)).any()):
                found = "sel"
            if found:
                break
        if not found:
            found = "old"
            for st in r.stages:
                in_cand = any(bool(((st.candidates[g] <= p) & (p < st.candidates[g] + st.chunk)).any()) for p in positions)
                in_kept = any(bool(((st.kept[g] <= p) & (p < st.kept[g] + st.chunk)).any()) for p in positions)
                if in_cand and not in_kept:
                    found = f"s{st.stage}"
                    break
        out.append(found)
    return out


def stage_ranks(r: LayerRecord, positions: list[int]) -> list[str]:
    """Per stage that ran: the rank of the best needle chunk among the candidates per head group,
    by its hierarchical score and (in parentheses) by its best token's score; then how many are kept."""
    out = []
    for st in r.stages:
        ranks = []
        for g in range(st.candidates.shape[0]):
            hit = torch.zeros_like(st.candidates[g], dtype=torch.bool)
            for p in positions:
                hit |= (st.candidates[g] <= p) & (p < st.candidates[g] + st.chunk)
            if hit.any():
                rank = int((st.scores[g] > st.scores[g][hit].max()).sum()) + 1
                exact = int((st.exact[g] > st.exact[g][hit].max()).sum()) + 1
                ranks.append(f"{rank}({exact})")
            else:
                ranks.append("-")
        out.append(f"s{st.stage}:{'/'.join(ranks)}<={st.kept.shape[-1]}")
    return out


def coverage(r: LayerRecord, positions: list[int]) -> str:
    """How many of ``positions`` each head group attends, e.g. "12/18|5/18"."""
    return "|".join(f"{len(set(positions) & set(r.idx[g][r.valid[g]].tolist()))}/{len(positions)}"
                    for g in range(r.idx.shape[0]))


def mass(r: LayerRecord, positions: list[int]) -> float:
    """Attention mass on ``positions``, max over the layer's query heads."""
    hit = torch.zeros_like(r.valid)
    for p in positions:
        hit |= (r.idx == p) & r.valid
    return float((r.probs * hit[:, None]).sum(-1).max())


def top_keys(r: LayerRecord, ids: list[int], tok, n: int = 3) -> list[str]:
    """The ``n`` keys with the most attention (max over the layer's heads), as position:token:weight."""
    w = r.probs.amax(1)                                                  # (G, S)
    best: dict[int, float] = {}
    for g in range(w.shape[0]):
        for i in range(w.shape[1]):
            if r.valid[g, i] and w[g, i] > 0.02:
                p = int(r.idx[g, i])
                best[p] = max(best.get(p, 0.0), float(w[g, i]))
    top = sorted(best.items(), key=lambda kv: -kv[1])[:n]
    return [f"{p}:{tok.decode([ids[p]]) if p < len(ids) else '<new>'!r}:{v:.2f}" for p, v in top]


def step_report(model, case: Case, step: dict, n: int) -> dict:
    """The trace of one teacher-forced answer step: per layer, where the token to copy is (step 0,
    the prompt's last query row, whose masks decode starts from: where any answer token is)."""
    positions = sorted({p for ps in case.copies.values() for p in ps}) if n == 0 else case.copies.get(n, [])
    layers = {}
    for layer, r in sorted(step["records"].items()):
        layers[layer] = {"where": locate(r, positions) if positions else None,
                         "mass": round(mass(r, positions), 3) if positions else None,
                         "needle_mass": round(mass(r, case.needle), 3),
                         "needle_attended": coverage(r, case.needle),
                         "ranks": stage_ranks(r, positions) if positions else [],
                         "top": top_keys(r, case.ids, model.tokenizer),
                         "refresh": r.refresh}
    tok = model.tokenizer
    pred = tok.decode([step["pred"]])
    ok = step["pred"] == step["target"]
    if step["target"] in tok.eos_token_ids:   # the answer ends: any non-digit ends it as well
        ok = not pred.strip()[:1].isdigit()
    return {"step": n, "target": tok.decode([step["target"]], skip_special_tokens=False)
            if step["target"] is not None else None, "pred": pred, "ok": ok,
            "p_target": round(step["p_target"], 3) if step["p_target"] is not None else None,
            "copy_positions": positions, "layers": layers}


def print_trace(model, case: Case, reports: list[dict], free: str):
    s = case.sample
    print(f"\n{s.task} depth {s.depth} seed {s.seed}: answer {s.answers[0]!r}, free-running {free!r} "
          f"({'right' if score(s.task, free, s.answers) else 'WRONG'}); prompt {len(case.ids)} tokens, "
          f"needle at {case.needle[0]}..{case.needle[-1]}")
    for rep in reports:
        if not rep["copy_positions"]:
            continue
        refresh = {lr["refresh"] for lr in rep["layers"].values()}
        what = "prompt's last row, any answer token" if rep["step"] == 0 else f"target {rep['target']!r}"
        print(f"  step {rep['step']}: {what} at {rep['copy_positions']} -> pred {rep['pred']!r} "
              f"p={rep['p_target']}  (refresh stage {sorted(refresh)})")
        for layer, lr in rep["layers"].items():
            print(f"    layer {layer}: {'/'.join(lr['where']):<10} mass {lr['mass']:.3f} "
                  f"(needle {lr['needle_mass']:.3f}, attended {lr['needle_attended']})  {' '.join(lr['ranks']):<36} "
                  f"top {' '.join(lr['top'])}")


# ---------------------------------------------------------------------------- commands
def cases_for(model, tasks, length, depths, samples, seed):
    return [make_case(model, task, length, depths[i % len(depths)], seed * 1_000_003 + i)
            for task in tasks for i in range(samples)]


def prefill_key(config) -> tuple:
    return dataclasses.astuple(config.replace(refresh_intervals=(1,) * config.n_stages))


def evaluate(model, cases, variants: dict[str, Variant], trace: bool, log) -> dict:
    """Free-running and teacher-forced results of every (variant, case); one prefill per case and
    prefill-relevant config."""
    base = model.hip
    results = defaultdict(list)
    tracer = Tracer(model)
    configs = {name: base.replace(**v.overrides) for name, v in variants.items()}
    groups = defaultdict(list)
    for name, v in variants.items():
        groups[prefill_key(base if v.base_prefill else configs[name])].append(name)
    with tracer.active(), fixed_mask_concat():
        for ci, case in enumerate(cases):
            max_new = MAX_NEW_TOKENS[case.sample.task]
            for names in groups.values():
                v0 = variants[names[0]]
                set_config(model, base if v0.base_prefill else configs[names[0]])
                t = time.perf_counter()
                pre = run_prefill(model, case, tracer, max_new + 1)
                t_pre = time.perf_counter() - t
                for name in names:
                    v = variants[name]
                    set_config(model, configs[name])
                    preds, _ = run_decode(model, case, pre, tracer, v, max_new, teacher=False)
                    free = model.tokenizer.decode([p for p in preds if p not in model.tokenizer.eos_token_ids])
                    _, steps = run_decode(model, case, pre, tracer, v, max_new, teacher=True)
                    reports = [step_report(model, case, st, n) for n, st in enumerate(steps)]
                    if v.compact:
                        free, n_ids = compact_answer(model, case, steps[1]["records"], max_new)
                        reports[0]["compact_tokens"] = n_ids
                    s = case.sample
                    ok = score(s.task, free, s.answers)
                    results[name].append({"task": s.task, "depth": s.depth, "seed": s.seed, "answer": s.answers[0],
                                          "free": free.strip()[:40], "score": ok,
                                          "teacher": [r["ok"] for r in reports],
                                          "steps": reports if trace else None})
                    note = f", compact prompt {reports[0]['compact_tokens']} tokens" if v.compact else ""
                    log(f"[{ci + 1}/{len(cases)}] {name:<22} {s.task:<14} depth {s.depth:.1f} "
                        f"{s.answers[0]:>7} -> {free.strip()[:16]!r:<18} {'ok' if ok else 'WRONG'}  "
                        f"teacher-forced {''.join('+' if r['ok'] else '-' for r in reports)}  "
                        f"(prefill {t_pre:.0f}s{note})")
                    if trace:
                        print_trace(model, case, reports, free)
    set_config(model, base)
    return results


def summarize(results: dict) -> dict:
    out = {}
    for name, rows in results.items():
        by_task = defaultdict(list)
        for r in rows:
            by_task[r["task"]].append(r)
        out[name] = {}
        for task, rs in by_task.items():
            n_steps = max(len(r["teacher"]) for r in rs)
            per_step = [sum(r["teacher"][i] for r in rs if i < len(r["teacher"])) for i in range(n_steps)]
            out[name][task] = {"accuracy": sum(r["score"] for r in rs) / len(rs), "samples": len(rs),
                               "teacher_forced_right_per_token": per_step}
    return out


def aggregate_trace(results: dict) -> dict:
    """Per variant, step and layer: how often the token to copy is in each place (both groups)."""
    out = {}
    for name, rows in results.items():
        table = defaultdict(Counter)
        for r in rows:
            for rep in r["steps"] or []:
                for layer, lr in rep["layers"].items():
                    if lr["where"]:
                        table[f"step {rep['step']} layer {layer}"]["/".join(lr["where"])] += 1
        out[name] = {k: dict(v) for k, v in sorted(table.items())}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("trace", "accuracy"))
    p.add_argument("--tasks", "--task", default="passkey")
    p.add_argument("--length", default="32x")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--samples", type=int, default=4, help="per task (depths cycle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="base", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE;...",
                   help="an extra variant: HiPConfig fields (Python literals) and the Variant options")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = infinitehip.load("builtin", device="cpu")
    length = parse_length(a.length, model.hip.model_context_length)
    variants = dict(parse_variant(v) for v in a.variants.split(",") + a.variant if v)
    cases = cases_for(model, a.tasks.split(","), length, [float(d) for d in a.depths.split(",")], a.samples, a.seed)
    t0 = time.time()
    results = evaluate(model, cases, variants, a.command == "trace", lambda m: print(m, flush=True))
    summary = summarize(results)
    print(f"\n{length} tokens, {a.samples} samples per task ({time.time() - t0:.0f}s)")
    for name, tasks in summary.items():
        for task, s in tasks.items():
            print(f"  {name:<22} {task:<14} {100 * s['accuracy']:5.1f}%  (n={s['samples']}; teacher-forced right "
                  f"per answer token: {s['teacher_forced_right_per_token']})")
    if a.command == "trace":
        for name, table in aggregate_trace(results).items():
            print(f"\n{name}: where the token to copy is (group 0/group 1), counts over samples")
            for key, counts in table.items():
                print(f"  {key}: {counts}")
    if a.out:
        a.out.write_text(json.dumps({"command": "python scripts/diagnose_builtin.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "length": length, "summary": summary,
            "trace": aggregate_trace(results) if a.command == "trace" else None,
            "results": {k: [{kk: vv for kk, vv in r.items() if kk != "steps"} for r in v]
                        for k, v in results.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
