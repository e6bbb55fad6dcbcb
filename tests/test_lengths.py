"""One parser for every length a user writes (eval --lengths, the benchmarks' context lists)."""
import pytest

from infinitehip.lengths import parse_tokens


@pytest.mark.parametrize("text, trained, tokens", [
    ("4096", None, 4096), (" 8k ", None, 8192), ("128K", None, 131072), ("1.5M", None, 3 << 19),
    ("0.5k", None, 512), ("32x", 512, 16384), ("2.5X", 4097, 10242), ("1x", 1, 1),
])
def test_lengths_as_users_write_them(text, trained, tokens):
    assert parse_tokens(text, trained) == tokens


@pytest.mark.parametrize("text, trained, message", [
    ("1.1K", None, "not a whole number of tokens"),        # 1126.4: never rounded silently
    ("0", None, "at least one token"), ("0.1x", 4, "at least one token"),
    ("2x", None, "relative to the trained context, which is unknown"),
    ("abc", 512, "or a multiple of the trained context (32x)"), ("-1", None, "is not a length"),
    ("1e3", None, "is not a length"), ("nanx", 512, "is not a length"), ("", None, "is not a length"),
])
def test_bad_lengths_say_how_to_write_one(text, trained, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_tokens(text, trained)
