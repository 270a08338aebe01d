"""Rank 0's outputs: the console line, run_dir/metrics.jsonl, and wandb (see wandb_run.py)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("retnet_train")


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(r: dict[str, Any], max_steps: int) -> str:
    gn = r.get("grad_norm")
    parts = [
        f"step {r['step']:>{len(str(max_steps))}}/{max_steps}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {gn:.3f}" if gn is not None and math.isfinite(gn) else f"gnorm {gn if gn is not None else '-'}",
        f"{_fmt_count(r['tokens_per_s'])} tok/s",
        f"mfu {100 * r['mfu']:.1f}%",
        f"mem {r['mem_gib']:.1f}GiB",
        f"tokens {_fmt_count(r['tokens'])}",
        f"eta {_fmt_eta(r['eta_s'])}",
    ]
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)


class MetricsWriter:
    """metrics.jsonl + console + wandb, on rank 0 only (other ranks get a writer that does nothing)."""

    def __init__(self, run_dir: str | Path, enabled: bool, console: bool, max_steps: int, wandb_run=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.console, self.max_steps, self.wandb = enabled, console, max_steps, wandb_run

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so the file reads like one run."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
        if self.wandb is not None:
            self.wandb.log(record)

    def train(self, record: dict[str, Any]) -> None:
        self.write(record)
        if self.enabled and self.console:
            log.info(console_line(record, self.max_steps))

    def eval(self, record: dict[str, Any]) -> None:
        self.write(record)
        if self.enabled and self.console:
            per_source = "  ".join(f"{k[4:-5]} {v:.4f}" for k, v in record.items()
                                   if k.startswith("val/") and k.endswith("/loss") and k != "val/loss")
            log.info(f"eval step {record['step']} | val loss {record['val/loss']:.4f} | "
                     f"val ppl {record['val/ppl']:.2f} | {per_source}")

    def event(self, record: dict[str, Any], message: Optional[str] = None, warn: bool = False) -> None:
        self.write(record)
        if self.enabled and message:
            (log.warning if warn else log.info)(message)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
