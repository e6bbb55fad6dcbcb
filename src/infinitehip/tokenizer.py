"""Tokenizer of an HF model directory via the `tokenizers` library, plus its chat template.

Reads ``tokenizer.json`` (the fast tokenizer), ``tokenizer_config.json`` (special tokens, chat
template), ``special_tokens_map.json`` and ``chat_template.jinja`` when present, as transformers
reads them. No transformers at run time.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from .assets import model_file, read_optional_json


def _token_text(tok) -> str | None:
    """Special tokens are written as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, tok, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, eos_token_ids: tuple[int, ...] = (), name: str = "model",
                 template_names: tuple[str, ...] = ()):
        self.tok, self.name = tok, name
        self.template_names = template_names   # named chat templates, none of them "default"
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        ids = set(eos_token_ids)
        if eos_token is not None and tok.token_to_id(eos_token) is not None:
            ids.add(tok.token_to_id(eos_token))
        self.eos_token_ids = tuple(sorted(ids))

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = (), name: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as FastTokenizer

        path = Path(path).expanduser()
        file = model_file(path, "tokenizer.json")
        if file is None:
            raise FileNotFoundError(f"{path} has no tokenizer.json; infinitehip reads fast (tokenizers) "
                                    "tokenizers only: save one with AutoTokenizer(...).save_pretrained()")
        try:
            tok = FastTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ValueError(f"cannot read {file}: {e}") from None
        cfg = read_optional_json(path, "tokenizer_config.json")
        if "added_tokens_decoder" not in cfg:   # an older save: transformers takes its special tokens from here
            cfg.update(read_optional_json(path, "special_tokens_map.json"))
        template, names = cfg.get("chat_template"), ()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
            names = () if template else tuple(map(str, named))   # as transformers: no guess among them
        jinja_file = model_file(path, "chat_template.jinja")
        if jinja_file is not None:
            template = jinja_file.read_text(encoding="utf-8")   # not the locale's
        return cls(tok, bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   chat_template=template, eos_token_ids=eos_token_ids, name=name or path.name,
                   template_names=names)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template.

        The rendered text already holds the special tokens: encode it with add_special_tokens=False.
        """
        if not self.chat_template and self.template_names:   # it used the first, which may be a tool-use one
            raise ValueError(f"{self.name} has chat templates named {', '.join(map(repr, self.template_names))} but "
                             "none named 'default' (transformers refuses to pick one too); write the prompt "
                             "yourself instead of using chat")
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); write the prompt yourself instead of using chat")
        jinja2 = _jinja()
        try:
            return _compiled(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.name}'s chat template failed: {e}") from None


def _jinja():
    try:
        import jinja2
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None
    return jinja2


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """A chat template compiled once (rendering it again per request parsed it every time)."""
    return _environment().from_string(template)


@functools.cache
def _environment():
    """A sandbox for chat templates (they come with the checkpoint) with what transformers gives them."""
    jinja2 = _jinja()
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's text for
        training masks with it; rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):   # HTML left unescaped
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class StreamDecoder:
    """Turns token ids into text pieces as they come, never splitting a multi-byte character.

    ``context``: the prompt's ids. Its last few are decoded with the first pieces, not emitted: a
    SentencePiece decoder (Llama 2, Mistral) strips the leading space of the first token it
    decodes, so " Paris" after "The capital of France is" came out as "Paris".
    """

    CONTEXT = 4   # prompt tokens decoded ahead of the output

    def __init__(self, tokenizer: Tokenizer, context=()):
        context = list(context)[-self.CONTEXT:]
        if tokenizer.decode(context).endswith("\ufffd"):   # ends inside a character: its rest is output
            context = []
        self.tokenizer, self.ids = tokenizer, context
        self.prefix, self.read = 0, len(context)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end (a dangling partial character comes out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
