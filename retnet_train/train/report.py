"""`python -m retnet_train.train.report RUN_DIR [--plot [--plot-dir DIR]]`: how a finished run did,
next to a unigram baseline.

Prints the first and last training loss, the final validation loss and perplexity per source, and
the unigram entropy of the training data (the loss of a model that ignores context): a language
model that learned anything ends well below it. --plot also writes PNG curves (train loss,
validation loss per source, LR, tokens/s, memory) to RUN_DIR/plots (needs matplotlib, the dev extra).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def unigram_entropy(cfg, n_tokens: int = 500_000) -> float:
    """Entropy (nats) of the token distribution of the first n_tokens the training stream yields."""
    from .data import build_train_stream

    vocab = cfg.model.vocab_size
    stream = build_train_stream(cfg.trainer, cfg.data, vocab, 0, 1)
    counts = torch.zeros(vocab, dtype=torch.float64)
    seen = 0
    for batch in stream:
        y = batch["labels"]
        y = y[y >= 0]
        counts += torch.bincount(y, minlength=vocab).double()
        seen += y.numel()
        if seen >= n_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def report(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in recs if "event" not in r and "loss" in r]
    evals = [r for r in recs if "val/loss" in r]
    h = unigram_entropy(cfg)
    out = {"unigram_entropy": h, "first_loss": train[0]["loss"] if train else None,
           "last_loss": train[-1]["loss"] if train else None, "final_eval": evals[-1] if evals else None}
    print(f"run {run_dir}: {train[-1]['step'] if train else 0} steps, {train[-1]['tokens'] if train else 0:,} tokens")
    if train:
        print(f"  train loss          {train[0]['loss']:.3f} (step {train[0]['step']}) -> "
              f"{train[-1]['loss']:.3f} (step {train[-1]['step']})")
    if evals:
        e = evals[-1]
        sources = sorted(k[4:-5] for k in e if k.endswith("/loss") and k != "val/loss")
        print(f"  validation loss     {e['val/loss']:.3f} nats/token, perplexity {e['val/ppl']:.1f} (step {e['step']})")
        for s in sources:
            print(f"    {s:<16}  {e[f'val/{s}/loss']:.3f}  ppl {e[f'val/{s}/ppl']:.1f}")
    print(f"  unigram entropy     {h:.3f} nats/token (perplexity {math.exp(h):.1f}) of the training data")
    if evals:
        print(f"  -> validation loss is {h - evals[-1]['val/loss']:.3f} nats below the unigram entropy")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .plots import PlotError, plot_run

    p = argparse.ArgumentParser(prog="python -m retnet_train.train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--plot", action="store_true", help="also write PNG curves")
    p.add_argument("--plot-dir", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"error: no metrics.jsonl in {run_dir}: not a run directory, or a run that logged nothing yet",
              file=sys.stderr)
        return 2
    if a.plot:
        try:
            for path in plot_run(run_dir, a.plot_dir):
                print(f"chart: {path}")
        except PlotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not (run_dir / "config.yaml").is_file():  # the baseline needs the run's data config
            print(f"no config.yaml in {run_dir}: charts only, no report")
            return 0
    report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
