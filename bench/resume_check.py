"""Losses of resumed runs next to an uninterrupted one: are they continuous?

    python bench/resume_check.py REFERENCE RESUMED [ELASTIC ...] [--after STEP] [--no-save]

Each argument is a run folder (its metrics.jsonl). REFERENCE ran from start to end; the others were
stopped (SIGTERM: checkpoint after the current step) and resumed, possibly on another number of
GPUs. Prints, for every step logged after --after in all runs, each run's loss and its difference
from the reference, and appends the table to bench/RESULTS.md (bench/multi_gpu.sh's resume phase).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import append  # noqa: E402


def losses(run: Path) -> dict[int, float]:
    """step -> training loss from run/metrics.jsonl (a resumed run appends to the same file, so a
    step logged twice keeps its last value: the one after the resume)."""
    out = {}
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics (did the run start?)")
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:  # training lines (evaluations log val/... keys)
            out[int(rec["step"])] = float(rec["loss"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference")
    p.add_argument("resumed", nargs="+")
    p.add_argument("--after", type=int, default=0, help="compare steps after this one (the stop)")
    p.add_argument("--labels", nargs="+", default=None, help="a name per resumed run")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    ref = losses(Path(args.reference))
    runs = [losses(Path(r)) for r in args.resumed]
    labels = args.labels or [Path(r).name for r in args.resumed]
    if len(labels) != len(runs):
        raise SystemExit(f"--labels gives {len(labels)} names for {len(runs)} resumed runs")
    steps = sorted(s for s in ref if s > args.after and all(s in r for r in runs))
    if not steps:
        raise SystemExit(f"no step after {args.after} is logged by every run")
    rows, worst = [], [0.0] * len(runs)
    for s in steps:
        row = [s, f"{ref[s]:.4f}"]
        for i, r in enumerate(runs):
            diff = r[s] - ref[s]
            worst[i] = max(worst[i], abs(diff))
            row += [f"{r[s]:.4f}", f"{diff:+.1e}"]
        rows.append(row)
    header = ["step", "uninterrupted"] + [h for name in labels for h in (name, "difference")]
    summary = "; ".join(f"{name}: largest |difference| {w:.1e}" for name, w in zip(labels, worst))
    append("Resume: losses after a stop, against an uninterrupted run (bench/resume_check.py)", header, rows,
           notes=f"reference {args.reference}; resumed {', '.join(args.resumed)}; steps after {args.after}; "
                 f"{summary}", save=not args.no_save)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
