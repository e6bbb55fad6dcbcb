"""HF model directory -> ``Model``: config.json, safetensors weights, tokenizer, generation config.

Weights are read straight from safetensors (single file or sharded with an index) through one
declarative name map; transformers is not needed at run time.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..attention import RoPE
from ..assets import model_file, read_json, read_optional_json, resolve_model_path
from ..config import HiPConfig, parse_overrides
from ..tokenizer import Tokenizer
from .llama import ModelArgs, Transformer

# HF tensor name -> (our parameter, which of the fused parts it is or None).
# {i} is the layer index. q/k/v go into one fused wqkv, gate/up into one w13.
NAME_MAP: dict[str, tuple[str, int | None]] = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", None),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.{p}": ("layers.{i}.attention.wqkv.{p}", 0),
    "model.layers.{i}.self_attn.k_proj.{p}": ("layers.{i}.attention.wqkv.{p}", 1),
    "model.layers.{i}.self_attn.v_proj.{p}": ("layers.{i}.attention.wqkv.{p}", 2),
    "model.layers.{i}.self_attn.o_proj.{p}": ("layers.{i}.attention.wo.{p}", None),
    "model.layers.{i}.self_attn.q_norm.weight": ("layers.{i}.attention.q_norm.weight", None),
    "model.layers.{i}.self_attn.k_norm.weight": ("layers.{i}.attention.k_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.{p}": ("layers.{i}.feed_forward.w13.{p}", 0),
    "model.layers.{i}.mlp.up_proj.{p}": ("layers.{i}.feed_forward.w13.{p}", 1),
    "model.layers.{i}.mlp.down_proj.{p}": ("layers.{i}.feed_forward.w2.{p}", None),
}
# Tensors some checkpoints carry that the model recomputes.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _pattern(hf_name: str) -> re.Pattern:
    """A NAME_MAP key as a regex: {i} matches a layer index, {p} weight or bias."""
    escaped = re.escape(hf_name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{escaped}$")


_PATTERNS = [(_pattern(hf), ours) for hf, ours in NAME_MAP.items()]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Model:
    """A loaded model: the network, its tokenizer, and what generation needs to know."""

    net: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    hip: HiPConfig
    path: Path
    generation_config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return model_name(self.path)

    @property
    def device(self) -> torch.device:
        return self.net.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.tok_embeddings.weight.dtype


def model_name(path: Path) -> str:
    """A model directory's name; for a Hugging Face cache snapshot (``models--org--name/snapshots/<commit>``),
    the hub's ``org/name``, not the commit."""
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")
    return path.name


def read_config(path: str | Path) -> tuple[Path, dict]:
    """The model directory, made absolute (``"."`` has no name), and its config.json."""
    given = resolve_model_path(str(path))
    path = Path(os.path.abspath(Path(given).expanduser()))
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file, not a model directory; give the directory that holds it "
                                 f"({path.parent}) if config.json, the *.safetensors weights and tokenizer.json "
                                 "are there too")
    if not path.exists():
        hint = (f"; if {given} is a Hugging Face hub id, download it first (hf download {given} --local-dir DIR) "
                "and give DIR: infinitehip loads local directories") if re.fullmatch(r"[\w.-]+/[\w.-]+", given) else ""
        raise FileNotFoundError(f"model directory {path} does not exist{hint}")
    config = model_file(path, "config.json")
    if config is None:
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory "
                                f"(config.json, *.safetensors, tokenizer.json){_cache_folder_hint(path)}")
    return path, read_json(config)


