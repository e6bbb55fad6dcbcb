"""RULER-style synthetic long-context tasks (arXiv 2404.06654): deterministic generators + scorer.

Every task hides one or more facts (needles) in a long distractor context (the haystack), then
asks for them at the end. A sample is built for a target length in tokens and a needle depth
(0 = start of the context, 1 = its end), from a seed: the same (task, length, depth, seed) and
tokenizer always give the same prompt.

Tasks (names as in RULER where one exists):
    passkey          one pass key in prose
    niah_single      one "special magic number" for a named key
    niah_multikey    four needles with different keys; one is asked for
    niah_multivalue  four numbers for the same key; all are asked for
    vt               variable tracking: a chain VAR A = n, VAR B = VAR A, ...; name every variable
    kv               key-value retrieval from a long JSON-like list of random pairs

The haystack is public-domain prose (E. Stagg Whitin, "Prison Labor Legislation of 1911"),
shipped in ``infinitehip/assets/haystack.txt``; it is repeated when a prompt needs more.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Sequence

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "kv")
# Tasks whose answer is a list: the score is the fraction of the list found.
MULTI_ANSWER = ("niah_multivalue", "vt")

_ADJECTIVES = ("quiet", "amber", "brave", "silver", "hollow", "rapid", "gentle", "crimson", "frozen", "golden",
               "hidden", "lucky", "narrow", "ancient", "bitter", "bright", "calm", "clever", "dusty", "eager",
               "fierce", "fragile", "giant", "humble", "icy", "jolly", "lonely", "misty", "noble", "pale",
               "proud", "rusty", "shy", "sleepy", "solid", "sturdy", "swift", "tender", "velvet", "wild",
               "wooden", "young", "bold", "cosmic", "crooked", "distant", "electric", "fuzzy", "glass", "green")
_NOUNS = ("river", "falcon", "lantern", "harbor", "meadow", "pebble", "comet", "willow", "anchor", "badger",
          "canyon", "dragon", "ember", "forest", "garden", "hammer", "island", "jacket", "kettle", "ladder",
          "marble", "needle", "orchard", "parrot", "quartz", "rabbit", "saddle", "tunnel", "violin", "walnut",
          "bridge", "candle", "desert", "engine", "feather", "glacier", "helmet", "iris", "jungle", "kingdom",
          "lemon", "mirror", "nectar", "ocean", "pepper", "rocket", "spider", "thunder", "valley", "wizard")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = "0123456789abcdef"

_INTRO = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.",
    "niah_single": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                   "them. I will quiz you about the numbers afterwards.",
    "vt": "Memorize and track the chain of variable assignments hidden in the following text.",
    "kv": "Extract the value corresponding to the specified key in the list of pairs below.",
}
_INTRO["niah_multikey"] = _INTRO["niah_multivalue"] = _INTRO["niah_single"]


@dataclass(frozen=True)
class Sample:
    """One prompt. ``answers`` are the strings a correct completion contains."""

    task: str
    prompt: str
    answers: tuple[str, ...]
    target: str            # the completion the model is trained to produce (starts with a space)
    length: int            # target prompt length in tokens
    depth: float
    seed: int
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- haystack
@functools.lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """The shipped prose, whitespace-normalized and split into sentences."""
    text = resources.files("infinitehip").joinpath("assets/haystack.txt").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", text).strip()
    return tuple(s for s in re.split(r"(?<=[.!?;])(?<! [A-Z]\.)\s+(?=[\"'(A-Z0-9])", text) if s)


class TokenCounter:
    """Counts tokens of text pieces with a tokenizer's ``encode``; caches the haystack sentences."""

    def __init__(self, encode: Callable[[str], Sequence[int]]):
        self.encode = encode
        self._sentences: list[int] | None = None

    def __call__(self, text: str) -> int:
        return len(self.encode(text))

    def sentence_lengths(self) -> list[int]:
        # Each sentence is counted with its leading space: a space-led word starts a new pre-token
        # in byte-level BPE, so the counts add up to (nearly) the count of the joined text.
        if self._sentences is None:
            self._sentences = [len(self.encode(" " + s)) for s in haystack_sentences()]
        return self._sentences


