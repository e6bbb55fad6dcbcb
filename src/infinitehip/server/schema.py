"""The request bodies of the OpenAI-compatible API, validated as OpenAI's API validates them:
strict types, nullable optional fields, unknown fields and unimplemented options refused (a
400 saying what to send), never an answer that silently ignores what a client asked for."""
from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, field_validator,
                      model_validator)

__all__ = ["CompletionRequest", "ChatRequest", "Message", "Sampling", "UNION_TAGS"]


# OpenAI fields this server does not implement, with the values that ask for nothing (clients
# send those, and null: see _drop_nulls); any other value, and any field not known at all, is a
# 400 rather than silently ignored (a client asking n=2 would read a missing choices[1]).
# logprobs: false is chat's "none"; a completion's logprobs 0 asks for the sampled tokens' own.
_NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
            "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
            "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",)}


def _drop_nulls(data: dict, keep: tuple[str, ...]) -> dict:
    """OpenAI's optional fields are nullable, null meaning the default: a client that sends every
    field ({"temperature": null, "n": null, ...}) got a 400. ``keep``: required fields, whose
    null is an error."""
    return {k: v for k, v in data.items() if v is not None or k in keep}


def _is_neutral(value, neutral: tuple) -> bool:
    # Compared by JSON type too: in Python true == 1 and 0 == false, so n: true and echo: 0 passed.
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _unicode(text: str) -> str:
    # JSON's \ud800 escape decodes to a lone surrogate, which is no Unicode text: the tokenizer
    # raised TypeError on it (a 500), and so did writing an answer that echoed it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a lone surrogate {text[e.start]!r} at character {e.start} is not Unicode text; "
                         "send valid UTF-8 (pair the surrogate or leave it out)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _str_or_list(value) -> str:
    # A field that is a string or a list validates only as the one the value looks like: a plain
    # union reported the string member's error first ("prompt.function-after[_unicode(), str]:
    # Input should be a valid string" for [1, "a"] or a text part with an unknown field).
    return "~list" if isinstance(value, list) else "~str"


UNION_TAGS = ("~str", "~list")   # left out of an error's location (see _invalid)


class StreamOptions(BaseModel):
    # Strict like the request itself: a misspelt key or include_usage "yes" would otherwise be
    # an answer without the usage chunk the client asked for.
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False     # a last chunk with usage


class Sampling(BaseModel):
    # Strict types, as OpenAI's API: "5" or true for max_tokens, "yes" for stream were converted
    # (a client with a bug got an answer instead of the error that would show it).
    model_config = ConfigDict(extra="forbid")

    model: str
    # None: the endpoint's default (a completion 16 tokens, a chat answer up to the capacity).
    max_tokens: int | None = Field(None, ge=1, le=1 << 20, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    stop: Annotated[Annotated[str, Tag("~str")] | Annotated[list[str], Tag("~list")],
                    Discriminator(_str_or_list)] | None = Field(None, validate_default=True)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _openai_fields(cls, data):
        if not isinstance(data, dict):
            return data
        data = _drop_nulls(data, ("model", "prompt", "messages"))
        data.pop("user", None)                           # an end-user id, for the provider's logs
        if "max_completion_tokens" in data:              # chat's newer name for max_tokens
            newer = data.pop("max_completion_tokens")
            if data.setdefault("max_tokens", newer) != newer:   # one of them was silently ignored
                raise ValueError(f"max_tokens={data['max_tokens']!r} and max_completion_tokens={newer!r} disagree: "
                                 "send one of them")
        for name, neutral in _NEUTRAL.items():
            if name in data and not _is_neutral(data.pop(name), neutral):
                raise ValueError(f"{name} is not supported by this server: leave it out (or send "
                                 f"{json.dumps(neutral[0])})")
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:  # as OpenAI's API: nothing would read them
            raise ValueError("stream_options is only allowed when stream is true: leave it out or send stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampling):
    # Text, or token ids (as OpenAI's API; evaluation harnesses send them). One prompt a request.
    prompt: Annotated[Annotated[Text, Tag("~str")] | Annotated[list[Annotated[int, Field(strict=True)]], Tag("~list")],
                      Discriminator(_str_or_list)]

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = 16    # as OpenAI's completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:   # OpenAI's batch form: an answer per prompt (choices[i])
                raise ValueError(f"{len(prompt)} prompts in one request: this server answers one prompt a "
                                 "request; send them as separate requests (they are batched together)")
            return prompt[0]      # ["text"] or [[ids]]: the one prompt
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    # Strict like the request: a message's tool_calls (or any other field) were dropped unseen.
    model_config = ConfigDict(extra="forbid")

    # developer: OpenAI's newer name for the system role, rendered as system (chat templates
    # know system). content: a string, or text parts, joined by newlines (as vLLM does).
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Annotated[Text, Tag("~str")] | Annotated[list[TextPart], Tag("~list")],
                       Discriminator(_str_or_list)]
    name: Text | None = None    # a participant's name, for templates that render it

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):       # e.g. an answer sent back as history: {"tool_calls": null, ...}
        return _drop_nulls(data, ("role", "content")) if isinstance(data, dict) else data

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):   # an image or audio part named, not pydantic's dump of the union
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type", "text") != "text":   # no type: TextPart says so
                raise ValueError(f"a content part of type {part.get('type')!r} is not supported: this server "
                                 'reads text only ({"type": "text", "text": "..."})')
        return content

    def rendered(self) -> dict:
        """The message as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text, **({"name": self.name} if self.name is not None else {})}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None   # as OpenAI's chat: as many as fit (the server's capacity)