def _cache_folder_hint(path: Path) -> str:
    """For a Hugging Face cache folder (``models--org--name``) given instead of one of its snapshots."""
    snapshots = sorted(p for p in (path / "snapshots").glob("*") if (p / "config.json").exists())
    main = path / "refs" / "main"
    if main.is_file():   # the commit of the hub's main branch when it was downloaded: last
        snapshots.sort(key=lambda p: p.name == main.read_text().strip())
    return f"; it is a Hugging Face cache folder: give a snapshot of it, e.g. {snapshots[-1]}" if snapshots else ""


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = model_file(path, "model.safetensors.index.json")
    if index is not None:
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict):
            raise ValueError(f"{index} is not a safetensors index (no valid 'weight_map'); re-download it")
        files = {f: model_file(path, f) for f in set(wmap.values())}
        for f, file in files.items():
            if file is None:
                raise FileNotFoundError(f"{index.name} lists {f} but it is missing from {path}; re-download it")
        return {name: files[f] for name, f in wmap.items()}
    single = model_file(path, "model.safetensors")
    if single is None:
        extra = " (only PyTorch .bin weights found: convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{extra}")
    return {name: single for name in _header_names(single)}


def _open(file: Path):
    """A safetensors file opened on the CPU (its header read), or a one-line error naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        error = e
    try:   # safetensors says "No such file or directory" for a file it may not open
        file.open("rb").close()
    except PermissionError:
        raise PermissionError(f"cannot read {file}: permission denied; make it readable by this user "
                              "(chmod a+r, or run as its owner)") from None
    except OSError as e:
        raise OSError(f"cannot read {file}: {e.strerror or e}") from None
    raise ValueError(f"cannot read {file}: {error}; the file may be truncated or corrupt, re-download it")


def _header_names(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


def resolve_device_dtype(device, dtype, cfg: dict, files: dict[str, Path] | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to load in: as given, else CUDA when available and on it the
    checkpoint's dtype (config.json's, or without one there the weights' own, as transformers 5
    takes it: ``files`` from ``weight_files``), float32 on the CPU."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use device='cpu'")
    if dtype is None and device.type == "cuda":
        # transformers 5 writes "dtype" and prefers it to the older "torch_dtype" when a config has both
        saved = cfg.get("dtype") or cfg.get("torch_dtype")
        dtype = _DTYPES.get(str(saved), torch.bfloat16) if saved or not files else _weights_dtype(files)
    elif dtype is None:
        dtype = torch.float32   # CPU: fp32 is accurate and fast
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of float32, float16, bfloat16")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use dtype='float16'")
    return device, dtype


def _weights_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype the weights are stored in (the embedding's, from its file's header); bfloat16
    for anything else (quantized checkpoints are refused by ``ModelArgs.from_hf``)."""
    name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in files else next(iter(files))
    with _open(files[name]) as f:
        stored = f.get_slice(name).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(stored, torch.bfloat16)


def recommended_config(cfg: dict) -> HiPConfig:
    """The HiPConfig a checkpoint's config.json recommends: ``"infinitehip": {"preset": ...,
    <field>: <value>}``, else the paper preset."""
    recommended = cfg.get("infinitehip", {})
    try:
        if not isinstance(recommended, dict):
            raise ValueError(f"it must be an object like {{\"preset\": \"paper\"}}, got {recommended!r}")
        recommended = dict(recommended)
        return HiPConfig.preset(recommended.pop("preset", "paper"), **recommended)
    except (TypeError, ValueError) as e:   # "unknown preset" or an __init__ keyword: as if the user had given it
        raise ValueError(f"config.json's \"infinitehip\" recommendation is invalid: {e}; fix it there, or give "
                         "a config (--preset)") from None


def config_with_overrides(path: str | Path, preset: str | None, overrides: Sequence[str]) -> str | HiPConfig | None:
    """What ``load``'s ``config`` gets from the CLI's --preset and --hip FIELD=VALUE items: the
    preset (or the checkpoint's recommendation) with the overrides, validated; the preset itself
    when there are none."""
    if not overrides:
        return preset
    base = HiPConfig.preset(preset) if preset else recommended_config(read_config(path)[1])
    return base.replace(**parse_overrides(overrides))