def _prose(rng: random.Random, counter: TokenCounter, n_tokens: int) -> tuple[list[str], list[int]]:
    """Consecutive haystack sentences (wrapping around) from a random start, about n_tokens long,
    and their token counts."""
    sents, lens = haystack_sentences(), counter.sentence_lengths()
    i, out, counts = rng.randrange(len(sents)), [], []
    while sum(counts) < n_tokens:
        out.append(sents[i])
        counts.append(lens[i])
        i = (i + 1) % len(sents)
    return out, counts


def _boundary(counts: list[int], depth: float, n_tokens: int) -> int:
    """The sentence boundary nearest ``depth`` of the ``n_tokens`` of prose the prompt keeps.

    Measured in tokens, not sentences: haystack sentences run from a few tokens to ~200, and
    round(depth * sentences) put depth 0.5 at 0.38-0.42 of a 512- or 3000-token context. Prose
    past ``n_tokens`` is trimmed, so the last boundary counts as ``n_tokens``.
    """
    cum = [0]
    for n in counts:
        cum.append(min(cum[-1] + n, n_tokens))
    return min(range(len(cum)), key=lambda i: abs(cum[i] - depth * n_tokens))


# ---------------------------------------------------------------------------- needles
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _needles(task: str, rng: random.Random) -> tuple[list[str], str, tuple[str, ...], str, dict]:
    """(needle sentences, question, answers, target completion, meta) for a prose-haystack task."""
    if task == "passkey":
        n = _number(rng, 5)
        return ([f"The pass key is {n}. Remember it. {n} is the pass key."], "What is the pass key?",
                (n,), f" {n}", {})
    taken: set = set()
    if task in ("niah_single", "niah_multikey"):
        keys = [_key(rng, taken) for _ in range(1 if task == "niah_single" else 4)]
        vals = [_number(rng, 6) for _ in keys]
        ask = rng.randrange(len(keys))
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
        question = f"What is the special magic number for {keys[ask]} mentioned in the provided text?"
        return needles, question, (vals[ask],), f" {vals[ask]}", {"asked_index": ask}
    if task == "niah_multivalue":
        key = _key(rng, taken)
        vals = []
        while len(vals) < 4:
            v = _number(rng, 6)
            if v not in vals:
                vals.append(v)
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        return needles, question, tuple(vals), " " + ", ".join(vals), {}
    if task == "vt":
        names = []
        while len(names) < 5:
            v = "".join(rng.choice(_LETTERS) for _ in range(5))
            if v not in names:
                names.append(v)
        value = _number(rng, 5)
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = f"Find all variables that are assigned the value {value} in the text above."
        return needles, question, tuple(names), " " + " ".join(names), {}
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _positions(n_sentences: int, n_needles: int, at: int, task: str, rng: random.Random) -> list[int]:
    """Sentence indices (sorted, may repeat) before which the needles are inserted; ``at``: the
    boundary at the needle depth."""
    if n_needles == 1:
        return [at]
    if task == "vt":   # the chain starts at the depth and spreads towards the end, in order
        return sorted([at] + [rng.randint(at, n_sentences) for _ in range(n_needles - 1)])
    # the asked needle sits at the depth, the others anywhere
    return [rng.randint(0, n_sentences) for _ in range(n_needles)]


