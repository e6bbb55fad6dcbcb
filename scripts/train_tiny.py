"""Train the built-in model: a small Llama (RoPE, GQA, SwiGLU, RMSNorm) that reads and retrieves.

    python scripts/train_tiny.py --out out/tiny            # GPU, ~8 minutes on an H100
    python scripts/train_tiny.py --out /tmp/t --steps 3 --batch 4 --device cpu   # smoke test

Everything is made here, from a fixed seed: a byte-level BPE tokenizer (digits split one per
token) trained on the shipped prose and on task text; the data, a mix of plain prose (language
modelling) and the RULER-style retrieval tasks of ``infinitehip.eval.tasks`` with the needle at
a uniformly random depth inside the trained context, so the model learns to find a fact by its
content from any distance; the model, trained with AdamW in bf16 autocast. The answer tokens get
an extra loss term so the few of them per sequence weigh as much as the rest.

``--init-from DIR --seed 1`` continues training a finished model on fresh data (the built-in
model is one run from scratch plus one such continuation; see benchmarks/results/train_builtin.json).
``--minutes`` caps the wall clock: after the warm-up the script times its steps and, if ``--steps``
would not fit, lowers it (and the LR schedule with it) and prints the number to reproduce the run
with ``--steps``. Checkpoints (``ckpt.pt``) let a killed run resume with the same command.
Writes to ``--out``: the HF model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), train_log.json and train_curve.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from infinitehip.eval.tasks import TASKS, TokenCounter, haystack_sentences, make_sample, score  # noqa: E402

SPECIALS = ["<s>", "</s>", "<pad>"]
BOS, EOS, PAD = 0, 1, 2
# Share of each kind of sequence in the data.
MIX = {"prose": 0.16, "passkey": 0.16, "niah_single": 0.16, "niah_multikey": 0.18,
       "niah_multivalue": 0.12, "vt": 0.08, "kv": 0.14}
ANSWER_ROOM = 48   # tokens kept free after the prompt for the answer


# ---------------------------------------------------------------------------- tokenizer
def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE; numbers are cut in groups of three digits, each group one token.

    Few tokens per number matter for sparse attention: the first token of an answer is predicted
    from the question's whole query block, every later one from a single-token query, and a
    three-digit group (1 of 1000) finds its needle by content far better than one digit (1 of 10).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9]{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = TokenCounter(lambda s: s.split())    # a rough counter, good enough to size the samples
    task_text = [make_sample(t, words, 300, random.Random(i).random(), seed * 100_000 + i).prompt
                 for i in range(400) for t in TASKS]
    prose = [" ".join(haystack_sentences())]
    numbers = [" ".join(f"{i:0{w}d}" for w in (1, 2, 3) for i in range(10 ** w))] * 40   # every group a token
    tok.train_from_iterator(prose + task_text + numbers, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [BOS, EOS, PAD]
    return tok


# ---------------------------------------------------------------------------- data
def make_sequence(tok: Tokenizer, counter: TokenCounter, ctx: int, rng: random.Random) -> tuple[list, list]:
    """One training sequence (at most ctx tokens): ids and the mask of answer tokens."""
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    length = ctx if rng.random() < 0.5 else rng.randint(96, ctx)
    if kind == "prose":
        sents = haystack_sentences()
        i = rng.randrange(len(sents))
        text = " ".join(sents[(i + j) % len(sents)] for j in range(length // 8))
        ids = tok.encode(text).ids[:length]
        return ids, [0] * len(ids)
    s = make_sample(kind, counter, length - ANSWER_ROOM, rng.random(), rng.randrange(1 << 30))
    prompt = tok.encode(s.prompt).ids
    answer = tok.encode(s.target, add_special_tokens=False).ids + [EOS]
    ids = (prompt + answer)[:ctx]
    return ids, ([0] * len(prompt) + [1] * len(answer))[:ctx]


class TaskStream(IterableDataset):
    """Endless batches; worker w of W makes batches w, w+W, ... from seeds fixed by (seed, batch)."""

    def __init__(self, tok_json: str, ctx: int, batch: int, seed: int, start_batch: int):
        self.tok_json, self.ctx, self.batch, self.seed, self.start = tok_json, ctx, batch, seed, start_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        tok = Tokenizer.from_str(self.tok_json)
        counter = TokenCounter(lambda s: tok.encode(s, add_special_tokens=False).ids)
        b = self.start + w
        while True:
            rng = random.Random(f"{self.seed}/{b}")
            ids = torch.full((self.batch, self.ctx), PAD, dtype=torch.long)
            ans = torch.zeros((self.batch, self.ctx), dtype=torch.bool)
            for r in range(self.batch):
                seq, mask = make_sequence(tok, counter, self.ctx, rng)
                ids[r, :len(seq)] = torch.tensor(seq)
                ans[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
            yield ids, ans
            b += n_workers


# ---------------------------------------------------------------------------- model
def model_config(vocab_size: int, ctx: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_act="silu",
                       max_position_embeddings=ctx, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       attention_bias=False, mlp_bias=False)


def loss_fn(logits, ids, ans, answer_weight: float):
    """Mean next-token loss over real tokens + answer_weight x mean loss over answer tokens."""
    logits, target = logits[:, :-1].float(), ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").view_as(target)
    real = (target != PAD).float()
    is_ans = ans[:, 1:].float()
    lm = (nll * real).sum() / real.sum()
    qa = (nll * is_ans).sum() / is_ans.sum().clamp(min=1)
    return lm + answer_weight * qa, lm.detach(), qa.detach()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------------------- eval + export
@torch.no_grad()
def greedy(model, ids: list[int], max_new: int, device) -> list[int]:
    x = torch.tensor([ids], device=device)
    out, past = [], None
    for _ in range(max_new):
        o = model(input_ids=x, past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return out


def quick_eval(model, tok, ctx: int, device, n: int) -> dict:
    """Dense accuracy of each task inside the trained context (held-out seeds)."""
    model.eval()
    counter = TokenCounter(lambda s: tok.encode(s, add_special_tokens=False).ids)
    res = {}
    for task in TASKS:
        tot = 0.0
        for i in range(n):
            s = make_sample(task, counter, ctx - ANSWER_ROOM, (i + 0.5) / n, 10 ** 9 + i)
            pred = tok.decode(greedy(model, tok.encode(s.prompt).ids, 40, device))
            tot += score(task, pred, s.answers)
        res[task] = tot / n
    model.train()
    return res


def export(model, tok: Tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.float()
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)   # older readers look here
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model.config.max_position_embeddings, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False,
        "max_new_tokens": 32}, indent=2) + "\n")


def plot_curve(log: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["lm_loss"] for r in log], label="language-model loss (all tokens)")
    ax.plot(steps, [r["answer_loss"] for r in log], label="answer loss (retrieval targets)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--ctx", type=int, default=512, help="trained context C (max_position_embeddings)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock cap; lowers --steps to fit")
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--answer-weight", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this trained model directory (use another --seed for fresh data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from transformers import LlamaForCausalLM

    t_start = time.time()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = a.out / "ckpt.pt"
    if a.init_from:   # continue training a finished model (its tokenizer and weights; fresh optimizer)
        tok = Tokenizer.from_file(str(a.init_from / "tokenizer.json"))
        model = LlamaForCausalLM.from_pretrained(a.init_from, dtype=torch.float32).to(a.device)
    else:
        tok = build_tokenizer(a.vocab, a.seed)
        model = LlamaForCausalLM(model_config(tok.get_vocab_size(), a.ctx)).to(a.device)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({time.time() - t_start:.1f}s)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=a.device == "cuda")
    step, log, total = 0, [], a.steps
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=a.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, log, total = ck["step"], ck["log"], ck["total"]
        print(f"resumed from step {step} of {total}", flush=True)
    if a.workers and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").total < (1 << 30):
        torch.multiprocessing.set_sharing_strategy("file_system")   # small /dev/shm (containers)
    stream = TaskStream(tok.to_str(), a.ctx, a.batch, a.seed, start_batch=step)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=a.workers, pin_memory=a.device == "cuda",
                             prefetch_factor=8 if a.workers else None, persistent_workers=a.workers > 0))
    amp = torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.device == "cuda")
    model.train()
    t_timed, timed_from = None, a.warmup // 2
    while step < total:
        ids, ans = next(loader)
        ids, ans = ids.to(a.device, non_blocking=True), ans.to(a.device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, a.lr, a.warmup)
        with amp:
            logits = model(input_ids=ids).logits
        loss, lm, qa = loss_fn(logits, ids, ans, a.answer_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == timed_from:
            t_timed = time.time()
        if step == timed_from + 100 and a.minutes:
            per_step = (time.time() - t_timed) / 100
            fit = int((a.minutes * 60 - (time.time() - t_start) - 45) / per_step) + step
            if fit < total:
                total = fit
                print(f"{per_step * 1e3:.1f} ms/step: {total} steps fit in {a.minutes} min "
                      f"(reproduce with --steps {total})", flush=True)
        if step % 50 == 0 or step == total:
            rec = {"step": step, "lm_loss": float(lm), "answer_loss": float(qa),
                   "lr": lr_at(step, total, a.lr, a.warmup), "seconds": round(time.time() - t_start, 1)}
            log.append(rec)
            if step % 500 == 0 or step == total:
                print(json.dumps(rec), flush=True)
        if step % a.ckpt_every == 0 and step < total:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                        "total": total}, ckpt_path)
    train_s = time.time() - t_start
    acc = quick_eval(model, tok, a.ctx, a.device, a.eval_samples) if a.eval_samples else {}
    print("dense accuracy inside C:", json.dumps(acc), flush=True)
    export(model, tok, a.out / "builtin")
    summary = {"command": "python scripts/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "reproduce_with_steps": total, "seed": a.seed, "ctx": a.ctx, "batch": a.batch, "lr": a.lr,
               "parameters": n_params, "train_seconds": round(train_s, 1),
               "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "final": log[-1] if log else None,
               "dense_accuracy_inside_context": acc, "log": log}
    (a.out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_curve(log, a.out / "train_curve.png",
               f"built-in model: {n_params / 1e6:.1f}M params, C={a.ctx}, {total} steps x {a.batch} seqs, "
               f"{train_s / 60:.1f} min on {summary['device']}")
    ckpt_path.unlink(missing_ok=True)   # finished: a rerun starts afresh
    print(f"done in {time.time() - t_start:.0f}s -> {a.out}", flush=True)


if __name__ == "__main__":
    main()
