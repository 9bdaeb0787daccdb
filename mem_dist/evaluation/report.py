"""The evaluation report: a markdown table, per-epoch curves and an image grid.

Everything renders from the ``metrics.json`` content that :func:`mem_dist.evaluation.evaluate.run`
builds, with matplotlib's object API (no pyplot state, Agg rendering), and is written
through :mod:`mem_dist.pipeline.storage`, so ``output`` may be any fsspec URL:

  ``report.md``        a one-line conclusion, the settings, the final-epoch table with each
                       victim's peak (its best epoch), chance levels; for mixes, the
                       per-owner leakage table (protected vs unprotected training pairs)
  ``loss.png``         mean training loss per epoch, one line per condition (paper fig. 1)
  ``median_rank.png``  CLIP victims: image->text median rank per epoch, log scale (fig. 2)
  ``accuracy.png``     zero-shot top-1 (CLIP victims on labelled val data) or the
                       classifier's top-1 per epoch
  ``grid.png``         the same samples under each condition that shares their keys, each
                       protected column followed by its difference to the reference x10
"""

from __future__ import annotations

import io
import textwrap
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mem_dist.pipeline import storage
from mem_dist.evaluation.scores import attacker_epoch, bootstrap_interval, unpack_correct

_COLUMNS = [("i2t", "r1", "i2t R@1"), ("i2t", "r5", "i2t R@5"), ("i2t", "r10", "i2t R@10"), ("i2t", "median_rank", "i2t medR"),
            ("t2i", "r1", "t2i R@1"), ("t2i", "r5", "t2i R@5"), ("t2i", "r10", "t2i R@10"), ("t2i", "median_rank", "t2i medR")]


def _cell(key: str, value: float) -> str:
    """A table cell: median ranks as they are, R@K and top-1 as fractions (one unit everywhere)."""
    return f"{value:g}" if key == "median_rank" else f"{value:.3f}"


def headline(metrics: dict[str, Any]) -> tuple[str, Any]:
    """(label, epoch -> value) of the evaluation's main figure: the classifier's top-1, the
    CLIP victims' zero-shot top-1 on labelled val data, else their i2t R@10."""
    if metrics.get("kind") == "classifier":
        return "top-1", lambda e: e["top1"]
    if all("zero_shot_top1" in h["final"] for h in metrics["conditions"].values()):
        return "zero-shot top-1", lambda e: e["zero_shot_top1"]
    return "i2t R@10", lambda e: e["i2t"]["r10"]


def peak(hist: dict[str, Any], value=lambda e: e["i2t"]["r10"]) -> tuple[float, int]:
    """(best value over the epochs, its epoch): what an attacker who stops training when the
    clean validation score peaks would keep (default: i2t R@10)."""
    best = max(hist["epochs"], key=value)
    return value(best), best["epoch"]


def _pairs(hist: dict[str, Any]) -> str:
    if hist["n_train"] is None:
        return "-"
    return f"{hist['n_train']}" + (f" ({hist['n_protected']} protected)" if hist.get("n_protected") is not None else "")


def _loss(final: dict) -> str:
    return f"{final['train_loss']:.3f}" if final["train_loss"] is not None else "-"