# ---------------------------------------------------------------------------- samples
def make_sample(task: str, counter: TokenCounter, length: int, depth: float, seed: int) -> Sample:
    """One prompt of about ``length`` tokens (never more) with the needle(s) at ``depth``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{length}/{depth:.4f}/{seed}")
    if task == "kv":
        return _kv_sample(counter, length, depth, seed, rng)
    needles, question, answers, target, meta = _needles(task, rng)
    head = _INTRO[task] + "\n"
    tail = f"\n{question}\nAnswer:"
    fixed = counter(head) + counter(tail) + sum(counter(" " + n) for n in needles) + 1  # +1: BOS
    body, counts = _prose(rng, counter, max(0, length - fixed))
    at = _boundary(counts, depth, max(0, length - fixed))
    pos = _positions(len(body), len(needles), at, task, rng)
    if task in ("niah_multikey", "niah_multivalue"):
        # The asked needle goes at the depth (multivalue asks every value: its first), in text order.
        ask = meta["asked_index"] if task == "niah_multikey" else 0
        pos[ask] = at
        order = sorted(range(len(needles)), key=lambda i: (pos[i], i))
        if task == "niah_multikey":
            meta["asked_index"] = order.index(ask)
        needles, pos = [needles[i] for i in order], [pos[i] for i in order]

    def build(body):
        sents = list(body)
        for offset, (p, n) in enumerate(zip(pos, needles)):
            sents.insert(min(p, len(body)) + offset, n)
        return head + " ".join(sents) + tail

    prompt = build(body)
    # Trim prose from the end of the context (never the needles) until the prompt fits, then give
    # back the longest start of the last sentence dropped that still fits: a haystack sentence is
    # up to ~200 tokens, and whole sentences left 1x prompts up to 21% short.
    dropped = None
    while counter(prompt) + 1 > length and body:
        dropped, body = body[-1], body[:-1]
        prompt = build(body)
    if dropped is not None:
        words = dropped.split(" ")
        lo, hi = 0, len(words) - 1
        while lo < hi:   # binary search: the most words that fit
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if counter(build(body + [" ".join(words[:mid])])) + 1 <= length else (lo, mid - 1)
        if lo:
            body = body + [" ".join(words[:lo])]
            prompt = build(body)
    _check_fits(task, counter, prompt, length)
    return Sample(task, prompt, answers, target, length, depth, seed, meta)


def _check_fits(task: str, counter: TokenCounter, prompt: str, length: int):
    """With no prose left the prompt can still be longer than asked (four needles and a question
    took 113 tokens at --lengths 64): its record would name a length it does not have."""
    n = counter(prompt) + 1
    if n > length:
        raise ValueError(f"length {length} is too short for {task}: its question and needles alone take {n} "
                         f"tokens; ask for at least {n}")


def _hex_string(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_HEX) for _ in range(n))


def _kv_sample(counter: TokenCounter, length: int, depth: float, seed: int, rng: random.Random) -> Sample:
    def hexs(n):
        return _hex_string(rng, n)

    head = _INTRO["kv"] + "\n"
    pairs: list[tuple[str, str]] = []
    seen: set = set()
    # Tokens a pair takes, measured on random pairs (a fixed probe pair took more than random hex
    # does, so prompts came out at ~70% of their length); its own generator: the prompt's draws stay.
    probe_rng = random.Random(0)
    probe = counter(",".join(f' "{_hex_string(probe_rng, 6)}": "{_hex_string(probe_rng, 6)}"'
                             for _ in range(32))) / 32
    key = None
    while True:
        k = hexs(6)
        if k not in seen:
            seen.add(k)
            if key is None:
                key, value = k, hexs(6)
                continue
            pairs.append((k, hexs(6)))
        tail = f'\nKey: "{key}"\nThe value associated with the specified key is:'
        if (len(pairs) + 2) * probe + counter(head) + counter(tail) + 1 > length:
            break
    at = min(len(pairs), round(depth * len(pairs)))
    pairs.insert(at, (key, value))

    def build(pairs):
        return head + "{" + ",".join(f' "{k}": "{v}"' for k, v in pairs) + " }" + tail

    prompt = build(pairs)
    while (over := counter(prompt) + 1 - length) > 0 and len(pairs) > 1:
        for _ in range(max(1, min(len(pairs) - 1, int(over // probe)))):   # about the excess at once
            drop = len(pairs) - 1 if at < len(pairs) - 1 else 0
            at -= drop < at
            pairs.pop(drop)
        prompt = build(pairs)
    _check_fits("kv", counter, prompt, length)
    return Sample("kv", prompt, (value,), f" {value}", length, depth, seed, {})


# ---------------------------------------------------------------------------- scoring
def first_line(prediction: str) -> str:
    """The part of a completion that is scored: up to the first newline."""
    return prediction.strip().split("\n", 1)[0]


_AROUND_A_WORD = ".,;:!?\"'()[]{}*`"


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """How right a completion is, in [0, 1]. Only its first line counts.

    Single-answer tasks: 1.0 if the first word (punctuation, quotes, brackets and markdown's
    ``*`` and backticks stripped from its ends) is the answer, else 0.0 -- "71432.", "**71432**"
    and '"71432"},' are right, "714320", "7143" or "the key is 71432" are not.
    ``niah_multivalue`` and ``vt``: the fraction of the answers found as whole words on the line
    (RULER's string_match_all), so "1, 2, 3" for answers 1, 2, 3, 4 scores 0.75.
    """
    line = first_line(prediction)
    if task in MULTI_ANSWER:
        found = [re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", line) is not None for a in answers]
        return sum(found) / len(answers)
    words = line.split()
    return float(bool(words) and words[0].strip(_AROUND_A_WORD) == answers[0])
