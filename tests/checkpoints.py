"""Tiny random HF checkpoints (made with transformers) and a tiny tokenizer, for the engine tests.

Imported by the engine, loader, server and drop-in tests; holds no tests itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = ["the quick brown fox jumps over the lazy dog", "a needle in a haystack of a million tokens",
          "hello world, sparse attention reads only the blocks that matter", "0123456789 + - * / = ?",
          "émigré café naïve — ünïcödé"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB = 320

ARCHS = {
    "llama": dict(cls="LlamaForCausalLM"),
    "llama3-rope": dict(cls="LlamaForCausalLM", rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128, "rope_theta": 50000.0}, max_position_embeddings=512),
    "llama-tied": dict(cls="LlamaForCausalLM", tie_word_embeddings=True),
    "mistral": dict(cls="MistralForCausalLM", sliding_window=None),
    "qwen2": dict(cls="Qwen2ForCausalLM"),
    "qwen3": dict(cls="Qwen3ForCausalLM", head_dim=32),
    "qwen3-tied": dict(cls="Qwen3ForCausalLM", tie_word_embeddings=True),
}


def make_tokenizer(path: Path):
    """A byte-level BPE with <s>, </s> and chat role tokens; BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}))
    return tok


def make_checkpoint(root: Path, arch: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """Save a random 2-layer model of ``arch`` (a key of ARCHS) plus tokenizer into ``root/arch``."""
    import transformers

    spec = dict(ARCHS[arch])
    cls = getattr(transformers, spec.pop("cls"))
    config_cls = getattr(transformers, cls.__name__.replace("ForCausalLM", "Config"))
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=0,
              eos_token_id=1, tie_word_embeddings=False)
    kw.update(spec)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**kw)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a swapped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = root / arch
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def hf_model(path: Path, attn: str = "eager"):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn,
                                                             dtype=torch.float32).eval()