def results_table(metrics: dict[str, Any]) -> str:
    """Markdown table of the final epoch per condition, each victim's peak (R@K and top-1 in %),
    and the chance row."""
    chance = metrics["chance"]
    if metrics.get("kind") == "classifier":
        lines = ["| condition | train images | final loss | top-1 | peak top-1 (epoch) |", "|---|---|---|---|---|"]
        for name, hist in metrics["conditions"].items():
            best, epoch = peak(hist, lambda e: e["top1"])
            lines.append(f"| {name} | {_pairs(hist)} | {_loss(hist['final'])} | {_cell('top1', hist['final']['top1'])} | "
                         f"{_cell('top1', best)} ({epoch}) |")
        lines.append(f"| chance | - | - | {_cell('top1', chance.get('top1', float('nan')))} | - |")
        return "\n".join(lines)
    zero_shot = all("zero_shot_top1" in h["final"] for h in metrics["conditions"].values())
    head = ["condition", "train pairs", "final loss"] + [label for _, _, label in _COLUMNS] + ["peak i2t R@10 (epoch)"]
    head += ["zero-shot top-1", "peak zero-shot top-1 (epoch)"] if zero_shot else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, hist in metrics["conditions"].items():
        final = hist["final"]
        best, epoch = peak(hist)
        cells = [name, _pairs(hist), _loss(final)] + [_cell(key, final[d][key]) for d, key, _ in _COLUMNS]
        cells.append(f"{_cell('r10', best)} ({epoch})")
        if zero_shot:
            zs, zs_epoch = peak(hist, lambda e: e["zero_shot_top1"])
            cells += [_cell("top1", final["zero_shot_top1"]), f"{_cell('top1', zs)} ({zs_epoch})"]
        lines.append("| " + " | ".join(cells) + " |")
    row = ["random guess", "-", "-"] + [_cell(key, chance[key]) for _, key, _ in _COLUMNS] + ["-"]
    row += [_cell("top1", chance.get("top1", float("nan"))), "-"] if zero_shot else []
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _keys(metrics: dict[str, Any]) -> tuple[str, str, str] | None:
    """(val key, select key, per-image bits key) of the score the hygiene summary reads: top-1,
    zero-shot top-1, else image->text R@10; None for records without them (older metrics)."""
    if metrics.get("kind") == "classifier":
        return "top1", "select_top1", "correct"
    finals = [h["final"] for h in metrics["conditions"].values()]
    if all("zero_shot_top1" in f for f in finals):
        return "zero_shot_top1", "select_zero_shot_top1", "correct"
    if all("i2t_r10" in f for f in finals):
        return "i2t_r10", "select_i2t_r10", "i2t_hits"
    return None


def _label(keys: tuple[str, str, str]) -> str:
    return {"top1": "top-1", "zero_shot_top1": "zero-shot top-1", "i2t_r10": "image->text R@10"}[keys[0]]


def summarise(hist: dict[str, Any], key: str, select_key: str, bits: str = "correct") -> dict[str, Any]:
    """One condition over its victim seeds: the final epoch's and the attacker's epoch's val
    accuracy (mean over seeds, with a 95% bootstrap interval over the val images), the epochs
    chosen on the select images, the (optimistic) peak on val and the last training loss."""
    runs = hist.get("runs") or [hist]
    n = hist["n_val"]
    chosen = [attacker_epoch(r["epochs"], select_key) if any(select_key in e for e in r["epochs"]) else None for r in runs]

    def side(records: list[dict]) -> dict[str, Any]:
        values = [e[key] for e in records]
        out = {"mean": float(np.mean(values)), "values": values, "interval": None}
        if all(bits in e for e in records):
            out["interval"] = bootstrap_interval(np.stack([unpack_correct(e[bits], n) for e in records]))
        return out

    peaks = [max(r["epochs"], key=lambda e: e[key]) for r in runs]
    losses = [r["final"]["train_loss"] for r in runs if r["final"].get("train_loss") is not None]
    return {"seeds": [r.get("seed") for r in runs], "final": side([r["final"] for r in runs]),
            "attacker": side(chosen) if all(chosen) else None, "attacker_epochs": [e["epoch"] for e in chosen if e],
            "peak": float(np.mean([e[key] for e in peaks])), "peak_epochs": [e["epoch"] for e in peaks],
            "loss": float(np.mean(losses)) if losses else None}


def _score(side: dict[str, Any] | None) -> str:
    if side is None:
        return "-"
    interval = f" [{side['interval'][0]:.3f}, {side['interval'][1]:.3f}]" if side["interval"] else ""
    each = f" ({' / '.join(f'{v:.3f}' for v in side['values'])})" if len(side["values"]) > 1 else ""
    return f"{side['mean']:.3f}{interval}{each}"


