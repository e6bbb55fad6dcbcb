"""Tracing and analysis for ``diagnose_builtin.py``: which keys each layer's hip attention picks
and attends for the answer's query row, the oracles that change them, and the per-step reports."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from infinitehip.attention import reference  # noqa: E402
from infinitehip.attention.mask import SENTINEL, Geometry, HiPMask  # noqa: E402
from infinitehip.attention.rope import apply_rope  # noqa: E402
from infinitehip.eval.tasks import score  # noqa: E402


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


def step_report(model, case, step: dict, n: int) -> dict:
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


def print_trace(model, case, reports: list[dict], free: str):
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
