"""What holds GPU memory at a training run's peak (or at its out-of-memory error), by source line.

    python bench/memory_snapshot.py --experiment retnet_1.3b_128k trainer.compile=true --out snap.pickle
    python bench/memory_snapshot.py --preset retnet_1.3b --seq-len 8192 --tokens-per-step 16384

Runs one configuration of bench/train_throughput.py (same flags, same trainer) with torch's CUDA
allocator history recorded, then replays the allocation trace: the moment the most bytes were live
is the peak (at an out-of-memory error, the moment before it). The live blocks at that moment are
grouped by the innermost frame of our own code that allocated them (else of fla, DeepSpeed or
torch), and the largest groups printed. `--out` keeps the raw snapshot for pytorch.org/memory_viz.
Prints only: it is for finding where memory goes; figures for issues go to RESULTS.md through the
throughput bench.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the first frame from one of these (in this order) names an allocation
# (torchinductor_: the generated code of compiled blocks, under /tmp/torchinductor_<user>/)
OWNERS = ("/retnet_train/", "/fla/", "/liger_kernel/", "torchinductor_", "/deepspeed/", "/torch/")


def owner(frames: list[dict]) -> str:
    """file:line function of the innermost frame of the first matching package (frames innermost first)."""
    for package in OWNERS:
        for f in frames:
            if package in f.get("filename", ""):
                name = f["filename"].split(package, 1)[1]
                return f"{package.strip('/')}/{name}:{f.get('line', '?')} {f.get('name', '')}"
    return "(no python frame)"


def _replay(trace: list[dict], stop: int) -> tuple[int, int, dict[int, dict]]:
    """alloc / free_completed events up to index `stop` (exclusive) or an 'oom' event:
    (index of the event with the most bytes live, those bytes, the blocks {addr: event} live at the end)."""
    live: dict[int, dict] = {}
    total = best = 0
    best_at = -1
    for i, ev in enumerate(trace[:stop]):
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_at = total, i
        elif action == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
        elif action == "oom":
            return i, total, live
    return best_at, best, live


def peak_live(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """(peak live bytes, the live blocks {addr: event} then). An 'oom' event ends the replay: what
    was live when the allocation failed is the answer. Two linear passes: the first finds the peak's
    event, the second stops just after it (copying the live set at every new peak would be
    quadratic in a trace of millions of events)."""
    at, peak, live = _replay(trace, len(trace))
    if at < 0 or trace[at].get("action") == "oom":
        return peak, live
    return peak, _replay(trace, at + 1)[2]


def by_owner(blocks: dict[int, dict]) -> list[tuple[str, int, int]]:
    """[(owner, bytes, count)], largest first."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in blocks.values():
        s = sums[owner(ev.get("frames", []))]
        s[0] += ev["size"]
        s[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in sums.items()), key=lambda r: -r[1])


def report(snapshot: dict, top: int) -> str:
    lines = []
    for device, trace in enumerate(snapshot.get("device_traces", [])):
        if not trace:
            continue
        ooms = sum(ev.get("action") == "oom" for ev in trace)
        peak, blocks = peak_live(trace)
        what = "at the out-of-memory error" if ooms else "at the peak"
        lines.append(f"device {device}: {peak / 2**30:.2f} GiB live {what} (the trace's own allocations; "
                     f"{len(trace)} events)")
        lines.append("| GiB | blocks | allocated at |")
        lines.append("|---|---|---|")
        for name, size, count in by_owner(blocks)[:top]:
            lines.append(f"| {size / 2**30:.2f} | {count} | {name} |")
    return "\n".join(lines) or "no allocation trace recorded (no CUDA device?)"


def main(argv=None) -> None:
    from bench import train_throughput as tt

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None, help="write the raw snapshot (pickle) here")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--max-entries", type=int, default=2_000_000, help="allocator events kept")
    own, rest = p.parse_known_args(argv)
    args = tt.parse([*rest, "--no-save"])
    if args.experiment:
        config = (tt.experiment_key(args.experiment[0]), None)
    else:
        config = (args.preset[0], args.seq_len[0])

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/memory_snapshot.py records the CUDA allocator: it needs a GPU")
    # python frames only: C++ stacks make the snapshot take minutes to symbolise
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=own.max_entries)
    row = tt.measure_safely(*config, args)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print({k: row.get(k) for k in ("preset", "seq_len", "tokens_per_s", "peak_mem_gib", "error") if k in row})
    if own.out:
        Path(own.out).write_bytes(pickle.dumps(snapshot))
    print(report(snapshot, own.top))


if __name__ == "__main__":
    main()
