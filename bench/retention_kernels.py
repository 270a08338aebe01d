"""Time retention's kernels (and causal SDPA for reference), forward and forward + backward.

    python bench/retention_kernels.py [--tokens 16384,32768] [--lengths 2048,8192,32768] [--sweep] [--rounds 5]

Same token count per call at every length (batch = tokens / T): chunkwise retention should cost the
same at any T, attention grows with T. Shapes of RetNet-1.3B (8 heads, d_k 256, d_v 512) and of the
Transformer baseline (16 heads x 128). Rows: every fla retention path that imports (skipped ones
are printed), our Triton kernels at a few tile configurations, the torch chunkwise form (T <= 8192,
16k tokens), SDPA. Forward + backward is timed three ways, single calls (host launch time shows
where the GPU waits for it), queued calls (the host runs ahead, as in training) and CUDA-graph
replays (the kernels alone), beside the host's own time per call. TFLOP/s counts the same useful
work for every retention row: forward 2*T*(64*(d_k + d_v) + 2*d_k*d_v) per head (chunk 64: in-chunk
QK^T and PV, q.S, k^T v), backward 2x that.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from retnet_train.model.retention import chunkwise_retention, head_log_decays  # noqa: E402

H, DK, DV = 8, 256, 512


TIMINGS = ("single", "queued", "graphed", "host")


def time_ms(fn, warmup=3, reps=10, mode: str = "single") -> float:
    """GPU milliseconds per call of fn. "single": the median of `reps` calls, each between its own
    events with the GPU idle before it, so the host's launch time shows wherever the GPU waits for
    it. "queued": `reps` calls back to back between one pair of events, their mean: the host runs
    ahead as in a training step, unless it needs longer per call than the GPU. "graphed": one call
    captured in a CUDA graph and replayed `reps` times between one pair of events, their mean: the
    kernels' own time, whatever the host needs (our op's eight launches and custom-op dispatch,
    fla's dozen kernels). "host": the host's own milliseconds per call, `reps` calls back to back
    timed on the host clock before waiting for the GPU; where it comes near "queued", the host
    sets the queued pace."""
    if mode not in TIMINGS:
        raise ValueError(f"time_ms: mode {mode!r} is not one of {TIMINGS}")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if mode == "graphed":
        return _graphed_ms(fn, warmup, reps)
    if mode == "host":
        host, _ = back_to_back_s(fn, reps)
        return 1000 * host / reps
    if mode == "queued":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def back_to_back_s(fn, reps: int, sync=None) -> tuple[float, float]:
    """`reps` calls of fn back to back on the host clock: (seconds until the host is done, before
    waiting for the GPU; seconds until the GPU is done too). sync: the wait (torch.cuda.synchronize)."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - start
    (sync or torch.cuda.synchronize)()
    return host, time.perf_counter() - start


def _graphed_ms(fn, warmup: int, reps: int) -> float:
    # capture needs the calls before it on a side stream (the allocator and autograd's streams settle
    # there), as torch.cuda.graph's documentation does it; the capture itself runs nothing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # the first replay uploads the graph: not timed
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure_rounds(entries: dict[str, tuple], rounds: int) -> dict[str, list[tuple[float, ...]]]:
    """name -> (fn, inputs, reps) gives name -> [(fwd, fwd+bwd, fwd+bwd queued, fwd+bwd graphed,
    fwd+bwd host) ms per round]. The
    entries take turns within each round, so a drift of the GPU's clocks during the run (10% between
    calls on one H100, bench/RESULTS.md 2026-12-07) moves every row alike and their ratios hold."""
    got: dict[str, list] = {name: [] for name in entries}
    for _ in range(rounds):
        for name, (fn, inputs, reps) in entries.items():
            got[name].append((measure(fn, inputs, False, reps), measure(fn, inputs, True, reps),
                              measure(fn, inputs, True, reps, mode="queued"),
                              measure(fn, inputs, True, reps, mode="graphed"),
                              measure(fn, inputs, True, reps, mode="host")))
    return got


