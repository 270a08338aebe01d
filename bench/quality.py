"""Quality side by side: a RetNet and a Transformer of the same size trained on the same tokens,
with the paper's decay ablation (every head one decay instead of multi-scale decays), validation
loss per source for each. The paper's third claim is Transformer-level quality.

    python bench/quality.py                                  # tiny pair on the sample data, CPU
    python bench/quality.py --steps 40 --no-save             # a quick look
    python bench/quality.py --size small --no-save --work-dir $OUT/quality   # GPU pair on data=quality
    python bench/quality.py --size small --report-only --work-dir DIR        # table + chart from those runs

Sizes: tiny = experiment tiny_cpu with retnet_tiny / transformer_tiny (7.35M / 7.34M parameters, the
sample data, CPU); small = experiment quality_gpu with retnet_small / transformer_small (29.39M /
29.37M, data/quality from bench/quality_data.py: 18.5M training tokens, one GPU).
Every run is `python -m retnet_train experiment=EXPERIMENT model=...` in a fresh process (same
seed, data order and optimizer), so the models see the same batches. Each run folder gets a
quality_run.json (device, torch, commit, command, data, wall time), so that --report-only can
make the table and chart elsewhere from run folders copied back from the GPU machine (there, set
RETNET_COMMIT=<hash> when the tree has no .git). Prints the table, appends it to bench/RESULTS.md
and writes bench/quality_loss[_small].png (train loss against tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results import append, provenance  # noqa: E402  (the project's RESULTS.md format)

# size -> experiment; a run's model preset is <arch>_<size> (retnet_small, transformer_tiny, ...)
SIZES = {"tiny": "tiny_cpu", "small": "quality_gpu"}
# name -> (arch, extra overrides, label)
RUNS = {
    "retnet": ("retnet", [], "RetNet (multi-scale decay, the paper)"),
    "retnet_one_decay": ("retnet", ["model.decay_schedule=uniform"], "RetNet, one decay for every head"),
    "transformer": ("transformer", [], "Transformer (same size)"),
    # Not run by default. With 2 heads (retnet_small) the paper's decays are 1 - 2^-5 and 1 - 2^-6,
    # barely multi-scale; linspace spreads 1 - gamma over [1/512, 1/32] whatever the head count.
    "retnet_linspace": ("retnet", ["model.decay_schedule=linspace"], "RetNet, decays 1/32..1/512 (linspace)"),
    # Not run by default: the blocks' matmuls in fp8 (needs fp8 tensor cores), against "retnet"
    "retnet_fp8": ("retnet", ["trainer.float8=tensorwise"], "RetNet, fp8 linear layers (trainer.float8=tensorwise)"),
}
DEFAULT_RUNS = ["retnet", "retnet_one_decay", "transformer"]
META = "quality_run.json"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="tiny (CPU, sample data) | small (GPU, data=quality); default: from --experiment, else tiny")
    p.add_argument("--experiment", default=None, help="default: the size's (tiny_cpu, quality_gpu)")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table and chart from the runs already in --work-dir")
    p.add_argument("--chart", default=None, help="the PNG (default: bench/quality_loss[_small].png)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = {v: k for k, v in SIZES.items()}.get(args.experiment, "tiny")
    args.experiment = args.experiment or SIZES[args.size]
    if args.report_only and not args.work_dir:
        p.error("--report-only needs --work-dir (the folder holding the run folders)")
    return args


def data_facts(run_dir: Path) -> dict:
    """What the run trained on, from its config.yaml and the manifests (paths relative to the repo)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.trainer.get("data_source", "stream") != "stream" or not cfg.get("data"):
        return {"description": f"trainer.data_source={cfg.trainer.data_source}", "sources": {}}
    sources = {}
    for name, src in cfg.data.sources.items():
        m = json.loads((REPO / src.path / "manifest.json").read_text())
        sources[name] = {"weight": src.weight, **{k: m[k] for k in ("tokens", "val_tokens", "window")}}
    corpus = REPO / Path(cfg.data.tokenizer).parent / "corpus.json"  # bench/quality_data.py writes one
    if corpus.is_file():
        description = json.loads(corpus.read_text())["description"]
    elif Path(cfg.data.tokenizer).parent == Path("data/sample"):
        description = "`make sample-data`: Python stdlib docstrings, pydoc topics and source"
    else:
        description = "see the manifests"
    t = cfg.trainer
    eval_tokens = (t.eval_batches if t.get("eval_batches") is not None else cfg.data.val_batches) * \
        t.micro_batch_size * t.seq_len  # per source and evaluation, the same windows every time
    return {"root": str(Path(cfg.data.tokenizer).parent), "description": description, "sources": sources,
            "eval_tokens_per_source": eval_tokens}


