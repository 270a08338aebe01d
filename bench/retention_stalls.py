"""Nsight Compute's view of each launch of one forward + backward of our retention kernels, by role.

    python bench/retention_stalls.py [--shapes 8x2048,2x8192] [--keep both] [--ncu ncu]

bench/retention_launches.py says how long each launch takes; this asks the hardware counters why:
for each role, the kernel's duration, its DRAM, L2 and SM throughput as a share of the GPU's peak,
achieved occupancy, and where its warps wait (the stall reasons with the most warps per issued
instruction: long_scoreboard is a wait on global memory, barrier on __syncthreads, wait on a fixed
latency, math_pipe_throttle on a busy pipe, ...). It runs `ncu` on itself in a target mode that
launches the recorded launches twice (the first run compiles and is skipped), with the GPU's clocks
left alone (`--clock-control none`), exports a report and reads it back as CSV. Needs Nsight
Compute's `ncu` and a machine where it may read the counters. Shapes of RetNet-1.3B: 8 heads,
d_k 256, d_v 512, bf16.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from bench.retention_launches import recorded_launches  # noqa: E402
from retnet_train.model.config import RetentionKeep  # noqa: E402
from retnet_train.model.kernels import retention_launch as L  # noqa: E402
from retnet_train.model.kernels.retention_triton import keep_tuning  # noqa: E402

KERNELS = ("intra_scores_kernel", "segment_states_kernel", "segment_outputs_kernel")
# regular expressions over ncu's metric names: any that a GPU or ncu version lacks matches nothing
# instead of failing the run (a named metric that does not exist stops ncu)
THROUGHPUT = {
    "us": r"^gpu__time_duration\.sum$",
    "DRAM %": r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    "L2 %": r"^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    "SM %": r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    "occupancy %": r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$",
}
# where warps wait: warps per issued instruction by reason, or, where a GPU lacks those, the reasons
# of PC samples (counts)
STALL_FAMILIES = (("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio", "warps per issue"),
                  ("smsp__pcsamp_warps_issue_stalled_", "", "% of samples"))
STALLS = (r"^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$",
          r"^smsp__pcsamp_warps_issue_stalled_[a-z_]+$")
TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def tuning_for(keep: str) -> L.Tuning:
    return L.with_tuning(keep_tuning(keep), 64)


def roles(B: int, T: int, keep: str) -> list[str]:
    """The roles of the launches, in launch order (recorded on meta tensors: nothing runs)."""
    return [role for role, _ in recorded_launches(B, T, tuning_for(keep), torch.device("meta"))]


def ncu_command(ncu: str, B: int, T: int, keep: str, report: Path) -> list[str]:
    """ncu on this script's target mode: skip the first run's launches (compilation), profile the second."""
    n = len(roles(B, T, keep))
    metrics = ",".join(f"regex:{r}" for r in (*THROUGHPUT.values(), *STALLS))
    return [ncu, "--clock-control", "none", "--kernel-name", f"regex:^({'|'.join(KERNELS)})$",
            "--launch-skip", str(n), "--launch-count", str(n), "--metrics", metrics, "--export", str(report),
            "--force-overwrite", sys.executable, str(Path(__file__).resolve()), "--target", f"{B}x{T}",
            "--keep", keep]


def run_target(B: int, T: int, keep: str) -> None:
    """Launch one forward + backward's launches twice (what ncu profiles)."""
    launches = recorded_launches(B, T, tuning_for(keep), torch.device("cuda"))
    for _ in range(2):
        for _, launch in launches:
            launch()
    torch.cuda.synchronize()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw_csv(text: str) -> list[dict[str, tuple[float, str]]]:
    """`ncu --import REPORT --csv --page raw` -> one dict per profiled kernel, in launch order:
    metric name -> (value, unit), plus "Kernel Name" -> (nan, name). A units row after the header
    (its ID cell empty) gives the units; lines before the header (ncu's own messages) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"no CSV header (a line starting with \"ID\") in ncu's output: {text[:300]!r}")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], rows[1:]
    units = {}
    if body and not body[0][0].strip():
        units = dict(zip(header, body[0]))
        body = body[1:]
    kernels = []
    for row in body:
        if len(row) != len(header):
            continue
        record = dict(zip(header, row))
        out = {"Kernel Name": (float("nan"), record.get("Kernel Name", ""))}
        for name, value in record.items():
            number = _number(value)
            if number is not None and "__" in name:
                out[name] = (number, units.get(name, ""))
        kernels.append(out)
    return kernels


def summarize(kernel: dict[str, tuple[float, str]], top: int = 3) -> dict[str, str]:
    """One table row's cells: the throughput columns and the `top` stall reasons."""
    cells = {}
    for column, pattern in THROUGHPUT.items():
        hit = next(((v, u) for name, (v, u) in kernel.items() if re.match(pattern, name)), None)
        if hit is None:
            cells[column] = ""
        elif column == "us":
            scale = TIME_UNITS.get(hit[1])
            cells[column] = f"{hit[0] * scale:.0f}" if scale else f"{hit[0]:g} {hit[1]}".strip()
        else:
            cells[column] = f"{hit[0]:.0f}"
    cells["stalls"] = ""
    for prefix, suffix, unit in STALL_FAMILIES:
        # "<reason>_not_issued" variants count the same waits again, for warps that did not issue
        stalls = sorted(((v, name[len(prefix):len(name) - len(suffix)]) for name, (v, _) in kernel.items()
                         if name.startswith(prefix) and name.endswith(suffix)
                         and not name.endswith("_not_issued" + suffix)), reverse=True)
        total = sum(v for v, _ in stalls)
        if total > 0:
            scale = 100 / total if unit.startswith("%") else 1.0
            top_reasons = ", ".join(f"{reason} {v * scale:.1f}" for v, reason in stalls[:top] if v > 0)
            cells["stalls"] = f"{top_reasons} ({unit}; all {total * scale:.1f})"
            break
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x T, comma-separated")
    p.add_argument("--keep", default="both", choices=RetentionKeep.values(), help="model.retention_keep")
    p.add_argument("--ncu", default="ncu", help="Nsight Compute's command line")
    p.add_argument("--target", help=argparse.SUPPRESS)  # B x T: run the launches (under ncu)
    args = p.parse_args()
    if args.target:
        B, T = (int(n) for n in args.target.split("x"))
        return run_target(B, T, args.keep)
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    if shutil.which(args.ncu) is None:
        raise SystemExit(f"--ncu {args.ncu!r}: not found (Nsight Compute's ncu; give its path)")
    header = ["shape", "role", "kernel", *THROUGHPUT, "stalls"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            B, T = (int(n) for n in shape.split("x"))
            report = Path(tmp) / f"retention_{B}x{T}.ncu-rep"
            run = subprocess.run(ncu_command(args.ncu, B, T, args.keep, report), capture_output=True, text=True)
            if run.returncode != 0 or not report.exists():
                raise SystemExit(f"ncu failed on {shape} (exit {run.returncode}):\n"
                                 f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
            raw = subprocess.run([args.ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units",
                                  "base"], capture_output=True, text=True, check=True).stdout
            kernels = parse_raw_csv(raw)
            names = roles(B, T, args.keep)
            if len(kernels) != len(names):
                raise SystemExit(f"{shape}: ncu profiled {len(kernels)} kernels, the op launches {len(names)}")
            for role, kernel in zip(names, kernels):
                cells = summarize(kernel)
                rows.append([f"{B} x {T}", role, kernel["Kernel Name"][1], *(cells[c] for c in header[3:])])
                print(" | ".join(rows[-1]), flush=True)
    append("Retention kernels under Nsight Compute, launch by launch (bench/retention_stalls.py)", header, rows,
           notes=f"retention_keep={args.keep}; 8 heads, d_k 256, d_v 512, bf16; ncu --clock-control none, the "
                 "second of two runs of the op's launches; throughput as % of peak (elapsed), occupancy as % of "
                 "the active warps' peak; stalls: the three largest reasons in warps per issued instruction "
                 "(smsp__average_warps_issue_stalled_<reason>_per_issue_active) and their sum over all reasons, "
                 "or where the GPU has no such metrics, in % of PC samples")


if __name__ == "__main__":
    main()
