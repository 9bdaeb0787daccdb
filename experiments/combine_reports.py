"""Combine `mem-dist evaluate` outputs made one (condition, seed) at a time into one report.

    python experiments/combine_reports.py OUT [--control COND=CONTROL ...] RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a metrics.json; conditions of the same name are joined (their victim seeds'
runs side by side), in the order first seen. OUT gets metrics.json, report.md and the plots, as
`mem-dist evaluate` writes them. The long experiments (experiments/calibrate.sh) run each
condition and seed as its own command, so that no command runs for more than a few minutes
and a session that stops keeps what finished.
"""
import json
import os
import sys

from mem_dist.evaluation import report
from mem_dist.pipeline import storage


def combine(dirs: list[str]) -> dict:
    out: dict = {}
    for d in dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.exists(path):
            print(f"combine_reports: {d}: no metrics.json yet, left out", file=sys.stderr)
            continue
        m = json.load(open(path))
        if not out:
            out = {**m, "conditions": {}}
        for name, hist in m["conditions"].items():
            runs = hist.get("runs") or [hist]
            if name in out["conditions"]:
                out["conditions"][name]["runs"] += runs
            else:
                out["conditions"][name] = {**hist, "runs": list(runs)}
    return out


def main(argv: list[str]) -> int:
    target, rest, controls = argv[0], argv[1:], {}
    while rest and rest[0] == "--control":
        cond, control = rest[1].split("=", 1)
        controls[cond], rest = control, rest[2:]
    dirs = sorted(rest, key=lambda d: (not os.path.basename(d).startswith("clean"), d))  # clean first
    metrics = combine(dirs)
    if not metrics:
        print("combine_reports: nothing to combine", file=sys.stderr)
        return 1
    for name, hist in metrics.get("conditions", {}).items():  # a control counts only when it was measured too
        if controls.get(name) in metrics["conditions"]:
            hist["condition"]["control"] = controls[name]
    seeds = sorted({r.get("seed") for h in metrics["conditions"].values() for r in h["runs"]}, key=str)
    metrics["settings"] = metrics["settings"].rsplit("; victim seed", 1)[0] + f"; victim seeds {', '.join(map(str, seeds))}"
    storage.write_json(storage.join(target, "metrics.json"), metrics)
    print(report.write_report(target, metrics, []))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
