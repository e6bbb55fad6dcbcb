"""Token counts as users write them, for every command that takes one: ``131072``, ``128K``,
``1.5m`` (K = 1024, M = 1024 * 1024, either case) or, where a trained context is known, ``32x``
(times it). Exact arithmetic: 1.5M is a whole number of tokens, 1.1K is not."""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["LENGTHS_HELP", "parse_tokens"]

LENGTHS_HELP = "token counts: 131072, 128K or 1m (K = 1024, M = 1024 * 1024)"
_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kmx]?)", re.IGNORECASE)
_SCALE = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_tokens(text: str, trained: int | None = None) -> int:
    """One length -> a positive number of tokens. ``32x`` needs ``trained`` (the model's trained
    context) and rounds down; the others must be whole. A ValueError says how to write one."""
    m = _LENGTH.fullmatch(text.strip())
    if m is None:
        relative = " or a multiple of the trained context (32x)" if trained else ""
        raise ValueError(f"length {text!r} is not a length: write {LENGTHS_HELP}{relative}")
    number, unit = Fraction(m.group(1)), m.group(2).lower()
    if unit == "x":
        if not trained:
            raise ValueError(f"length {text!r} is relative to the trained context, which is unknown here")
        n = Fraction(int(number * trained))
    else:
        n = number * _SCALE[unit]
    if n.denominator != 1:
        raise ValueError(f"length {text!r} is not a whole number of tokens")
    if n < 1:
        raise ValueError(f"length {text!r} must be at least one token")
    return int(n)
