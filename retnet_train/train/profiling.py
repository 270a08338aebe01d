"""torch.profiler over chosen training steps (logging.profile.*): where a step's device time goes.

For the profiled ranks, ${run_dir}/profile/ gets
  kernels_rank<R>.txt   device time per step by kernel family (matmul, retention, attention, norm +
                        gate, loss, optimizer, communication, copies, compiled / eager elementwise,
                        other) and the kernels that take the most time, by name; on a GPU also how
                        long the device waited for the host, and its largest idle gaps;
  trace_rank<R>.json    the Chrome / Perfetto trace of the profiled steps (logging.profile.trace).
On a GPU it counts the device's kernels; on a CPU (no kernels) the operators' own CPU time.
A profile is for reading: the figures that matter go to bench/RESULTS.md through bench/.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# (family, pattern) in the order they are tried against a kernel's (or operator's) name, lower case
FAMILIES = (
    ("retention", r"segment_states|segment_outputs|intra_scores|recurrent_kernel|chunk_.*kernel|fused_recurrent"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("norm + gate", r"norm_gate"),
    ("loss", r"cross_entropy|liger|nll_loss|log_softmax|_ce_"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("communication", r"nccl|gloo|all_?reduce|reduce_scatter|all_?gather|broadcast"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|triton_tem_|^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("compiled elementwise", r"^triton_(poi|red|per)_"),  # inductor's fused kernels (their names list ops)
    ("copies", r"memcpy|memset|copy|^aten::(fill_|zero_|cat|to|_to_copy)$|catarray"),
    ("elementwise", r"elementwise|vectorized|reduce_kernel|unrolled|^aten::"),
)
_COMPILED = [(family, re.compile(pattern)) for family, pattern in FAMILIES]


def kernel_family(name: str) -> str:
    """The family of a kernel or operator name (see FAMILIES); "other" when none matches."""
    low = name.lower()
    return next((family for family, pattern in _COMPILED if pattern.search(low)), "other")


def kernel_table(times: dict[str, tuple[float, int]], steps: int, top: int, header: str,
                 unit: str = "kernels", wall_ms: float | None = None) -> str:
    """times: name -> (total ms, calls) over `steps` steps -> the report text (per step).

    wall_ms: the window's wall time per step, if known: the report then says how long the device
    waited within a step (wall minus the kernels' sum, which is their busy time on one stream), the
    time a host that falls behind the GPU costs (a sync per step, the loop's own work)."""
    busy = sum(ms for ms, _ in times.values()) / steps
    calls = sum(n for _, n in times.values()) / steps
    families: dict[str, float] = defaultdict(float)
    for name, (ms, _) in times.items():
        families[kernel_family(name)] += ms / steps
    lines = [f"{header}: {busy:.2f} ms per step in {calls:.0f} {unit}"]
    if wall_ms is not None:
        idle = max(0.0, wall_ms - busy)
        lines.append(f"wall {wall_ms:.2f} ms per step: the device waited {idle:.2f} ms of it "
                     f"({idle / wall_ms if wall_ms else 0:.1%}; the profiler's own host work included)")
    lines += ["", f"{'family':<22} {'ms/step':>9} {'share':>7}"]
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        lines.append(f"{family:<22} {ms:9.2f} {ms / busy if busy else 0:7.1%}")
    lines += ["", f"{'ms/step':>9} {'calls/step':>10}  family / kernel"]
    for name, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms / steps:9.3f} {n / steps:10.1f}  {kernel_family(name)} / {name}")
    return "\n".join(lines) + "\n"


MIN_GAP_US = 20.0  # the shortest idle gap of the device the report lists


def _on_device(e) -> bool:
    """A profile event that is device work: a kernel, copy or set on the GPU's timeline. A
    record_function range (e.g. "Optimizer.step#AdamW.step") also appears there, as a span over the
    kernels launched inside it: counted, those kernels would count twice (the optimizer's 16 ms once
    more in a 255 ms step of retnet_1.3b, and the device's wait that much too short; before
    2026-12-07's fix)."""
    return e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


def event_times(prof, device: torch.device) -> dict[str, tuple[float, int]]:
    """name -> (ms, calls) of a finished profile: device kernels on CUDA (not ranges: _on_device),
    else operators' self CPU time."""
    times = {}
    for e in prof.key_averages():
        if device.type == "cuda" and _on_device(e):
            times[e.key] = (e.self_device_time_total / 1e3, e.count)
        elif device.type != "cuda" and e.device_type != torch.autograd.DeviceType.CUDA and e.self_cpu_time_total > 0:
            times[e.key] = (e.self_cpu_time_total / 1e3, e.count)
    return times


def device_gaps(events, min_us: float = MIN_GAP_US) -> list[tuple[float, float, str, str]]:
    """Where the GPU ran no kernel, from a finished profile's events (prof.events()): (gap us, its
    start in us after the first kernel began, the kernel before, the kernel after) for every gap of
    at least min_us, in time order. Kernels on several streams count as busy while any runs;
    record_function ranges on the GPU timeline are not kernels (_on_device)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if _on_device(e))
    if not spans:
        return []
    origin, end, last = spans[0][0], spans[0][1], spans[0][2]
    gaps = []
    for start, stop, name in spans[1:]:
        if start - end >= min_us:
            gaps.append((start - end, end - origin, last, name))
        if stop > end:
            end, last = stop, name
    return gaps


def gap_lines(gaps: list[tuple[float, float, str, str]], steps: int, top: int, min_us: float = MIN_GAP_US) -> str:
    """The report's lines on the device's idle gaps: their count and time per step, the largest ones."""
    total_ms = sum(g for g, *_ in gaps) / 1e3 / steps
    lines = ["", f"device idle gaps of {min_us:.0f} us or more: {len(gaps) / steps:.0f} per step, {total_ms:.2f} ms "
                 "per step; the largest (where in the window, after which kernel, before which):"]
    for gap, at, before, after in sorted(gaps, reverse=True)[:top]:
        lines.append(f"{gap / 1e3:9.3f} ms at {at / 1e3:9.2f} ms  after {before[:60]}  before {after[:60]}")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StepProfiler:
    """Starts torch.profiler before step `start` (1-based), stops after `steps` steps, writes the report.

    cfg: logging.profile (start, steps, ranks, trace, top). Does nothing where start is 0 or this
    rank is not listed."""

    def __init__(self, cfg, run_dir, rank: int, device: torch.device):
        self.start, self.steps, self.trace, self.top = int(cfg.start), int(cfg.steps), bool(cfg.trace), int(cfg.top)
        self.active = self.start > 0 and rank in list(cfg.ranks)
        self.rank, self.device = rank, device
        self.dir = Path(run_dir) / "profile"
        self.report = self.dir / f"kernels_rank{rank}.txt"
        self.prof = None
        self.first = None
        self.began = 0.0

    def step_begins(self, step: int) -> None:
        if not self.active or self.prof is not None or not (self.start <= step < self.start + self.steps):
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.start()
        self.first = step
        self.began = time.perf_counter()  # after the start: its set-up is not the steps' time

    def step_ended(self, step: int) -> None:
        if self.prof is not None and step >= self.start + self.steps - 1:
            self.finish(step)

    def finish(self, last: int | None = None) -> Path | None:
        """Stop and write (also for a run that ends inside the window); the report's path or None."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - self.began) * 1e3  # before the stop, which digests the events
        self.prof.stop()
        prof, first, self.prof, self.active = self.prof, self.first, None, False
        last = last if last is not None else first
        n = max(1, last - first + 1)
        self.dir.mkdir(parents=True, exist_ok=True)
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        header = f"steps {first}-{last} on rank {self.rank} ({where})"
        unit = "kernels" if self.device.type == "cuda" else "operators"
        # on a CPU the operators' times overlap their callers' and the host is the device: no wall line
        wall = wall_ms / n if self.device.type == "cuda" else None
        text = kernel_table(event_times(prof, self.device), n, self.top, header, unit, wall)
        if self.device.type == "cuda":  # where in the steps the device waited
            text += gap_lines(device_gaps(prof.events()), n, self.top)
        _write(self.report, text)
        if self.trace:
            tmp = self.dir / f"trace_rank{self.rank}.json.tmp"
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, self.dir / f"trace_rank{self.rank}.json")
        log.info("profile of %s: %s", header, self.report)
        return self.report