def train(name: str, args, work: Path) -> Path:
    arch, extra, _ = RUNS[name]
    run_dir = work / name
    steps = [f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}"] if args.steps else []
    cmd = [sys.executable, "-m", "retnet_train", f"experiment={args.experiment}", f"model={arch}_{args.size}", *extra,
           f"run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=false",
           "logging.wandb.mode=disabled", *steps, *args.overrides]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the training run failed (exit {proc.returncode}); its log is in {run_dir}/logs")
    meta = {**provenance(), "experiment": args.experiment, "size": args.size, "model": f"{arch}_{args.size}",
            "overrides": [*extra, *steps, *args.overrides], "wall_s": round(time.monotonic() - start, 1),
            "data": data_facts(run_dir)}
    (run_dir / META).write_text(json.dumps(meta, indent=1) + "\n")
    return run_dir


def read(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "event" not in r and "loss" in r and "val/loss" not in r]
    evals = [r for r in records if "val/loss" in r]
    if not evals:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no validation record (trainer.eval_at_end off?)")
    meta = json.loads((run_dir / META).read_text()) if (run_dir / META).is_file() else {}
    return {"train": [(r["tokens"], r["loss"]) for r in train if "tokens" in r] or
                     [(r["step"], r["loss"]) for r in train], "final": evals[-1], "meta": meta}


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


def data_note(meta: dict) -> str:
    d = meta.get("data") or {}
    src = d.get("sources") or {}
    if not src:
        return d.get("description", "")
    train = sum(s["tokens"] for s in src.values())
    return (f"data: {d['root']} ({d['description']}): training tokens " +
            ", ".join(f"{n} {s['tokens'] / 1e6:.2f}M" for n, s in src.items()) + f" = {train / 1e6:.2f}M, held out " +
            ", ".join(f"{n} {s['val_tokens'] / 1e6:.2f}M" for n, s in src.items()) +
            "; mixture weights " + "/".join(f"{s['weight']:g}" for s in src.values()))


def origin(meta: dict) -> dict:
    """The runs' own date, device, torch, commit and command for RESULTS.md: with --report-only they
    ran on another machine than the one writing the table."""
    from bench.results import commit

    out = {k: meta[k] for k in ("date", "device", "torch", "commit", "command")}
    if out["commit"] == "unknown":
        out["commit"] = f"{commit()} (of the checkout that made the table: the runs recorded none)"
    return out


def notes(results: dict[str, dict], args, chart_name: str | None) -> str:
    metas = {n: r["meta"] for n, r in results.items() if r["meta"]}
    first = next(iter(metas.values()), {})
    models = " / ".join(sorted({m["model"] for m in metas.values()}))
    devices = sorted({m["device"] for m in metas.values()})
    eval_tokens = first.get("data", {}).get("eval_tokens_per_source")
    parts = [f"experiment={first.get('experiment', args.experiment)}" + (f", models {models}" if models else ""),
             f"{args.steps} steps" if args.steps else "",
             "every run in its own process, same seed and batches; validation loss at the last step, per source and "
             "over all sources" + (f", on the same {eval_tokens:,} held-out tokens of each source" if eval_tokens else ""),
             data_note(first),
             "wall time per run (start-up included) " + ", ".join(f"{n} {m['wall_s']:.0f} s" if m.get("wall_s") is not None
                                                   else f"{n} not recorded" for n, m in metas.items())
             if metas else "",
             f"runs on {' and '.join(devices)}" if len(devices) > 1 else "",
             f"table and chart made from the run folders by `python {' '.join(sys.argv)}`" if args.report_only else "",
             f"chart: [{chart_name}]({chart_name})" if chart_name else ""]
    return "; ".join(p for p in parts if p)


def main(argv=None) -> dict:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
        work = Path(args.work_dir or tmp)
        if args.report_only:
            names = [n for n in args.runs if (work / n / "metrics.jsonl").is_file()]
            if not names:
                raise SystemExit(f"no run folder of {args.runs} with a metrics.jsonl in {work}")
            results = {name: read(work / name) for name in names}
        else:
            results = {name: read(train(name, args, work)) for name in args.runs}
    header, rows = table(results)
    from bench.charts import beside_results, chart

    stem = "quality_loss" if args.size == "tiny" else f"quality_loss_{args.size}"  # tiny: the chart RESULTS.md links
    args.chart = args.chart or str(beside_results(stem))
    drawn = chart(Path(args.chart), "training loss, same tokens", "tokens", "train loss",
                  {RUNS[n][2]: r["train"] for n, r in results.items()}, logx=False)
    # run folders made before quality_run.json existed: this machine's provenance
    meta = next((r["meta"] for r in results.values() if r["meta"]), None) or provenance()
    append("Quality: RetNet against a Transformer of the same size (bench/quality.py)", header, rows,
           notes(results, args, Path(args.chart).name if drawn else None), save=not args.no_save, origin=origin(meta))
    return results


if __name__ == "__main__":
    main()
