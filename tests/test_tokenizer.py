"""The tokenizer wrapper: streamed decode of generated tokens."""
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, normalizers

from infinitehip.tokenizer import StreamDecoder, Tokenizer


def sentencepiece_like() -> Tokenizer:
    """A Llama-2-style tokenizer.json: "▁" for spaces, byte fallback, and a decoder that strips
    the leading space of the first token it decodes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁", "."):
        vocab[piece] = len(vocab)
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>")


def streamed(tok: Tokenizer, prompt: list[int], out: list[int]) -> str:
    d = StreamDecoder(tok, prompt)
    return "".join(d.push(t) for t in out) + d.flush()


def test_first_piece_keeps_its_leading_space():
    """The first output token was decoded alone, and the decoder stripped its space: "The capital
    of France is" + "Paris." (found by streaming a SentencePiece-style tokenizer)."""
    tok = sentencepiece_like()
    prompt, full = tok.encode("The capital of France is"), tok.encode("The capital of France is Paris. 日本")
    assert full[:len(prompt)] == prompt
    assert streamed(tok, prompt, full[len(prompt):]) == " Paris. 日本"
    assert streamed(tok, [], full[len(prompt):]) == "Paris. 日本"   # no prompt: as decode()


def test_prompt_ending_inside_a_character():
    """Token-id prompts may end inside a UTF-8 character: the output is then decoded alone (as
    decode() gives it), not after the partial character, which would swallow the bytes completing it."""
    tok = sentencepiece_like()
    ids = tok.encode("日 is", add_special_tokens=False)    # "▁", three byte tokens, "▁is"
    assert streamed(tok, ids[:2], ids[2:]) == tok.decode(ids[2:]) and tok.decode(ids[2:]).endswith(" is")


def test_chat_template_file_is_utf8_whatever_the_locale(tmp_path):
    """chat_template.jinja was read in the locale's encoding: under an ASCII locale (POSIX without
    UTF-8 mode, as on some servers) a template with one non-ASCII character failed to load."""
    import os
    import subprocess
    import sys

    sentencepiece_like().tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ '¿' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                                  encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = ("from infinitehip.tokenizer import Tokenizer; "
            f"t = Tokenizer.from_dir({str(tmp_path)!r}); print(ascii(t.chat_template[:5]))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.strip() == ascii("{{ '¿")


def test_special_tokens_from_special_tokens_map(tmp_path):
    """Older checkpoints keep BOS and EOS in special_tokens_map.json only: the chat template was
    rendered without them and EOS was no stop token. transformers reads that file when
    tokenizer_config.json has no added_tokens_decoder, its tokens taking precedence; so does from_dir."""
    import json

    sentencepiece_like().tok.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<unk>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    assert tok.eos_token_ids == (2,)


def test_chat_template_with_transformers_extensions():
    """Fine-tuned checkpoints ship templates with transformers' {% generation %} blocks (which mark
    the assistant's text for training): "Encountered unknown tag 'generation'". tojson's
    separators and sort_keys were dropped."""
    tok = sentencepiece_like()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                         "{% endgeneration %}{% else %}{{ m | tojson(separators=(',', ':'), sort_keys=True) }}"
                         "{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ok"}]
    assert tok.apply_chat_template(messages) == '{"content":"é","role":"user"}ok'


def test_named_chat_templates_without_a_default_are_not_guessed(tmp_path):
    """tokenizer_config.json's list of named templates without a "default": the first was used
    (say a tool-use template for a plain chat); transformers refuses to pick, and so does this."""
    import json

    import pytest

    sentencepiece_like().tok.save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
             {"name": "rag", "template": "RAG {{ messages[0]['content'] }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    with pytest.raises(ValueError, match="chat templates named 'tool_use', 'rag' but none named 'default'"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    named.append({"name": "default", "template": "CHAT {{ messages[0]['content'] }}"})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "CHAT hi"
