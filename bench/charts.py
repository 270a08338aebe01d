"""Charts of the benchmarks: a PNG beside bench/RESULTS.md wherever a curve says more than the table.
matplotlib is optional here (the dev extra): without it a benchmark still prints and saves its table."""

from __future__ import annotations

from pathlib import Path

from bench.results import RESULTS


def beside_results(stem: str) -> Path:
    """Where a benchmark's chart goes: next to RESULTS.md, which links it by name."""
    return RESULTS.parent / f"{stem}.png"


def chart(path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
          logx: bool = True, logy: bool = False, point_labels: dict[str, list[str]] | None = None) -> bool:
    """One line per series (points whose y is None are left out); point_labels: a text beside each
    point of a series (one per point, as given); False, with a message, where matplotlib is not
    installed or there is nothing to draw."""
    texts = {label: [t for t, (_, y) in zip((point_labels or {}).get(label, [None] * len(pts)), pts) if y is not None]
             for label, pts in series.items()}
    series = {label: [(x, y) for x, y in pts if y is not None] for label, pts in series.items()}
    if not any(series.values()):
        print(f"nothing to draw: no chart written ({path})")
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not installed: no chart written ({path})")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
            for text, point in zip(texts[label], pts):
                if text:
                    ax.annotate(text, point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart: {path}")
    return True
