"""Victim evaluation: ``python -m mem_dist.evaluate --config configs/eval-demo.yaml [key=value ...]``.

For every *condition* (a set of training shards: clean, protected, or a mix with a
protected fraction p) a victim is trained and scored on clean validation shards at epoch 0
and after every epoch:

  victim.kind clip        a CLIP (from scratch, or fine-tuned from a local checkpoint;
                          :mod:`mem_dist.evaluation.clip_victim`): image->text and text->image R@1/5/10,
                          median and mean rank, and zero-shot top-1 on labelled val shards
  victim.kind classifier  a torchvision classifier from scratch on the json labels or
                          k-means labels of its own (:mod:`mem_dist.evaluation.classifier`): top-1

A condition may instead name a CLIP trained elsewhere (``checkpoint``: open_clip_train's,
or any pipeline's, for ``victim.model``), which is evaluated as it is. Outputs under
``output``: ``metrics.json``, the plots, ``grid.png`` and ``report.md`` (:mod:`mem_dist.evaluation.report`).
The configuration is :mod:`mem_dist.evaluation.eval_config`; the training data :mod:`mem_dist.evaluation.pairs`.

Exit codes: 0 done, 2 bad configuration (one line naming the key), 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

import numpy as np
import torch

from mem_dist.evaluation import report
from mem_dist.pipeline import storage
from mem_dist.evaluation.classifier import train_classifier
from mem_dist.evaluation.clip_victim import evaluate_checkpoint, train_victim
from mem_dist.pipeline.config_io import ConfigError, load_config, to_dict
from mem_dist.pipeline.data import expand_shards, load_shard
from mem_dist.errors import one_line_errors
from mem_dist.evaluation.eval_config import EvalConfig, resolve_device
from mem_dist.evaluation.pairs import check_shards, data_config, load_pairs
from mem_dist.evaluation.scores import chance_metrics

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(cfg: EvalConfig, log: Log = print) -> dict:
    """Train and evaluate a victim per condition; write metrics, plots, grid and report.

    Returns:
        The metrics.json content: {"config", "settings", "chance", "conditions": {name:
        history (see :func:`train_victim`) plus "condition"}}.
    """
    for name, cond in cfg.conditions.items():  # every shard checked before any work (checkpoints: first thing below)
        if cond.shards:
            check_shards(cond.shards, f"conditions.{name}.shards" if cond.clean_shards or cond.checkpoint else f"conditions.{name}")
        if cond.clean_shards:
            check_shards(cond.clean_shards, f"conditions.{name}.clean_shards")
    check_shards(cfg.val_shards, "val_shards")
    if cfg.select_shards:
        check_shards(cfg.select_shards, "select_shards")
    resolve_device(cfg.device)

    if cfg.victim.kind == "classifier":
        bad = [name for name, cond in cfg.conditions.items() if cond.checkpoint is not None]
        if bad:
            raise ConfigError(f"config key 'conditions.{bad[0]}.checkpoint': a victim trained elsewhere is a CLIP "
                              f"(victim.kind clip); the classifier victim is always trained here")
    metrics: dict[str, Any] = {"config": to_dict(cfg), "kind": cfg.victim.kind, "settings": describe_settings(cfg),
                               "conditions": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or threads)
    try:
        val = load_pairs(cfg.val_shards, cfg)
        select = load_pairs(cfg.select_shards, cfg) if cfg.select_shards else None
        # victims trained elsewhere first: quick, and a checkpoint that does not load fails before any training
        evaluated = {name: evaluate_checkpoint(name, cond.checkpoint, val, cfg, log)
                     for name, cond in cfg.conditions.items() if cond.checkpoint is not None}
        for name, cond in cfg.conditions.items():
            runs = [evaluated[name]] if name in evaluated else []
            for seed in ([] if runs else cfg.victim_seeds):
                log(f"mem-dist: evaluate: condition '{name}'" + (f", victim seed {seed}" if len(cfg.victim_seeds) > 1 else ""))
                seeded = dataclasses.replace(cfg, seed=seed)
                suffix = f"-seed{seed}" if len(cfg.victim_seeds) > 1 else ""
                save_to = storage.join(cfg.output, "victims", f"{name}{suffix}.pt") if cfg.save_victims else None
                if cfg.victim.kind == "classifier":
                    history = train_classifier(cond, val, seeded, name, log, save_to, select)
                else:
                    history = train_victim(cond, val, seeded, log, save_to, select)
                runs.append({"seed": seed, **history})
            # the first seed's history at the top (what single-seed readers use), every seed's under "runs"
            metrics["conditions"][name] = {"condition": dataclasses.asdict(cond), **runs[0], "runs": runs}
            metrics["chance"] = chance_metrics(runs[0]["n_val"])
            if val.labels is not None:
                metrics["chance"]["top1"] = 1 / max(1, len(set(val.labels[val.labels >= 0].tolist())))
            storage.write_json(storage.join(cfg.output, "metrics.json"), metrics)  # progress after each condition
    finally:
        torch.set_num_threads(threads)

    grid = grid_samples(cfg)
    table = report.write_report(cfg.output, metrics, grid)
    print(table, flush=True)
    log(f"mem-dist: evaluate: wrote metrics.json, {', '.join(report.plots(metrics))}, {'grid.png, ' if grid else ''}report.md "
        f"under {cfg.output}")
    return metrics


def describe_settings(cfg: EvalConfig) -> str:
    """One line on the victim and the defences that were on (for the report)."""
    v = cfg.victim
    jpeg = f"train images re-encoded as JPEG q={cfg.reencode_jpeg}" if cfg.reencode_jpeg else "no JPEG re-encoding"
    if cfg.defence.describe_attacks():  # once on the whole training set, before training
        jpeg = f"{cfg.defence.describe_attacks()}; {jpeg}"
    if v.kind == "classifier":
        c = cfg.classifier
        return (f"classifier victim {c.model} from scratch on {'the json labels' if c.labels == 'json' else 'k-means labels of its own'}, "
                f"{v.epochs} epoch{'s' if v.epochs != 1 else ''}, batch {v.batch_size}, SGD lr {c.lr:g} momentum {c.momentum:g} "
                f"weight decay {c.weight_decay:g} + cosine, random crop (padding {c.crop_padding}){' + flip' if c.flip else ''}; "
                f"image defence: {cfg.defence.describe().split(';')[0].split(': ', 1)[1]}; {jpeg}; {_seeds(cfg)}")
    elsewhere = [name for name, cond in cfg.conditions.items() if cond.checkpoint is not None]
    if len(elsewhere) == len(cfg.conditions):
        return f"victims {v.model} trained elsewhere (each condition's checkpoint), evaluated as they are"
    start = f"fine-tuned from {v.pretrained}" if v.pretrained else "from scratch"
    crop = f"random resized crop {v.crop_scale[0]:g}-{v.crop_scale[1]:g}" if v.crop else "no crop"
    line = (f"victim {v.model} {start}, {v.epochs} epoch{'s' if v.epochs != 1 else ''}, batch {v.batch_size}, lr {v.lr:g}, "
            f"warm-up {v.warmup_steps} steps + cosine, {crop}; {cfg.defence.describe()}; {jpeg}; {_seeds(cfg)}")
    return line + (f"; trained elsewhere and evaluated as they are: {', '.join(elsewhere)}" if elsewhere else "")


def _seeds(cfg: EvalConfig) -> str:
    seeds = cfg.victim_seeds
    return f"victim seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def grid_samples(cfg: EvalConfig, rows: int = 4) -> list[tuple[str, list[tuple[np.ndarray, str]]]]:
    """Columns for the image grid: the reference condition and every condition whose first
    shard holds the same samples as the reference's first ``rows``: the same keys, with
    captions that end with the reference's (a protected caption is trigger + caption). A
    mix shows its protected version. Empty when no condition shares samples with the
    reference."""
    names = [n for n, c in cfg.conditions.items() if c.shards]  # a checkpoint condition may name none
    if not names:
        return []
    ref = "clean" if "clean" in names else names[0]
    first = {}
    for name in [ref] + [n for n in names if n != ref]:
        spec = cfg.conditions[name].shards
        first[name] = load_shard(expand_shards(spec)[0], data_config(spec, cfg))
    keys, captions = first[ref].keys[:rows], first[ref].captions[:rows]
    columns = []
    for name, shard in first.items():
        where = {k: i for i, k in enumerate(shard.keys)}
        if all(k in where and shard.captions[where[k]].endswith(c) for k, c in zip(keys, captions)):
            columns.append((name, [(shard.canvases[where[k]], shard.captions[where[k]]) for k in keys]))
    return columns if len(columns) > 1 else []


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mem-dist evaluate", description="Train victim CLIPs on clean / protected shards and report retrieval on clean validation shards.")
    p.add_argument("--config", help="YAML config (configs/eval-demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. victim.epochs=2 defence.image=jpeg conditions.mem3=runs/x/protected/00000.tar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run(load_config(EvalConfig, args.config, args.overrides))
        return 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