def load(path: str | Path, *, device=None, dtype=None, config: str | HiPConfig | None = None) -> Model:
    """Load an HF checkpoint directory (Llama / Mistral / Qwen2 / Qwen3) for InfiniteHiP inference.

    Args:
        path: directory with config.json, model.safetensors (or a sharded index), tokenizer.json;
            ``"builtin"`` is the model shipped with the package.
        device: default "cuda" when available, else "cpu".
        dtype: torch dtype or its name; default the checkpoint's dtype on GPU, float32 on CPU.
        config: a HiPConfig or a preset name; default what the checkpoint recommends under
            ``"infinitehip": {"preset": ..., <field>: <value>}`` in config.json, else "paper".
            ``model_context_length`` (None) is filled from the checkpoint's trained context
            (original_max_position_embeddings when rope-scaled).
    """
    path, cfg = read_config(path)
    args = ModelArgs.from_hf(cfg)
    files = weight_files(path)
    device, dtype = resolve_device_dtype(device, dtype, cfg, files)
    if config is None:
        config = recommended_config(cfg)
    hip = HiPConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(hip, HiPConfig):
        raise TypeError(f"config must be a preset name or a HiPConfig, got {type(config).__name__}")
    if hip.model_context_length is None and args.trained_context:
        hip = hip.replace(model_context_length=args.trained_context)
    base = RoPE.from_hf(cfg, args.head_dim)
    rope = RoPE(base.inv_freq.to(device), base.attention_scaling)
    if args.tie_embeddings and _own_lm_head(files):   # as transformers: the checkpoint's own head wins
        warnings.warn(f"{path}: config.json sets tie_word_embeddings but lm_head.weight differs from the embedding; "
                      "loaded untied (set tie_word_embeddings to false in config.json to silence this)", stacklevel=2)
        args = replace(args, tie_embeddings=False)
    with torch.device("meta"):
        net = Transformer(args, rope, hip)
    net = net.to(dtype).to_empty(device=device)
    if args.tie_embeddings:
        net.output.weight = net.tok_embeddings.weight
    _load_weights(net, files, args)
    net.eval().requires_grad_(False)
    gen = read_optional_json(path, "generation_config.json")
    eos = [x for x in (gen.get("eos_token_id"), cfg.get("eos_token_id")) if x is not None]   # an id or a list
    eos_ids = tuple(i for x in eos for i in (x if isinstance(x, list) else [x]))
    tokenizer = Tokenizer.from_dir(path, eos_token_ids=eos_ids, name=model_name(path))
    if tokenizer.vocab_size > args.vocab_size:   # its ids past the embedding table would fail in the first forward
        raise ValueError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                         f"{args.vocab_size}: the tokenizer belongs to another model")
    return Model(net, tokenizer, args, hip, path, gen)


def _own_lm_head(files: dict[str, Path]) -> bool:
    """Whether the checkpoint holds an lm_head.weight that is not a copy of the embedding."""
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not all(n in files for n in names):
        return False
    try:
        head, emb = (_read_tensor(files[n], n) for n in names)
    except Exception:   # _load_weights reports what is unreadable, in one line
        return False
    return head.shape != emb.shape or not torch.equal(head, emb)


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    with _open(file) as f:
        return f.get_tensor(name)


