"""The `infinitehip` command line. Each command is a thin shell over the public API."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Million-token LLM inference on one GPU with InfiniteHiP sparse attention.")
console = Console()


def _print_version(value: bool):
    if value:
        from . import __version__
        console.print(f"infinitehip {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")):
    pass


OFFLOAD_FP8_HELP = "Offload, storing K/V as FP8 in host memory (half the bytes; not bit-identical)."
HIP_HELP = ("Override a HiPConfig field of the preset, FIELD=VALUE (repeatable), e.g. --hip refresh_lag=8; "
            "with the paper preset also --hip stage0_levels=3 --hip budget=4096 (the built-in model's allows less).")


@app.command()
def demo(context: int = typer.Option(None, help="Prompt tokens (default: 16,384 = 32x the trained context "
                                     "on CPU, 65,536 = 128x on GPU)."),
         depth: float = typer.Option(0.35, help="Where the pass key sits, 0 = start, 1 = end."),
         seed: int = typer.Option(0, help="Seed of the haystack and the pass key."),
         device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """The built-in model finds a pass key hidden far beyond its trained context."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .demo import LABELS, METHODS, default_context, run_demo

    if not 0.0 <= depth <= 1.0:
        raise typer.BadParameter(f"--depth {depth}: the needle's depth is a fraction of the context, in [0, 1]")
    if context is not None and context < 256:
        raise typer.BadParameter(f"--context {context}: give at least 256 tokens (the haystack holds the needle)")
    n = context or default_context()
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            job = bar.add_task(f"loading the built-in model, hiding a pass key in {n:,} tokens", total=len(METHODS))
            r = run_demo(n, depth, seed, device=device,
                         on_method=lambda m: bar.update(job, advance=0 if m == METHODS[0] else 1,
                                                        description=f"{LABELS[m]} reads {n:,} tokens"))
    except (OSError, ValueError) as e:
        _fail(e, debug)
    times = r.context / r.trained_context
    times = f"{times:.0f}x" if times >= 1 else f"{times:.2g}x"   # a 256-token prompt was "0x" the trained context
    console.print(f"[bold]{r.context:,}[/]-token prompt = [bold]{times}[/] the model's "
                  f"trained context ({r.trained_context} tokens); pass key hidden at {r.needle_at:.0%} depth, "
                  f"on {r.device}.")
    console.print(f"question: [italic]{r.question}[/]   expected: [bold]{r.expected}[/]")
    table = Table()
    for col in ("attention", "answer", "correct", "seconds"):
        table.add_column(col)
    for m in METHODS:
        ok = "[green]yes[/]" if r.correct[m] else "[red]no[/]"
        table.add_row(LABELS[m], r.answers[m][:40] or "(nothing)", ok, f"{r.seconds[m]:.1f}")
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument("builtin", help="Model directory, or 'builtin' (with --endpoint: the served "
                                "model's directory: its tokenizer counts the lengths, requests name its directory)."),
    tasks: str = typer.Option("passkey,niah_single,niah_multikey", help="Comma-separated: passkey, niah_single, "
                              "niah_multikey, niah_multivalue, vt, kv."),
    lengths: str = typer.Option("1x,4x,16x", help="Comma-separated prompt lengths: tokens (8192, 8k) or "
                                "multiples of the trained context (32x)."),
    methods: str = typer.Option(None, help="Comma-separated attention backends (default: hip,dense,streaming; "
                                "not with --endpoint, where the server's --backend answers)."),
    samples: int = typer.Option(4, help="Prompts per (task, length, depth, method)."),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Needle depths, 0 = start of the context."),
    endpoint: str = typer.Option(None, help="OpenAI-compatible server URL; evaluates it instead of a local model."),
    out: str = typer.Option("eval_results", help="Folder for eval.json and the PNG plots."),
    preset: str = typer.Option(None, help="HiPConfig preset (default: the checkpoint's, else paper)."),
    hip: list[str] = typer.Option([], "--hip", help=HIP_HELP),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    dtype: str = typer.Option(None, help="float32 | float16 | bfloat16."),
    seed: int = typer.Option(0, help="Seed of the prompts."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Prefill chunk size in tokens."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """RULER-style long-context eval: accuracy per task, length, needle depth and method."""
    from .eval.command import eval_command

    try:
        eval_command(model, tasks=_items(tasks), lengths=_items(lengths),
                     methods=None if methods is None else _items(methods), samples=samples,
                     depths=_depths(_items(depths)), endpoint=endpoint, out=Path(out),
                     preset=preset, device=device, dtype=dtype,
                     seed=seed, chunk_size=chunk_size, console=console, hip=hip)
    except (OSError, ValueError, TypeError, ImportError) as e:
        _fail(e, debug)


def _items(text: str) -> list[str]:
    """A comma-separated option's items, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _depths(texts: list[str]) -> list[float]:
    try:
        return [float(d) for d in texts]
    except ValueError:
        raise ValueError(f"--depths {','.join(texts)}: write numbers in [0, 1], e.g. 0.1,0.5,0.9") from None


# click's own --help would answer `bench attention --help` with this command's help: it is off, so
# the flag reaches the benchmark's argparse; `bench --help` alone still prints this command's help.
@app.command(add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """Benchmarks (GPU): attention, engine, offload; e.g. `infinitehip bench attention --help`."""
    from .bench import main as bench_main

    if list(ctx.args[:1]) in (["--help"], ["-h"]):
        typer.echo(ctx.get_help())
        raise typer.Exit()
    bench_main(list(ctx.args))


def _hip_config(model_dir: str, preset: str | None, hip: list[str]):
    from .models.loader import config_with_overrides

    return config_with_overrides(model_dir, preset, hip)


def _fail(e: Exception, debug: bool):
    """Known errors end in one line and exit code 1; --debug shows the traceback."""
    if debug:
        raise e
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command("generate")
def generate_cmd(
    model_dir: str = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: str = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from this file (- reads "
                                     "standard input)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    system: str = typer.Option(None, help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    backend: str = typer.Option("hip", help="Attention: hip | dense | streaming."),
    preset: str = typer.Option(None, help="HiPConfig preset: paper | fast | accurate | tiny "
                                               "(default: the checkpoint's, else paper)."),
    hip: list[str] = typer.Option([], "--hip", help=HIP_HELP),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(None),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Prefill chunk size in tokens."),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    dtype: str = typer.Option(None, help="float32 | float16 | bfloat16."),
    cuda_graph: bool = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                    help="Replay the decode step from CUDA graphs (default: on a GPU)."),
    offload: bool = typer.Option(None, "--offload/--no-offload", help="KV cache in host memory behind a GPU "
                                 "page cache (default: only when it does not fit on the GPU)."),
    offload_fp8: bool = typer.Option(False, "--offload-fp8", help=OFFLOAD_FP8_HELP),
    offload_gpu_layers: int = typer.Option(None, "--offload-gpu-layers", help="Offload, keeping the whole KV of this "
                                           "many layers in GPU memory (default: automatic, only when host memory is "
                                           "short; 0: every layer in host memory; CUDA only)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Generate text from a prompt, streaming it to stdout."""
    from . import generate, load

    try:
        if (prompt is None) == (prompt_file is None):
            raise ValueError("give exactly one of --prompt and --prompt-file")
        if prompt_file is not None:
            prompt = _read_prompt(prompt_file)
        model = load(model_dir, device=device, dtype=dtype, config=_hip_config(model_dir, preset, hip))
        for piece in generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop=stop, chat=chat, system=system, backend=backend,
                              chunk_size=chunk_size, progress=True, stream=True,
                              cuda_graph=model.device.type == "cuda" if cuda_graph is None else cuda_graph,
                              offload=_offload_arg(offload, offload_fp8, offload_gpu_layers, model.device)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (OSError, ValueError, TypeError, ImportError) as e:
        _fail(e, debug)


def _read_prompt(path: str) -> str:
    """The prompt file's text; ``-`` reads standard input (it was "No such file or directory: '-'")."""
    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:   # it said only "'utf-8' codec can't decode byte 0xff in position 0"
        raise ValueError(f"--prompt-file {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {path}") from None
    except OSError as e:   # "[Errno 21] Is a directory: 'docs'": no word of the option
        raise ValueError(f"--prompt-file {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():   # the model continued from nothing but its start token, silently
        raise ValueError(f"--prompt-file {path} has no text: give a file with the prompt (to generate from nothing, "
                         "--prompt '')")
    return text


@app.command()
def info(model_dir: str = typer.Argument(..., help="Hugging Face model directory."),
         device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
         dtype: str = typer.Option(None, help="float32 | float16 | bfloat16."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Architecture, size, trained context, KV bytes per token, and the longest context that fits."""
    from .models.loader import inspect_checkpoint

    try:
        r = inspect_checkpoint(model_dir, device=device, dtype=dtype)
        offload = [_offload_row(model_dir, r, fp8) for fp8 in (False, True)]   # on a GPU: config.json's preset
    except (OSError, ValueError, TypeError) as e:
        _fail(e, debug)
    gib = 1 << 30
    table = Table(title=model_dir, show_header=False)
    for key, value in [("architecture", r["architecture"]), ("parameters", f"{r['parameters']:,}"),
                       ("layers", r["layers"]), ("heads", r["heads"]),
                       ("trained context", f"{r['trained_context']:,} tokens" if r["trained_context"] else
                        "unknown (config.json has no max_position_embeddings): adaptive RoPE applies from the start"),
                       ("device / dtype", f"{r['device']} / {r['dtype']}"),
                       ("weights", f"{r['weights_bytes'] / gib:.2f} GiB"),
                       ("KV cache per token", f"{r['kv_bytes_per_token']:,} bytes"),
                       ("free memory", f"{r['free_bytes'] / gib:.2f} GiB"),
                       ("longest context that fits", f"{r['max_context']:,} tokens (no offload)"),
                       ("free host memory", f"{r['host_free_bytes'] / gib:.2f} GiB"),
                       ("longest context, KV offload", offload[0]),
                       ("longest context, KV offload + FP8", offload[1])]:
        table.add_row(key, str(value))
    console.print(table)


def _offload_arg(offload: bool | None, fp8: bool, gpu_layers: int | None, device):
    """``generate``'s offload argument: either option asks for offload with that config."""
    from .cache.offload_plan import OffloadConfig

    if not fp8 and gpu_layers is None:
        return offload
    if offload is False:
        raise ValueError("--no-offload contradicts --offload-fp8 / --offload-gpu-layers (they configure offload)")
    config = OffloadConfig(fp8=fp8, gpu_layers=gpu_layers)   # its own check first: -1 is no count of layers
    # Without a GPU the "GPU-stored" layers would sit in host memory like the rest (the plan counts
    # them there): the flag would promise GPU memory that is not there. 0 (every layer in host
    # memory) is true anywhere.
    if gpu_layers and device.type != "cuda":
        raise ValueError(f"--offload-gpu-layers {gpu_layers} keeps layers in GPU memory, but the model runs on "
                         f"{device}, which has none: leave the flag out (or give 0), or run on a CUDA device")
    return config


def _offload_row(model_dir: str, r: dict, fp8: bool) -> str:
    """The longest offloaded context: host memory + whole layers in the GPU memory the weights leave."""
    from .cache.kv import CapacityError

    key = "max_context_offload_fp8" if fp8 else "max_context_offload"
    if not r["offload_useful"]:
        return f"{r[key]:,} tokens (the device is the host here: offload adds nothing)"
    try:
        n, plan, layered = _offload_capacity(model_dir, r, fp8)
    except CapacityError as e:
        return f"none: {e}"
    gib = 1 << 30
    where = f"{len(plan.gpu_layers)} of {r['layers']} layers whole on the GPU" if plan.gpu_layers else \
        "every layer in host memory"
    # Past what layer-by-layer prefill holds, a prompt goes chunk by chunk: PCIe reads quadratic in it.
    reach = "layer by layer throughout" if layered >= n else \
        f"layer by layer up to {layered:,} tokens, chunk by chunk (slow: quadratic) past it"
    return (f"{n:,} tokens (KV: {plan.host_bytes / gib:.1f} GiB host + {plan.gpu_bytes / gib:.1f} GiB GPU memory; "
            f"{where}; prefill {reach})")


def _offload_capacity(model_dir: str, r: dict, fp8: bool):
    """``longest_offload_context`` for ``inspect_checkpoint``'s numbers and the checkpoint's preset."""
    import torch

    from .cache.offload_plan import OffloadConfig, longest_offload_context
    from .engine.layer_prefill import held_bytes
    from .models.llama import ModelArgs
    from .models.loader import read_config, recommended_config

    _, cfg = read_config(model_dir)
    args, hip = ModelArgs.from_hf(cfg), recommended_config(cfg)
    # The same prefill workspace inspect_checkpoint's no-offload figure leaves (4,096-token chunks).
    workspace = 4096 * (4 * args.dim + 3 * args.intermediate_size) * 4 + (256 << 20)
    dtype, free_gpu = getattr(torch, r["dtype"]), max(0, r["free_bytes"] - r["weights_bytes"])
    n, plan = longest_offload_context(
        n_layers=args.n_layers, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, batch=1,
        dtype=dtype, device=torch.device(r["device"]),
        layer_configs=[hip.for_layer(i, args.n_layers) for i in range(args.n_layers)],
        config=OffloadConfig(fp8=fp8), workspace=workspace, free_host=r["host_free_bytes"], free_gpu=free_gpu)
    # Layer-by-layer prefill (engine/layer_prefill.fits): the hidden states and one layer's K/V
    # of the prompt in half the GPU memory the weights and the cache's GPU part leave.
    per_token = held_bytes(args, dtype, 1 if fp8 else dtype.itemsize, 1, 1)
    return n, plan, int(0.5 * max(0, free_gpu - plan.gpu_bytes) // per_token)


@app.command()
def serve(model_dir: str = typer.Argument("builtin", help="Model directory (default: the built-in model)."),
          host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000),
          preset: str = typer.Option(None, help="HiPConfig preset (default: the checkpoint's, else paper)."),
          hip: list[str] = typer.Option([], "--hip", help=HIP_HELP),
          backend: str = typer.Option("hip", help="Attention: hip | dense | streaming."),
          max_context: int = typer.Option(32_768, help="Longest prompt + completion accepted, in tokens (per "
                                          "request; --max-batch slots of it are allocated at start)."),
          max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together (continuous batching); "
                                        "each holds a KV-cache slot of --max-context tokens, allocated at start."),
          max_queue: int = typer.Option(64, help="Requests waiting beyond the running ones get 429."),
          device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
          dtype: str = typer.Option(None, help="float32 | float16 | bfloat16 (default: the checkpoint's on "
                                    "GPU, float32 on CPU)."),
          offload: bool = typer.Option(None, "--offload/--no-offload",
                                       help="Keep the slots' KV cache in host memory (default: only if it does not fit)."),
          offload_fp8: bool = typer.Option(False, "--offload-fp8", help=OFFLOAD_FP8_HELP),
          context_cache: str = typer.Option(None, "--context-cache",
                                            help="safetensors file of cached document KV: loaded at start, saved at exit."),
          cuda_graph: bool = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                          help="Replay decode steps from CUDA graphs (default: on a GPU, without a "
                                          "refresh lag)."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    r"""Serve the model over an OpenAI-compatible HTTP API (`pip install infinitehip\[server]`)."""
    # The backslash: typer renders help as rich markup, where a bare [server] is a tag and vanishes.
    if not 0 <= port <= 65535:
        _fail(ValueError(f"--port {port} is not a TCP port: use 0..65535"), debug)
    if max_queue < 0:   # a negative queue would silently take slots from --max-batch
        _fail(ValueError(f"--max-queue {max_queue} must be >= 0 (requests waiting beyond the running ones)"), debug)
    if context_cache and not Path(context_cache).absolute().parent.is_dir():   # found now, not at exit
        _fail(ValueError(f"--context-cache {context_cache}: its folder does not exist (the file is written "
                         "at exit)"), debug)
    try:
        import uvicorn

        from . import load
        from .server.app import create_app
        from .server.engine import ModelEngine

        model = load(model_dir, device=device, dtype=dtype, config=_hip_config(model_dir, preset, hip))
        engine = ModelEngine(model, backend=backend, max_context=max_context, max_batch=max_batch,
                             offload=_offload_arg(offload, offload_fp8, None, model.device), cuda_graph=cuda_graph)
        if context_cache and Path(context_cache).exists():   # into host memory
            engine.prefix_cache.load(context_cache, owner=engine.runner.owner)
    except ImportError as e:
        _fail(ImportError(f"{e}; the server needs `pip install infinitehip[server]`"), debug)
    except (OSError, ValueError, TypeError) as e:
        _fail(e, debug)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    server = create_app(engine, max_queue=max_queue)
    if context_cache:
        # Saved by the app's shutdown (after the worker stopped), not after uvicorn.run returns:
        # stopped by SIGTERM (systemd, docker stop), uvicorn re-raises the signal once shut down
        # and the process ends before any line after run.
        server.router.on_shutdown.append(lambda: engine.save_context_cache(context_cache))
    uvicorn.run(server, host=host, port=port, log_level="info")


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
