"""Quality side by side: a RetNet and a Transformer of the same size trained on the same tokens,
with the paper's decay ablation (every head one decay instead of multi-scale decays), validation
loss per source for each. The paper's third claim is Transformer-level quality.

    python bench/quality.py                                  # tiny pair on the sample data, CPU
    python bench/quality.py --steps 40 --no-save             # a quick look
    python bench/quality.py --experiment tiny_cpu --runs retnet transformer trainer.device=cuda

Every run is `python -m retnet_train experiment=EXPERIMENT model=...` in a fresh process (same
seed, data order and optimizer), so the models see the same batches. retnet_tiny and
transformer_tiny have the same width, depth and parameter count (7.35M / 7.34M). Prints the table,
appends it to bench/RESULTS.md and writes bench/quality_loss.png (train loss against tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (model preset, extra overrides, label)
RUNS = {
    "retnet": ("retnet_tiny", [], "RetNet (multi-scale decay, the paper)"),
    "retnet_one_decay": ("retnet_tiny", ["model.decay_schedule=uniform"], "RetNet, one decay for every head"),
    "transformer": ("transformer_tiny", [], "Transformer (same size)"),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--experiment", default="tiny_cpu")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--chart", default=None, help="the PNG (default: bench/quality_loss.png beside RESULTS.md)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    return p.parse_args(argv)


def train(name: str, args, work: Path) -> Path:
    preset, extra, _ = RUNS[name]
    run_dir = work / name
    steps = [f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}"] if args.steps else []
    cmd = [sys.executable, "-m", "retnet_train", f"experiment={args.experiment}", f"model={preset}", *extra,
           f"run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=false",
           "logging.wandb.mode=disabled", *steps, *args.overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the training run failed (exit {proc.returncode}); its log is in {run_dir}/logs")
    return run_dir


def read(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "event" not in r and "loss" in r and "val/loss" not in r]
    evals = [r for r in records if "val/loss" in r]
    if not evals:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation record (trainer.eval_at_end off?)")
    return {"train": [(r["tokens"], r["loss"]) for r in train if "tokens" in r] or
                     [(r["step"], r["loss"]) for r in train], "final": evals[-1]}


def table(results: dict[str, dict]) -> tuple[list[str], list[list]]:
    sources = sorted({k.split("/")[1] for r in results.values() for k in r["final"]
                      if k.startswith("val/") and k.endswith("/loss") and k.count("/") == 2})
    header = ["model", "tokens", *[f"val loss {s}" for s in sources], "val loss", "val ppl", "x Transformer loss"]
    ref = results.get("transformer", {}).get("final", {}).get("val/loss")
    rows = []
    for name, r in results.items():
        f = r["final"]
        rows.append([RUNS[name][2], f"{f.get('tokens', 0):,}", *[f"{f.get(f'val/{s}/loss', float('nan')):.3f}" for s in sources],
                     f"{f['val/loss']:.3f}", f"{f['val/ppl']:.1f}", f"{f['val/loss'] / ref:.3f}" if ref else ""])
    return header, rows


def main(argv=None) -> dict:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
        work = Path(args.work_dir or tmp)
        results = {name: read(train(name, args, work)) for name in args.runs}
    header, rows = table(results)
    from bench.charts import beside_results, chart
    from bench.results import append

    args.chart = args.chart or str(beside_results("quality_loss"))
    drawn = chart(Path(args.chart), "training loss, same tokens", "tokens", "train loss",
                  {RUNS[n][2]: r["train"] for n, r in results.items()}, logx=False)
    notes = (f"experiment={args.experiment}" + (f", {args.steps} steps" if args.steps else "") +
             f"; every run in its own process, same seed and batches; validation loss at the last step, per "
             f"source and over all tokens" + (f"; chart: [{Path(args.chart).name}]({Path(args.chart).name})" if drawn else ""))
    append("Quality: RetNet against a Transformer of the same size (bench/quality.py)", header, rows, notes=notes,
           save=not args.no_save)
    return results


if __name__ == "__main__":
    main()