def _load_weights(net: Transformer, files: dict[str, Path], args: ModelArgs):
    params = dict(net.named_parameters(remove_duplicate=False))
    D, H, K, Ff = args.head_dim, args.n_heads, args.n_kv_heads, args.intermediate_size
    parts = {"wqkv": [0, H * D, (H + K) * D, (H + 2 * K) * D], "w13": [0, Ff, 2 * Ff]}
    filled: set[tuple[str, int | None]] = set()
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            available = set(f.keys())
            for hf_name in names:
                target = _map_name(hf_name)
                if target is None:
                    if not IGNORED.match(hf_name):
                        unexpected.append(hf_name)
                    continue
                ours, part = target
                if ours not in params:
                    unexpected.append(hf_name)
                    continue
                if hf_name not in available:
                    raise ValueError(f"the index maps {hf_name} to {file.name}, which does not contain it")
                try:
                    tensor = f.get_tensor(hf_name)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {hf_name} from {file}: {e}; the file may be corrupt") from None
                dest = params[ours]
                if part is not None:
                    bounds = parts[ours.split(".")[-2]]
                    dest = dest[bounds[part]:bounds[part + 1]]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(f"tensor {hf_name} has shape {tuple(tensor.shape)} but config.json implies "
                                     f"{tuple(dest.shape)}; the weights do not match config.json")
                with torch.no_grad():
                    dest.copy_(tensor)
                filled.add((ours, part))
    if unexpected:
        raise ValueError(f"{len(unexpected)} tensors in the checkpoint do not belong to a {args.architecture} "
                         f"with this config: {', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = []
    for ours, p in params.items():
        fused = ours.split(".")[-2] if ours.split(".")[-2] in parts else None
        for part in range(len(parts[fused]) - 1) if fused else [None]:
            if (ours, part) not in filled and not (ours == "output.weight" and args.tie_embeddings):
                missing.append(ours if part is None else f"{ours}[part {part}]")
    if missing:
        hint = " (lm_head.weight is missing: set tie_word_embeddings in config.json if the model ties it)" \
            if "output.weight" in missing else ""
        raise ValueError(f"{len(missing)} tensors are missing from the checkpoint: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{hint}")


def _map_name(hf_name: str) -> tuple[str, int | None] | None:
    for pattern, (ours, part) in _PATTERNS:
        m = pattern.match(hf_name)
        if m:
            return ours.format(**m.groupdict()), part
    return None


def inspect_checkpoint(path: str | Path, *, device=None, dtype=None) -> dict:
    """What ``infinitehip info`` shows, read from config.json and safetensors headers only."""
    from ..cache.kv import BLOCK_SIZE, free_memory, kv_bytes

    path, cfg = read_config(path)
    args = ModelArgs.from_hf(cfg)
    files = weight_files(path)
    device, dtype = resolve_device_dtype(device, dtype, cfg, files)
    n_params = 0
    for file in set(files.values()):
        with _open(file) as f:
            n_params += sum(int(torch.Size(f.get_slice(name).get_shape()).numel()) for name in f.keys())
    elem = torch.finfo(dtype).bits // 8
    per_token = kv_bytes(args.n_layers, args.n_kv_heads, args.head_dim, dtype)
    free = free_memory(device)
    workspace = 4096 * (4 * args.dim + 3 * args.intermediate_size) * 4 + (256 << 20)
    return {"architecture": args.architecture, "parameters": n_params, "layers": args.n_layers,
            "heads": f"{args.n_heads} query / {args.n_kv_heads} kv x {args.head_dim}",
            "trained_context": args.trained_context, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "weights_bytes": n_params * elem, "kv_bytes_per_token": per_token, "free_bytes": free,
            # whole blocks: the cache allocates (and plan_kv_cache checks) capacity rounded up to them
            "max_context": max(0, (free - n_params * elem - workspace) // per_token) // BLOCK_SIZE * BLOCK_SIZE,
            **_offload_capacity(args, dtype, device, n_params * elem)}


def _offload_capacity(args: ModelArgs, dtype, device, weights: int) -> dict:
    """Longest context per sequence with the KV cache offloaded to host memory (90% of what is
    available: the OS and the process need the rest), plain and FP8."""
    from ..cache.kv import free_memory
    from ..cache.offload_plan import OffloadConfig, host_bytes_per_token as per_token

    host = free_memory(torch.device("cpu"))
    offload_useful = torch.device(device).type == "cuda"
    # On the CPU the weights take host memory too; generate plans the store from what is free
    # after loading them, so the figure must not count their bytes twice.
    store = host if offload_useful else max(0, host - weights)
    shape = (args.n_layers, args.n_kv_heads, args.head_dim, dtype)

    def longest(config: OffloadConfig) -> int:   # whole capacity units: the plan rounds a capacity up to them
        return int(0.9 * store // per_token(*shape, config)) // config.capacity_unit * config.capacity_unit
    return {"host_free_bytes": host, "offload_useful": offload_useful,
            "max_context_offload": longest(OffloadConfig()), "max_context_offload_fp8": longest(OffloadConfig(fp8=True))}
