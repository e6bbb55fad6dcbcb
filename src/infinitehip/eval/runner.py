"""Run the RULER-style tasks over lengths x depths x methods; one JSON record per cell.

A method is one of the engine's attention backends (hip, dense, streaming) on a model loaded
here, or "endpoint": an OpenAI-compatible server's /v1/completions, called with urllib.
"""
from __future__ import annotations

import datetime
import json
import platform
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterable

from ..config import is_int
from .tasks import TASKS, MULTI_ANSWER, TokenCounter, make_sample, score

METHODS = ("hip", "dense", "streaming")
# Tokens to generate per task: the longest answer and a little more.
MAX_NEW_TOKENS = {"passkey": 12, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "vt": 40, "kv": 16}


@dataclass
class EvalSpec:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples: int = 4            # per (task, length, depth, method)
    seed: int = 0

    def __post_init__(self):
        for name in ("tasks", "lengths", "methods", "depths"):
            seen = getattr(self, name)
            if not seen:   # else an empty table, then a plotting error
                raise ValueError(f"no {name} given: name at least one (comma-separated)")
            twice = sorted({x for x in seen if seen.count(x) > 1}, key=seen.index)   # a cell run twice: averaged twice
            if twice:
                raise ValueError(f"{name} {twice} given more than once (e.g. 512 and 1x of a 512-token model): "
                                 "name each once")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {TASKS}")
        # Checked here, before the model loads: the engine refused it only at the first completion.
        bad = [m for m in self.methods if m not in METHODS + ("endpoint",)]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {METHODS} (attention backends)")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        if not is_int(self.samples) or self.samples < 1:   # said "samples >= 1 and every length >= 64"
            raise ValueError(f"samples={self.samples!r}: give at least 1 prompt per cell (--samples)")
        short = [n for n in self.lengths if n < 64]
        if short:
            raise ValueError(f"lengths {short} are too short: give at least 64 tokens (a prompt holds the task's "
                             "question and needles)")


def engine_completer(model, method: str, chunk_size: int = 4096) -> Callable[[str, int], str]:
    from ..engine import generate

    def complete(prompt: str, max_new: int) -> str:
        return generate(model, prompt, max_new_tokens=max_new, backend=method, stop="\n", chunk_size=chunk_size)

    return complete


def endpoint_completer(url: str, model_name: str, timeout: float = 600.0) -> Callable[[str, int], str]:
    """Greedy completions from an OpenAI-compatible server (``url`` with or without /v1)."""
    base = url.rstrip("/")
    target = base + ("/completions" if base.endswith("/v1") else "/v1/completions")

    def complete(prompt: str, max_new: int) -> str:
        body = json.dumps({"model": model_name, "prompt": prompt, "max_tokens": max_new, "temperature": 0.0,
                           "stop": ["\n"]}).encode()
        req = urllib.request.Request(target, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:   # the server's own message says what was wrong
            try:
                detail = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = e.reason
            raise ValueError(f"{target} answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:   # "<urlopen error [Errno 111] Connection refused>"
            raise ValueError(f"cannot reach {target} ({e.reason}): is the server running (infinitehip serve)? "
                             "Check --endpoint") from None
        try:   # another kind of server: a KeyError or IndexError traceback, or JSON's "Expecting value"
            return json.loads(raw)["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{target} did not answer like an OpenAI-compatible completions endpoint (no "
                             f"choices[0].text in {raw[:80]!r}): check --endpoint") from None

    return complete


# Prompts up to this long are built once per task before the run: a task's needles and question
# take up to ~150 tokens, and a length too short for them failed only when its cell came, after
# the cells before it had run (longer prompts always fit, and take seconds each to build).
_SHORT = 4096


def check_short_lengths(spec: EvalSpec, counter: TokenCounter):
    """Build each task's first prompt at the shortest length, if short: a length too short for the
    task is an error before any work."""
    shortest = min(spec.lengths)
    if shortest <= _SHORT:
        for task in spec.tasks:
            make_sample(task, counter, shortest, spec.depths[0], _sample_seed(spec, 0))


def _sample_seed(spec: EvalSpec, i: int) -> int:
    """The seed of the i-th prompt of every cell."""
    return spec.seed * 1_000_003 + i


def run_eval(spec: EvalSpec, completers: dict[str, Callable[[str, int], str]], counter: TokenCounter, *,
             model_name: str, device: str, trained: int | None, on_cell: Callable[[dict], None] | None = None,
             progress: Callable[[], None] | None = None) -> list[dict]:
    """Score every (task, length, depth, method) cell on ``spec.samples`` prompts.

    All methods see the same prompts. ``progress`` is called once per generated completion.
    """
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    records = []
    for task in spec.tasks:
        for length in spec.lengths:
            for depth in spec.depths:
                samples = [make_sample(task, counter, length, depth, _sample_seed(spec, i))
                           for i in range(spec.samples)]
                for method, complete in completers.items():
                    total, seconds, outputs = 0.0, 0.0, []
                    for s in samples:
                        t = time.perf_counter()
                        pred = complete(s.prompt, MAX_NEW_TOKENS[task])
                        seconds += time.perf_counter() - t
                        total += score(task, pred, s.answers)
                        outputs.append(pred.strip()[:80])
                        if progress:
                            progress()
                    rec = {"task": task, "method": method, "length": length,
                           "length_over_trained": round(length / trained, 3) if trained else None,
                           "depth": depth, "accuracy": total / len(samples), "samples": len(samples),
                           "model": model_name, "device": device, "date": date,
                           "seconds_per_sample": round(seconds / len(samples), 3),
                           "example": {"answer": ", ".join(samples[0].answers), "output": outputs[0]}}
                    records.append(rec)
                    if on_cell:
                        on_cell(rec)
    return records


def n_completions(spec: EvalSpec, n_methods: int) -> int:
    return len(spec.tasks) * len(spec.lengths) * len(spec.depths) * spec.samples * n_methods


def summarize(records: Iterable[dict]) -> dict[tuple[str, str, int], float]:
    """Mean accuracy over depths per (task, method, length)."""
    acc: dict[tuple[str, str, int], list[float]] = {}
    for r in records:
        acc.setdefault((r["task"], r["method"], r["length"]), []).append(r["accuracy"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def device_name(model=None) -> str:
    import torch

    dev = getattr(model, "device", None)
    if dev is not None and getattr(dev, "type", "") == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


__all__ = ["EvalSpec", "METHODS", "MULTI_ANSWER", "check_short_lengths", "engine_completer", "endpoint_completer",
           "run_eval", "summarize", "n_completions", "device_name"]
