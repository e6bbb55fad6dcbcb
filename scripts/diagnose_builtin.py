"""Why the built-in model misses needles beyond its trained context: trace hip attention per layer
and answer token, and measure decode variants and oracles on the same prefills (CPU, reference path).

    python scripts/diagnose_builtin.py trace --task passkey --length 32x --samples 4
    python scripts/diagnose_builtin.py accuracy --tasks passkey,niah_multikey --samples 10 \\
        --variants base,fresh_start,force_needle

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import infinitehip  # noqa: E402
from infinitehip.attention import reference  # noqa: E402
from infinitehip.attention.stages import run_stages  # noqa: E402
from infinitehip.cache.kv import KVCache  # noqa: E402
from infinitehip.engine import DecodeState, decode_one_token  # noqa: E402
from infinitehip.models.llama import AttentionCall  # noqa: E402
from infinitehip.lengths import parse_tokens  # noqa: E402
from infinitehip.eval.runner import MAX_NEW_TOKENS  # noqa: E402
from infinitehip.eval.tasks import TokenCounter, make_sample, score  # noqa: E402

from diagnose_trace import Tracer, fixed_mask_concat, force_masks, print_trace, step_report  # noqa: E402


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


# Variants whose fields are per stage (chunk_sizes, refresh_intervals, ...) must match the
# model's stage count; write them on the command line (--variant name:field=value). The
# 2026-11-25 screens of the 3-stage config are in benchmarks/results/sweep_builtin_32x.json.
VARIANTS = {
    "base": Variant(),
    "fresh_start": Variant(start="fresh"),
    "last_row_start": Variant(start="last_row"),
    "last_row_exact": Variant(start="last_row", exact=True),
    "fresh_exact": Variant(start="fresh", exact=True),
    "force_needle": Variant(force="needle"),
    "force_digits": Variant(force="digits"),
    "compact": Variant(compact=True),
    "exact_rope": Variant(dict(rope_attend="exact")),
    "exact_prune": Variant(dict(rope_prune="exact")),
    "head_sharing_all": Variant(dict(head_sharing="all")),
    "no_dense_layers": Variant(dict(dense_layers=())),
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
    length = parse_tokens(a.length, model.hip.model_context_length)
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
