"""Append a benchmark's table to bench/RESULTS.md with date, device, commit and command."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    import os

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def commit() -> str:
    """The checked-out commit, "+changes" when tracked files differ from it (a tree copied onto a
    machine with an older .git reads as its old commit otherwise); RETNET_COMMIT overrides."""
    import os

    if os.environ.get("RETNET_COMMIT"):
        return os.environ["RETNET_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent)
        head = out.stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, cwd=RESULTS.parent)
        return head + ("+changes" if dirty.returncode == 1 else "")
    except OSError:
        return "unknown"


def launcher() -> list[str]:
    """How this process was started: torchrun sets LOCAL_WORLD_SIZE and WORLD_SIZE for its workers."""
    import os

    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:
        return ["python"]
    nodes = int(os.environ.get("WORLD_SIZE", local)) // int(local)
    return ["torchrun"] + (["--nnodes", str(nodes)] if nodes > 1 else []) + ["--nproc_per_node", local]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance() -> dict[str, str]:
    """Where and how this process runs: date, device, torch, commit, command."""
    return {"date": datetime.date.today().isoformat(), "device": device_name(), "torch": torch.__version__,
            "commit": commit(), "command": " ".join(launcher() + sys.argv)}


def append(title: str, header: list[str], rows: list[list], notes: str = "", save: bool = True,
           origin: dict[str, str] | None = None) -> str:
    """Print the table and (unless save=False) append it, with its provenance, to bench/RESULTS.md.
    origin: the provenance of runs made elsewhere (a table built here from another machine's runs);
    default: this process's."""
    p = origin or provenance()
    table = markdown_table(header, rows)
    block = (f"\n## {title}\n\n- date: {p['date']}\n- device: {p['device']}\n- torch: {p['torch']}\n"
             f"- commit: {p['commit']}\n- command: `{p['command']}`\n" + (f"- notes: {notes}\n" if notes else "")
             + "\n" + table + "\n")
    print(table)
    if not save:
        return block
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
    with open(RESULTS, "a") as f:
        f.write(block)
    return block
