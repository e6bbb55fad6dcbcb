"""Plots of eval records: accuracy vs length per method, and a depth x length heat map per task."""
from __future__ import annotations

from pathlib import Path

_COLORS = {"hip": "tab:blue", "dense": "tab:orange", "streaming": "tab:green", "endpoint": "tab:purple"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(r: dict) -> float:
    return r["length_over_trained"] if r.get("length_over_trained") else r["length"]


def plot_accuracy_vs_length(records: list[dict], path: Path, title: str = "") -> Path:
    """One panel per task; a line per method; accuracy averaged over depths."""
    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in records))
    relative = all(r.get("length_over_trained") for r in records)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for method in dict.fromkeys(r["method"] for r in records):
            cells: dict[float, list[float]] = {}
            for r in records:
                if r["task"] == task and r["method"] == method:
                    cells.setdefault(_x(r), []).append(r["accuracy"])
            xs = sorted(cells)
            ax.plot(xs, [100 * sum(cells[x]) / len(cells[x]) for x in xs], "o-", label=method,
                    color=_COLORS.get(method))
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context / trained context" if relative else "context (tokens)")
        if relative:
            ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_depth_heatmap(records: list[dict], path: Path, method: str = "hip", title: str = "") -> Path:
    """One panel per task: needle depth (rows) x length (columns), accuracy of ``method``."""
    plt = _plt()
    rows = [r for r in records if r["method"] == method]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.8 * max(1, len(tasks)), 3.4), squeeze=False)
    im = None
    for ax, task in zip(axes[0], tasks):
        cells = [r for r in rows if r["task"] == task]
        xs = sorted({_x(r) for r in cells})
        ds = sorted({r["depth"] for r in cells})
        grid = [[float("nan")] * len(xs) for _ in ds]
        for r in cells:
            grid[ds.index(r["depth"])][xs.index(_x(r))] = 100 * r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], fontsize=7)
        ax.set_yticks(range(len(ds)), [f"{d:.0%}" for d in ds], fontsize=7)
        ax.set_xlabel("x trained context" if cells and cells[0].get("length_over_trained") else "tokens")
        ax.set_title(f"{task} ({method})", fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
