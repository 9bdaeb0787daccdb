"""The evaluation report: a markdown table, per-epoch curves and an image grid.

Everything renders from the ``metrics.json`` content that :func:`mem_dist.evaluate.run`
builds, with matplotlib's object API (no pyplot state, Agg rendering), and is written
through :mod:`mem_dist.storage`, so ``output`` may be any fsspec URL:

  ``report.md``        settings, the final-epoch retrieval table with each victim's peak
                       i2t R@10 (the best epoch), random-guess levels; for mixes, the
                       per-owner leakage table (protected vs unprotected training pairs)
  ``loss.png``         mean training loss per epoch, one line per condition (paper fig. 1)
  ``median_rank.png``  image->text median rank per epoch, one line per condition (fig. 2)
  ``grid.png``         the same samples under each condition that shares their keys
"""

from __future__ import annotations

import io
import textwrap
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mem_dist import storage

_COLUMNS = [("i2t", "r1", "i2t R@1"), ("i2t", "r5", "i2t R@5"), ("i2t", "r10", "i2t R@10"), ("i2t", "median_rank", "i2t medR"),
            ("t2i", "r1", "t2i R@1"), ("t2i", "r5", "t2i R@5"), ("t2i", "r10", "t2i R@10"), ("t2i", "median_rank", "t2i medR")]


def _cell(key: str, value: float) -> str:
    return f"{value:g}" if key == "median_rank" else f"{100 * value:.1f}"


def peak(hist: dict[str, Any]) -> tuple[float, int]:
    """(best i2t R@10 over the epochs, its epoch): what an attacker who stops training when
    clean validation retrieval peaks would keep."""
    best = max(hist["epochs"], key=lambda e: e["i2t"]["r10"])
    return best["i2t"]["r10"], best["epoch"]


def results_table(metrics: dict[str, Any]) -> str:
    """Markdown table of the final epoch per condition, each victim's peak i2t R@10, and
    the random-guess row (R@K in %)."""
    head = ["condition", "train pairs", "final loss"] + [label for _, _, label in _COLUMNS] + ["peak i2t R@10 (epoch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, hist in metrics["conditions"].items():
        final = hist["final"]
        pairs = "-" if hist["n_train"] is None else f"{hist['n_train']}" + (f" ({hist['n_protected']} protected)" if hist.get("n_protected") is not None else "")
        loss = f"{final['train_loss']:.3f}" if final["train_loss"] is not None else "-"
        best, epoch = peak(hist)
        cells = [name, pairs, loss] + [_cell(key, final[d][key]) for d, key, _ in _COLUMNS] + [f"{_cell('r10', best)} ({epoch})"]
        lines.append("| " + " | ".join(cells) + " |")
    chance = metrics["chance"]
    lines.append("| random guess | - | - | " + " | ".join(_cell(key, chance[key]) for _, key, _ in _COLUMNS) + " | - |")
    return "\n".join(lines)


def leakage_table(metrics: dict[str, Any]) -> str | None:
    """Markdown table of the mixes' per-owner leakage (None when no condition is a mix)."""
    rows = [(name, hist) for name, hist in metrics["conditions"].items() if hist.get("leakage")]
    if not rows:
        return None
    head = ["condition", "pairs per pool", "owners' (protected) pairs: i2t R@10", "the rest: i2t R@10",
            "unseen val pairs: i2t R@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, hist in rows:
        leak = hist["leakage"]
        lines.append(f"| {name} | {leak['n']} | {_cell('r10', leak['owners']['i2t']['r10'])} | "
                     f"{_cell('r10', leak['others']['i2t']['r10'])} | {_cell('r10', hist['final']['i2t']['r10'])} ({hist['n_val']} pairs) |")
    return "\n".join(lines)


def markdown_report(metrics: dict[str, Any], table: str, with_grid: bool) -> str:
    n_val = next(iter(metrics["conditions"].values()))["n_val"]
    epochs = sorted({hist["final"]["epoch"] for hist in metrics["conditions"].values()})
    after = f"after epoch {epochs[0]}" if len(epochs) == 1 else "after each victim's last epoch (0: a checkpoint trained elsewhere, evaluated as it is)"
    parts = [
        "# mem-dist evaluation",
        "",
        f"Settings: {metrics['settings']}.",
        "",
        f"Retrieval on {n_val} clean validation pairs {after} (R@K in %, medR = median rank, 1-based). "
        f"Random guessing gives R@10 = 10/{n_val} = {100 * metrics['chance']['r10']:.1f}%. The last column is each "
        f"victim's best epoch: what an attacker who stops when clean validation retrieval peaks would keep.",
        "",
        table,
        "",
        "![training loss per epoch](loss.png) ![image-to-text median rank per epoch](median_rank.png)",
    ]
    leakage = leakage_table(metrics)
    if leakage:
        parts += ["", "Per-owner leakage in mixes: retrieval among the clean versions of the victim's own training "
                  "pairs, in equal pools of the protected ones (the owners' data, which the victim saw only "
                  "protected) and of the rest (seen as they are). Protection works for its owners when the first "
                  "column is far below the second; R@10 depends on the pool size, so compare within a row.", "", leakage]
    if with_grid:
        parts += ["", "![clean and protected samples](grid.png)"]
    return "\n".join(parts) + "\n"


def plot_curves(metrics: dict[str, Any], what: str) -> bytes:
    """PNG of ``what`` ("loss" or "median_rank") per epoch, one line per condition."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for name, hist in metrics["conditions"].items():
        if what == "loss":
            points = [(e["epoch"], e["train_loss"]) for e in hist["epochs"] if e["train_loss"] is not None]
        else:
            points = [(e["epoch"], e["i2t"]["median_rank"]) for e in hist["epochs"]]
        if points:  # a checkpoint trained elsewhere has no training loss
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    if what == "median_rank":
        ax.axhline(metrics["chance"]["median_rank"], color="gray", linestyle="--", linewidth=1, label="random guess")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean training loss" if what == "loss" else "image->text median rank")
    ax.set_title("Victim training loss" if what == "loss" else "Image->text median rank on clean validation data")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no victim was trained in this evaluation", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return _png(fig)


def image_grid(columns: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]]) -> bytes:
    """PNG grid: one column per condition (name on top), one row per sample, each image
    with its caption below it."""
    n_rows, n_cols = len(columns[0][1]), len(columns)
    fig = Figure(figsize=(2.8 * n_cols, 3.2 * n_rows), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for c, (name, samples) in enumerate(columns):
        for r, (canvas, caption) in enumerate(samples):
            ax = axes[r][c]
            ax.imshow(canvas, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(textwrap.fill(caption, 34), fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def write_report(output: str, metrics: dict[str, Any], grid_columns: Sequence) -> str:
    """Write report.md, loss.png, median_rank.png and (if there are columns) grid.png
    under ``output``; returns the markdown table."""
    table = results_table(metrics)
    storage.write_bytes_atomic(storage.join(output, "loss.png"), plot_curves(metrics, "loss"))
    storage.write_bytes_atomic(storage.join(output, "median_rank.png"), plot_curves(metrics, "median_rank"))
    if grid_columns:
        storage.write_bytes_atomic(storage.join(output, "grid.png"), image_grid(grid_columns))
    storage.write_bytes_atomic(storage.join(output, "report.md"), markdown_report(metrics, table, bool(grid_columns)).encode())
    return table


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