def summarise(per_round: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The median of the rounds of each figure (fwd, fwd+bwd, queued, graphed, host), then the queued
    figure's spread, (max - min) / median in percent; a figure with a failed round is NaN (measure
    gives NaN for a failing path)."""
    columns = list(zip(*per_round))
    # a column with a failed round is NaN, the others stand (a path may run but not capture)
    medians = tuple(float("nan") if any(math.isnan(x) for x in col) else statistics.median(col) for col in columns)
    return *medians, 100 * (max(columns[2]) - min(columns[2])) / medians[2]


def retention_flop(tokens: int, backward: bool) -> float:
    fwd = 2 * tokens * H * (64 * (DK + DV) + 2 * DK * DV)
    return fwd * (3 if backward else 1)


def fla_paths(lg):
    """name -> f(q, k, v) -> o, for every fla retention kernel that imports; prints the skipped ones."""
    paths = {}
    g_gamma = lg.float().cuda()
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        paths["fla chunk_simple_gla"] = lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]
    except Exception as e:
        print(f"skipped fla chunk_simple_gla: {type(e).__name__}: {e}")
    # fla.ops.retention derives the decays from the head count (the paper's schedule, = ours for 8 heads)
    for name in ("chunk_retention", "fused_chunk_retention", "parallel_retention"):
        try:
            fn = getattr(__import__("fla.ops.retention", fromlist=[name]), name)
            paths[f"fla {name}"] = lambda q, k, v, fn=fn: fn(q, k, v, scale=1.0)[0]
        except Exception as e:
            print(f"skipped fla {name}: {type(e).__name__}: {e}")
    return paths


def ours_paths(lg, sweep: bool):
    try:
        from retnet_train.model.kernels import retention_triton as RT
        from retnet_train.model.kernels.retention_launch import Tuning
    except Exception as e:
        print(f"skipped our Triton kernels: {type(e).__name__}: {e}")
        return {}
    # each configuration compiles ~10 kernel variants: few by default
    # "triton keep both" is what the 1.3B preset trains with (model.retention_keep=both)
    configs = {"triton": Tuning(), "triton keep both": Tuning(keep_states=True, keep_scores=True)}
    if sweep:
        configs.update({"triton st3": Tuning(num_stages=3),
                        "triton w8": Tuning(num_warps=8),
                        "triton bz256 w8": Tuning(block_z=256, num_warps=8),
                        "triton c128": Tuning(chunk=128),
                        "triton seg512": Tuning(segment_chunks=8),
                        "triton sbt32": Tuning(states_bt=32),
                        "triton sbt128": Tuning(states_bt=128),
                        "triton sst3": Tuning(states_stages=3),
                        "triton states64x128": Tuning(state_block=(64, 128)),
                        "triton states128": Tuning(state_block=(128, 128)),
                        "triton states128x256": Tuning(state_block=(128, 256)),
                        "triton score128": Tuning(score_block=128),
                        "triton st3 sst3 score128": Tuning(num_stages=3, states_stages=3, score_block=128),
                        "triton keep": Tuning(keep_states=True),
                        "triton keep scores": Tuning(keep_scores=True)})
    return {name: (lambda q, k, v, t=t: RT.chunk_retention(q, k, v, lg, chunk_size=t.chunk, tuning=t)[0])
            for name, t in configs.items()}


def measure(fn, inputs, backward: bool, reps: int = 10, mode: str = "single") -> float:
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    seed = []  # the output's gradient, made once: its fill is not the kernel's time

    def fwd_bwd():
        for x in inputs:  # no gradient accumulation kernels in the timing
            x.grad = None
        out = fn(*inputs)
        if not seed:
            seed.append(torch.ones_like(out))
        out.backward(seed[0])

    try:
        return time_ms(fwd_bwd if backward else fwd, reps=reps, mode=mode)
    except Exception as e:  # one failing path must not cost the others' numbers
        print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return float("nan")


def profile(paths, tokens: int, T: int) -> None:
    """GPU time of one forward + backward by kernel family and by kernel (ms), after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from retnet_train.train.profiling import event_times, kernel_table

    B = max(tokens // T, 1)
    q, k, v = (torch.randn(B, T, H, d, device="cuda").bfloat16().requires_grad_() for d in (DK, DK, DV))
    for name, fn in paths.items():
        for _ in range(2):
            fn(q, k, v).backward(torch.ones(B, T, H, DV, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        q.grad = k.grad = v.grad = None
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(q, k, v).backward(torch.ones(B, T, H, DV, device="cuda", dtype=torch.bfloat16))
            torch.cuda.synchronize()
        print(kernel_table(event_times(prof, torch.device("cuda")), 1, 12, f"profile {name}, {B} x {T}"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="16384,32768")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--sweep", action="store_true", help="more Triton tile configurations (slower: compiles)")
    p.add_argument("--only", default=None,
                   help="comma-separated row names to run (e.g. 'fla chunk_simple_gla,triton'); default: all")
    p.add_argument("--rounds", type=int, default=5,
                   help="times each row is measured, the rows taking turns (the median is reported)")
    p.add_argument("--profile", action="store_true",
                   help="also print the GPU time per kernel of one forward + backward of each kernel family")
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    # on the GPU, as the model hands them over (RetNetBlock caches its decays per device): a CPU tensor
    # cost our rows a synchronising host-to-device copy per call (fla's row already had its decays on
    # the GPU), so the host could never run ahead and "queued" measured launch latency as well
    lg = head_log_decays(H).to(dev)
    # --only may name any row, the sweep's too (a row compiles only when it runs)
    paths = {**fla_paths(lg), **ours_paths(lg, args.sweep or bool(args.only))}
    paths["torch chunkwise"] = lambda q, k, v: chunkwise_retention(q, k, v, lg, chunk_size=64)[0]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in wanted if n not in paths and n != "causal SDPA 16x128"]
        if unknown:
            raise SystemExit(f"--only: unknown row(s) {unknown}; rows here: {sorted(paths)}")
        paths = {n: f for n, f in paths.items() if n in wanted}
    rows = []
    if args.profile:
        profile({n: f for n, f in paths.items() if n in ("fla chunk_simple_gla", "triton", "triton keep both")},
                int(args.tokens.split(",")[0]), int(args.lengths.split(",")[0]))
    for tokens in (int(x) for x in args.tokens.split(",")):
        for T in (int(x) for x in args.lengths.split(",")):
            B = max(tokens // T, 1)

            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_()

            q, k, v = rand(B, T, H, DK), rand(B, T, H, DK, scale=DK ** -0.5), rand(B, T, H, DV)
            entries = {name: (fn, (q, k, v), 3 if name == "torch chunkwise" else 10) for name, fn in paths.items()
                       if not (name == "torch chunkwise" and (T > 8192 or B * T > 16384))}
            qa, ka, va = (rand(B, 16, T, 128) for _ in range(3))
            entries["causal SDPA 16x128"] = (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                             (qa, ka, va), 10)
            sdpa_flop = 4 * B * 16 * T * T * 128 / 2  # causal: half of QK^T and PV
            flop = {name: (retention_flop(B * T, False), retention_flop(B * T, True)) for name in entries}
            flop["causal SDPA 16x128"] = (sdpa_flop, 3.5 * sdpa_flop)
            times = {name: summarise(r) for name, r in measure_rounds(entries, args.rounds).items()}
            fla = times.get("fla chunk_simple_gla")
            for name, (f_ms, fb_ms, fbq_ms, fbg_ms, host_ms, spread) in times.items():
                rows.append([B * T, T, B, name, f"{f_ms:.3f}", f"{fb_ms:.3f}", f"{fbq_ms:.3f}", f"{fbg_ms:.3f}",
                             f"{host_ms:.3f}",
                             f"{flop[name][0] / f_ms / 1e9:.0f}", f"{flop[name][1] / fb_ms / 1e9:.0f}",
                             *([f"{fla[i] / t:.2f}" for i, t in ((1, fb_ms), (2, fbq_ms), (3, fbg_ms))]
                               if fla else ["", "", ""]),
                             f"{spread:.0f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    notes = (f"bf16; retention 8 heads, d_k 256, d_v 512, keys pre-scaled (scale=1); {args.rounds} rounds, the "
             "rows taking turns within each, each figure the median of its rounds; per round: the median of 10 "
             "single calls (torch: 3), each from an idle GPU (host launch time included where the GPU waits for "
             "it), 'queued': the mean of 10 calls back to back (the host runs ahead, as in training, unless it "
             "needs longer per call than the GPU), and 'graphed': one call captured in a CUDA graph, the mean "
             "of 10 replays (the kernels' own time, no host in it); 'host': the host clock's time per call of 10 "
             "calls back to back, before waiting for the GPU; "
             "'x fla': fla chunk_simple_gla's time over the row's (same run); 'spread': (max - min) / median of "
             "the queued rounds; the output gradient is made once, outside the timing; "
             "TFLOP/s: retention counts 2*tokens*H*(64*(d_k+d_v) + 2*d_k*d_v) forward and 3x that "
             "forward+backward for every row; SDPA counts its causal half, backward 2.5x forward")
    # the curve: at a fixed token count, retention stays flat in T while attention grows
    from bench.charts import beside_results, chart

    most = max(r[0] for r in rows)
    series: dict[str, list] = {}
    for r in rows:
        if r[0] == most:
            series.setdefault(r[3], []).append((r[1], float(r[5])))
    path = beside_results("retention_kernels")
    if chart(path, f"retention vs attention, {most} tokens: forward + backward", "sequence length T",
             "ms", series, logy=True):
        notes += f"; chart: [{path.name}]({path.name})"
    append("Retention kernels, forward and forward + backward",
           ["tokens", "T", "batch", "kernel", "fwd (ms)", "fwd+bwd (ms)", "fwd+bwd queued (ms)",
            "fwd+bwd graphed (ms)", "fwd+bwd host (ms)", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "x fla fwd+bwd", "x fla queued",
            "x fla graphed", "queued spread (%)"], rows,
           notes=notes)


if __name__ == "__main__":
    main()
