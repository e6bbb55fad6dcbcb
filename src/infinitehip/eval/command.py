"""`infinitehip eval`: run the tasks, print a table, write JSON records and PNG plots."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..assets import resolve_model_path
from ..config import is_int
from ..lengths import parse_tokens
from ..tokenizer import Tokenizer
from .runner import (METHODS, EvalSpec, check_short_lengths, device_name, endpoint_completer, engine_completer,
                     n_completions, run_eval, summarize)
from .tasks import TokenCounter


def _name_and_context(model_dir: str) -> tuple[str, int | None]:
    """The model's name as ``load`` gives it, which is the id ``serve`` lists under /v1/models
    ("." is its folder's name, a hub snapshot its org/name), and its trained context."""
    from ..models.llama import trained_context
    from ..models.loader import model_name, read_config

    path, cfg = read_config(model_dir)   # a missing directory or config.json: its own clear error
    return model_name(path), trained_context(cfg)


def _methods(methods: list[str] | None, endpoint: str | None) -> list[str]:
    """The methods evaluated (None: every backend). A server answers with the one backend it was
    started with (requests cannot pick one), so --methods with --endpoint would be ignored."""
    if endpoint is None:
        return list(METHODS) if methods is None else methods
    if methods is not None:
        raise ValueError(f"--methods {','.join(methods)} picks local attention backends, but --endpoint evaluates the "
                         "server, which answers with its own --backend: leave --methods out (or restart the server "
                         "with that backend)")
    return ["endpoint"]


def _refuse_local_options(endpoint: str | None, **options):
    """--preset, --hip, --device and --dtype configure the local model: with --endpoint the server
    holds the model (its own flags chose them), so they would be silently ignored."""
    given = [f"--{name}" for name, value in options.items() if value]
    if endpoint is not None and given:
        raise ValueError(f"{', '.join(given)} configure the local model, but --endpoint evaluates the server, which "
                         f"runs with the settings it was started with: leave {', '.join(given)} out")


def _results_folder(out: Path):
    """Made before the run: a file at --out, or a folder that cannot be written, failed only when
    the results were saved, after the whole eval."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make the results folder there ({e.strerror}): give a folder path") \
            from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable: give another")


def eval_command(model: str, *, tasks: list[str], lengths: list[str], methods: list[str] | None, samples: int,
                 depths: list[float], endpoint: str | None, out: Path, preset: str, device: str | None,
                 dtype: str | None, seed: int, chunk_size: int, console: Console,
                 hip: Sequence[str] = ()) -> list[dict]:
    if endpoint is not None and not endpoint.strip():   # evaluated the local model with a method named "endpoint"
        raise ValueError("--endpoint is empty: give the server's URL (e.g. http://127.0.0.1:8000), or leave it out to "
                         "evaluate the model here")
    methods = _methods(methods, endpoint)
    _refuse_local_options(endpoint, preset=preset, hip=list(hip), device=device, dtype=dtype)
    model_dir = resolve_model_path(model)
    name, trained = _name_and_context(model_dir)
    spec = EvalSpec(tuple(tasks), tuple(parse_tokens(x, trained) for x in lengths), tuple(methods),
                    tuple(depths), samples, seed)
    if endpoint is None and (not is_int(chunk_size) or chunk_size < 1):   # found by the first prefill, after loading
        raise ValueError(f"--chunk-size {chunk_size} must be >= 1 (tokens prefilled at a time)")
    _results_folder(out)   # the arguments checked: before the model is loaded and the prompts answered
    # The tokenizer counts the prompts' tokens (with --endpoint the server holds the model).
    tok = Tokenizer.from_dir(model_dir)
    counter = TokenCounter(lambda s: tok.encode(s, add_special_tokens=False))
    check_short_lengths(spec, counter)   # before the model loads
    if endpoint:
        completers = {"endpoint": endpoint_completer(endpoint, name)}
        dev = f"endpoint {endpoint}"
    else:
        from ..models.loader import config_with_overrides, load

        loaded = load(model_dir, device=device, dtype=dtype, config=config_with_overrides(model_dir, preset, hip))
        completers = {m: engine_completer(loaded, m, chunk_size) for m in methods}
        dev = device_name(loaded)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        job = bar.add_task("", total=n_completions(spec, len(completers)))
        records = run_eval(spec, completers, counter, model_name=name, device=dev, trained=trained,
                           on_cell=lambda r: bar.update(job, description=f"{r['task']} {r['length']:,} {r['method']}"),
                           progress=lambda: bar.advance(job))
    _print_table(records, trained, console)
    json_path = out / "eval.json"
    meta = {"spec": {**spec.__dict__, "preset": preset, "hip": list(hip), "trained_context": trained},
            "seconds": round(time.perf_counter() - t0, 1)}
    json_path.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    written = [json_path]
    try:
        from .plots import plot_accuracy_vs_length, plot_depth_heatmap

        title = f"{name} (trained context {trained}), {samples} samples/cell, {dev}"
        written.append(plot_accuracy_vs_length(records, out / "eval_accuracy_vs_length.png", title))
        for m in dict.fromkeys(r["method"] for r in records):
            written.append(plot_depth_heatmap(records, out / f"eval_depth_{m}.png", m, title))
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plots (pip install infinitehip[plot])")
    console.print("wrote " + ", ".join(str(p) for p in written))
    return records


def _print_table(records: list[dict], trained: int | None, console: Console):
    acc = summarize(records)
    lengths = sorted({k[2] for k in acc})
    table = Table(title="accuracy (%), mean over needle depths")
    table.add_column("task")
    table.add_column("method")
    for n in lengths:
        table.add_column(f"{n:,}" + (f"\n{n / trained:g}x C" if trained else ""), justify="right")
    for task, method in dict.fromkeys((k[0], k[1]) for k in acc):
        table.add_row(task, method, *[f"{100 * acc[(task, method, n)]:.0f}" if (task, method, n) in acc else "-"
                                      for n in lengths])
    console.print(table)
