"""PNG curves of a run from its metrics.jsonl: train loss, validation loss per source, LR,
tokens/s and peak memory, against the step (`report RUN_DIR --plot`)."""

from __future__ import annotations

import json
from pathlib import Path


class PlotError(RuntimeError):
    pass


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics.jsonl in {run_dir}: not a run directory, or a run that logged nothing yet")
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the others still tell the story
            continue
    return recs


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install -e '.[dev]' (the dev extra) or pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


# (file stem, record key, y label): one chart per train metric
TRAIN_CURVES = [
    ("train_loss", "loss", "loss (nats/token)"),
    ("lr", "lr", "learning rate"),
    ("tokens_per_s", "tokens_per_s", "tokens/s"),
    ("memory", "mem_gib", "peak memory (GiB)"),
]


def _save(plt, fig, ax, path: Path, title: str, ylabel: str) -> Path:
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs (into out_dir, default RUN_DIR/plots) and return their paths. Train records
    are those without an "event" key; validation records carry "val/loss"."""
    run_dir = Path(run_dir)
    recs = read_records(run_dir)
    train = [r for r in recs if "event" not in r and "loss" in r and "step" in r]
    evals = [r for r in recs if "val/loss" in r and "step" in r]
    if not train and not evals:
        raise PlotError(f"{run_dir / 'metrics.jsonl'} holds no train or validation records")
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, key, ylabel in TRAIN_CURVES:
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s for s, _ in pts], [v for _, v in pts], label="train" if key == "loss" else None)
        if key == "loss" and evals:  # the validation mean beside it: over- or under-fitting at a glance
            ax.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], marker="o", label="validation")
        written.append(_save(plt, fig, ax, out / f"{stem}.png", f"{run_dir.name}: {ylabel}", ylabel))
    if evals:
        sources = sorted({k[4:-5] for r in evals for k in r if k.startswith("val/") and k.endswith("/loss")
                          and k != "val/loss"})
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in sources:
            pts = [(r["step"], r[f"val/{s}/loss"]) for r in evals if f"val/{s}/loss" in r]
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=s)
        ax.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], marker="o", linestyle="--",
                color="black", label="all sources")
        written.append(_save(plt, fig, ax, out / "val_loss.png", f"{run_dir.name}: validation loss per source",
                             "loss (nats/token)"))
    return written
