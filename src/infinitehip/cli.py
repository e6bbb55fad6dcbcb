"""The `infinitehip` command line. Each command is a thin shell over the public API."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Million-token LLM inference on one GPU with InfiniteHiP sparse attention.")
console = Console()


@app.command()
def demo(context: int = typer.Option(262_144, help="Keys in the haystack."),
         depth: float = typer.Option(0.3, help="Where the needle sits, 0 = start, 1 = end.")):
    """Plant a needle deep in a long context and show which attention finds it."""
    from .demo import attention_needle

    if not 0.0 <= depth < 1.0 or context < 4096:
        raise typer.BadParameter("need 0 <= depth < 1 and context >= 4096")
    r = attention_needle(context, depth)
    table = Table(title=f"one decode query over {r['context']:,} keys, needle at {r['needle_at']:,}")
    for col in ("method", "needle weight in output", "seconds"):
        table.add_column(col)
    for name, m in r["methods"].items():
        table.add_row(name, f"{m['needle_weight']:.2f}", f"{m['seconds']:.3f}")
    console.print(table)
    console.print(f"hierarchical pruning selected the needle: {r['needle_selected']}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """Benchmarks (GPU): `infinitehip bench attention --help`."""
    from .bench import main as bench_main

    bench_main(list(ctx.args))


def main():
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