def summary_table(metrics: dict[str, Any]) -> str | None:
    """Markdown table of every condition over its seeds: final and attacker's-epoch accuracy
    with 95% intervals, the chosen epochs, the peak on val, the last training loss."""
    keys = _keys(metrics)
    if keys is None:
        return None
    head = ["condition", "its control", "victim seeds", "final [95% interval] (per seed)",
            "at the attacker's epoch, chosen on the select images [95% interval]", "epochs chosen",
            "peak on val (epochs)", "final training loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, hist in metrics["conditions"].items():
        s = summarise(hist, *keys)
        control = hist.get("condition", {}).get("control") or "-"
        loss = "-" if s["loss"] is None else f"{s['loss']:.3f}"
        lines.append(f"| {name} | {control} | {', '.join(str(x) for x in s['seeds'])} | {_score(s['final'])} | "
                     f"{_score(s['attacker'])} | {', '.join(map(str, s['attacker_epochs'])) or '-'} | "
                     f"{s['peak']:.3f} ({', '.join(map(str, s['peak_epochs']))}) | "
                     f"{loss} |")
    return "\n".join(lines)


def versus_controls(metrics: dict[str, Any]) -> str | None:
    """One line: each condition that names a control against it, at the attacker's epoch
    (else the final one); None when no condition names a control."""
    keys = _keys(metrics)
    pairs = [(n, h["condition"]["control"]) for n, h in metrics["conditions"].items()
             if keys and h.get("condition", {}).get("control")]
    if not pairs:
        return None
    parts, wheres = [], []
    for name, control in pairs:
        a, b = summarise(metrics["conditions"][name], *keys), summarise(metrics["conditions"][control], *keys)
        where = "attacker" if a["attacker"] and b["attacker"] else "final"
        x, y = a[where], b[where]
        verdict = "no better than its control"
        if x["interval"] and y["interval"] and x["interval"][1] < y["interval"][0]:
            verdict = f"{y['mean'] - x['mean']:.3f} below its control"
        elif not x["interval"] and x["mean"] < y["mean"]:
            verdict = f"{y['mean'] - x['mean']:.3f} below its control (no interval)"
        parts.append((f"{name} {_score(x)} against {control} {_score(y)}", verdict))
        wheres.append(where)
    label = _label(keys)
    if len(set(wheres)) > 1:  # a pair without select scores (e.g. reports combined from runs with and without them)
        at = "at the attacker's epoch (chosen on the select images) where both were scored there, else after the last epoch"
        named = {"attacker": "at the attacker's epoch", "final": "final"}
        parts = [(f"{text} ({named[w]})", verdict) for (text, verdict), w in zip(parts, wheres)]
    else:
        at = "at the attacker's epoch (chosen on the select images)" if wheres[0] == "attacker" else "after the last epoch"
    return (f"**Against the controls** ({label} on the clean val data {at}; 95% intervals): "
            + "; ".join(f"{text}: {verdict}" for text, verdict in parts) + ".")


def conclusion(metrics: dict[str, Any]) -> str | None:
    """One line: the protected victims' best peak against the clean victim's (None without a
    condition named "clean" and another)."""
    conditions = metrics["conditions"]
    if "clean" not in conditions or len(conditions) < 2:
        return None
    label, value = headline(metrics)
    clean, _ = peak(conditions["clean"], value)
    others = {name: peak(hist, value)[0] for name, hist in conditions.items() if name != "clean"}
    low, high = min(others, key=others.get), max(others, key=others.get)
    chance = metrics["chance"].get("top1" if "top-1" in label else "r10")
    span = f"from {others[low]:.3f} ({low}) to {others[high]:.3f} ({high})" if low != high else f"{others[low]:.3f} ({low})"
    return (f"**In one line:** the victims' peak {label} on clean validation data is {clean:.3f} trained on clean data "
            f"and {span} on the other conditions" + (f"; chance is {chance:.3f}." if chance is not None else "."))


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
    if metrics.get("kind") == "classifier":
        what = (f"Top-1 on {n_val} clean validation images {after} (fractions); chance is one over the classes. The last "
                f"column is each victim's best epoch: what an attacker who stops when clean validation accuracy peaks would keep.")
    else:
        what = (f"Retrieval on {n_val} clean validation pairs {after} (R@K as fractions, medR = median rank, 1-based). "
                f"Random guessing gives R@10 = 10/{n_val} = {metrics['chance']['r10']:.3f}. The peak columns are each "
                f"victim's best epoch: what an attacker who stops when the clean validation score peaks would keep."
                + (" Zero-shot top-1: each val image assigned the class whose prompts (zero_shot_templates) are closest."
                   if "zero-shot" in table else ""))
    line = conclusion(metrics)
    controls = versus_controls(metrics)
    summary = summary_table(metrics)
    parts = ["# mem-dist evaluation", ""] + ([controls, ""] if controls else []) + ([line, ""] if line else []) + [
        f"Settings: {metrics['settings']}.",
        "",
        what,
        "",
        table,
        "",
        " ".join(f"![{name[:-4].replace('_', ' ')} per epoch]({name})" for name in plots(metrics)),
    ]
    if summary:
        parts[parts.index(table):parts.index(table)] = [
            "Every condition over its victim seeds (mean; 95% interval by resampling the val images): after the last "
            "epoch, and at the epoch an attacker keeps, chosen on clean images disjoint from val (`select_shards`). The "
            "peak on val is the optimistic upper bound (chosen on the test images themselves). A shortcut shows in "
            "loss.png as a training loss that falls faster than clean data's.", "", summary, ""]
    leakage = leakage_table(metrics)
    if leakage:
        parts += ["", "Per-owner leakage in mixes: retrieval among the clean versions of the victim's own training "
                  "pairs, in equal pools of the protected ones (the owners' data, which the victim saw only "
                  "protected) and of the rest (seen as they are). Protection works for its owners when the first "
                  "column is far below the second; R@10 depends on the pool size, so compare within a row.", "", leakage]
    if with_grid:
        parts += ["", "![clean and protected samples](grid.png)"]
    return "\n".join(parts) + "\n"


def plots(metrics: dict[str, Any]) -> list[str]:
    """The plot files an evaluation writes."""
    clip = metrics.get("kind") != "classifier"
    accuracy = not clip or any("zero_shot_top1" in h["final"] for h in metrics["conditions"].values())
    return ["loss.png"] + (["median_rank.png"] if clip else []) + (["accuracy.png"] if accuracy else [])


def plot_curves(metrics: dict[str, Any], what: str) -> bytes:
    """PNG of ``what`` ("loss", "median_rank" or "accuracy") per epoch, one line per condition."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    key = "top1" if metrics.get("kind") == "classifier" else "zero_shot_top1"
    for name, hist in metrics["conditions"].items():
        if what == "loss":
            points = [(e["epoch"], e["train_loss"]) for e in hist["epochs"] if e["train_loss"] is not None]
        elif what == "median_rank":
            points = [(e["epoch"], e["i2t"]["median_rank"]) for e in hist["epochs"]]
        else:
            points = [(e["epoch"], e[key]) for e in hist["epochs"] if key in e]
        if points:  # a checkpoint trained elsewhere has no training loss
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    chance = {"median_rank": metrics["chance"]["median_rank"], "accuracy": metrics["chance"].get("top1")}.get(what)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="random guess")
    if what == "median_rank":
        ax.set_yscale("log")  # 3 against 10 matters as much as 30 against 100
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    labels = {"loss": ("mean training loss", "Victim training loss"),
              "median_rank": ("image->text median rank (log)", "Image->text median rank on clean validation data"),
              "accuracy": ("top-1", "Top-1 on clean validation data" + (" (zero-shot)" if key == "zero_shot_top1" else ""))}
    ax.set_ylabel(labels[what][0])
    ax.set_title(labels[what][1])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no victim was trained in this evaluation", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return _png(fig)


def with_differences(columns: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], gain: int = 10):
    """The grid's columns with, after each one but the first (the reference), its difference
    to the reference amplified ``gain`` times around mid-grey (what delta looks like)."""
    ref = [canvas.astype(np.int16) for canvas, _ in columns[0][1]]
    out = [columns[0]]
    for name, samples in columns[1:]:
        out.append((name, samples))
        diff = [(np.clip(128 + gain * (canvas.astype(np.int16) - r), 0, 255).astype(np.uint8), "")
                for (canvas, _), r in zip(samples, ref)]
        out.append((f"{name}: difference x{gain}", diff))
    return out


def image_grid(columns: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]]) -> bytes:
    """PNG grid: one column per condition (name on top), one row per sample, each image
    with its caption below it."""
    columns = with_differences(columns)
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
    """Write report.md, the plots (:func:`plots`) and (if there are columns) grid.png under
    ``output``; returns the markdown table."""
    table = results_table(metrics)
    for name in plots(metrics):
        storage.write_bytes_atomic(storage.join(output, name), plot_curves(metrics, name[: -len(".png")]))
    if grid_columns:
        storage.write_bytes_atomic(storage.join(output, "grid.png"), image_grid(grid_columns))
    storage.write_bytes_atomic(storage.join(output, "report.md"), markdown_report(metrics, table, bool(grid_columns)).encode())
    return table


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
