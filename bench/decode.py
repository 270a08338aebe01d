"""Inference cost of RetNet against the Transformer (the RetNet paper's inference figure), for any
pair of presets, through the inference engine (retnet_train.inference.Generator: preallocated
state, CUDA graph per batch, greedy decoding of random prompts, random initial weights).

    python bench/decode.py --pair retnet_1.3b,transformer_1.3b             # all sections, 1.3B
    python bench/decode.py --pair retnet_6.7b,transformer_6.7b --sections memory,throughput,latency
    python bench/decode.py --device cpu --dtype fp32 --threads 1 --pair retnet_tiny,transformer_tiny \
        --step-pair retnet_tiny,transformer_tiny --contexts 128,256 --batches 1,2 --step-batch 2 --step-prompt 64 \
        --at-context 256 --no-save                                         # CPU smoke test (no memory figures)

Sections (--sections, comma-separated):
  memory      peak GPU memory (max_memory_allocated over one generate call, weights included) against
              the context at --memory-batch, prompt = context - --new-tokens; "weights" row: the
              model alone. The Generator (max_len = context) is made anew and freed per setting.
  throughput  new tokens/s of the decoding steps alone (prefill left out) against the context, each
              model at its largest batch: powers of two down from --max-batch until one fits, then
              bisection towards the smallest that did not fit (--batch-refine).
  latency     ms per decoding step against the batch at --at-context.
  step        the --step-pair at batch --step-batch with a --step-prompt-token prompt (ms per step,
              new tokens/s) and at batch 1 (ms per token), against the memory-bandwidth floor:
              (weights read per step + state traffic) / bandwidth; RetNet's state traffic is its fp32
              state read and written, the Transformer's its KV cache read.
A summary table gives the ratios: throughput at --at-context (each at its largest batch), memory
at --memory-batch and --at-context ("% less"), and each model's latency spread over --batches.

Timing: one generate call per setting; the engine's on_token hook marks the time (after a device
synchronisation) after --warmup-steps decoding steps and again --steps steps later. The graph is
captured before the prefill in that same call. The throughput and latency sections prefill a short
prompt (--prompt-len) into a state of max_len = context: the engine's Transformer step attends over
all max_len cache slots (the unused ones masked) and RetNet's step does not depend on the position,
so the step costs the same as after a full prompt; --full-prompts prefills context - new tokens
instead (slow at large batches). Each section prints a markdown table and appends it to
bench/RESULTS.md (unless --no-save), with a chart next to it where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import decode_lib as L  # noqa: E402
from bench.results import RESULTS, append  # noqa: E402
from retnet_train.inference.engine import STATE_WINDOW  # noqa: E402

SECTIONS = ("memory", "throughput", "latency", "step")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="retnet_6.7b,transformer_6.7b", help="two presets, compared first / second")
    p.add_argument("--step-pair", default="retnet_1.3b,transformer_1.3b", help="the step section's two presets")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=tuple(L.DTYPES))
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads for the run (restored after)")
    p.add_argument("--kernels", default=None, help="model.kernels override (default: the preset's, auto)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="Generator(compile=True), or compile=MODE (a torch.compile mode, e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--contexts", type=ints, default=ints("1024,2048,4096,8192,16384,32768"),
                   help="memory and throughput sections")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16, help="memory section: tokens generated per setting")
    p.add_argument("--max-batch", type=int, default=None, help="throughput search cap (default 256; CPU 4)")
    p.add_argument("--batch-refine", type=int, default=8,
                   help="throughput: after halving, bisect between the batch that fit and the one that did not, "
                        "to within 1/N of the fit (0: powers of two only)")
    p.add_argument("--at-context", type=int, default=8192, help="latency section and the summary's ratios")
    p.add_argument("--batches", type=ints, default=ints("1,2,4,8,16,32,64"), help="latency section")
    p.add_argument("--step-batch", type=int, default=16)
    p.add_argument("--step-prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32, help="timed decoding steps per setting")
    p.add_argument("--state-window", type=int, default=None,
                   help="RetNet: Generator(state_window=N), the state written back once every N tokens "
                        f"(default: the engine's, {STATE_WINDOW} where its one-kernel step runs, else 1)")
    p.add_argument("--warmup-steps", type=int, default=4, help="untimed decoding steps before them")
    p.add_argument("--prompt-len", type=int, default=128, help="throughput and latency prompts (see --full-prompts)")
    p.add_argument("--full-prompts", action="store_true", help="throughput and latency: prompt = context - new")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="HBM GB/s for the floor (default by device name: H100 SXM 3350, H200 4800)")
    p.add_argument("--no-save", action="store_true", help="print only: no RESULTS.md, no charts")
    p.add_argument("--chart-dir", default=None, help="where charts go (default: next to RESULTS.md unless --no-save)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    args.pair, args.step_pair = args.pair.split(","), args.step_pair.split(",")
    args.contexts, args.batches = sorted(args.contexts), sorted(args.batches)
    if len(args.pair) != 2 or len(args.step_pair) != 2:
        p.error("--pair and --step-pair take two presets, comma-separated")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu (with tiny presets)")
    args.max_batch = args.max_batch or (256 if args.device == "cuda" else 4)
    chart_dir = args.chart_dir or (None if args.no_save else str(RESULTS.parent))
    args.chart_dir = Path(chart_dir) if chart_dir else None
    return args


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else L.OOM if x == L.OOM else format(x, spec)


def get(res, key):
    return res if res == L.OOM else (None if res is None else res.get(key))


def decode_prompt(args, context: int) -> int:
    new = 1 + args.warmup_steps + args.steps
    return context - new if args.full_prompts else min(args.prompt_len, context - new)


# ---- measuring, one model at a time (only one is on the device) -----------------------------------


def measure_model(name: str, args, sections: list[str], bw: tuple[float, str]) -> dict:
    device = torch.device(args.device)
    model, weights = L.build(name, device, L.DTYPES[args.dtype], args.kernels)
    out: dict = {"weights_gib": weights, "arch": model.config.arch}
    w, s = args.warmup_steps, args.steps

    def show(section, key, res):
        print(f"RESULT {section} {name} {key}: {res}", flush=True)  # each figure as soon as it exists
        return res

    if "memory" in sections:
        out["memory"] = {c: show("memory", c, L.run_setting(model, args.memory_batch, c, c - args.new_tokens, 0, 0,
                                                            args.new_tokens, args.compile,
                                                            state_window=args.state_window)) for c in args.contexts}
    if "throughput" in sections:
        out["throughput"], start = {}, args.max_batch
        for c in args.contexts:  # a longer context never fits a larger batch: start from the last fit
            res, failed = L.largest_batch(model, start, c, decode_prompt(args, c), w, s, args.compile,
                                          refine=args.batch_refine, state_window=args.state_window)
            if res != L.OOM:
                res["oom_batches"] = failed
            out["throughput"][c] = show("throughput", c, res)
            start = res["batch"] if res != L.OOM else start
    if "latency" in sections:
        c = args.at_context
        out["latency"] = {b: show("latency", b, with_floor(L.run_setting(model, b, c, decode_prompt(args, c), w, s,
                                                                         compile=args.compile,
                                                                         state_window=args.state_window), model, bw))
                          for b in args.batches}
    if "step" in sections:
        ctx = args.step_prompt + 1 + w + s
        out["step"] = {}
        for b in (args.step_batch, 1):
            res = L.run_setting(model, b, ctx, args.step_prompt, w, s, compile=args.compile,
                                state_window=args.state_window)
            out["step"][b] = show("step", b, with_floor(res, model, bw))
    del model
    L.free_memory(device)
    return out


def with_floor(res, model, bw: tuple[float, str]):
    """res with the step's memory-bandwidth floor: weights read once, RetNet's fp32 state read and
    written, the Transformer's KV cache read (floor_bytes, floor_ms)."""
    if res != L.OOM:
        res["floor_bytes"] = L.weight_bytes_per_step(model) + res["state_bytes"] * (
            2 if model.config.arch == "retnet" else 1)
        res["floor_ms"] = res["floor_bytes"] / (bw[0] * 1e9) * 1e3
    return res


# ---- tables ---------------------------------------------------------------------------------------


def memory_table(a, b, ra, rb, args):
    rows = [["weights only", "-", fmt(ra["weights_gib"], ".2f"), fmt(rb["weights_gib"], ".2f"), "-"]]
    for c in args.contexts:
        ma, mb = get(ra["memory"][c], "peak_gib"), get(rb["memory"][c], "peak_gib")
        rows.append([c, args.memory_batch, fmt(ma, ".2f"), fmt(mb, ".2f"), less(ma, mb)])
    return ["context", "batch", f"{a} GiB", f"{b} GiB", f"{a} vs {b}"], rows


def less(ma, mb) -> str:
    if isinstance(ma, float) and isinstance(mb, float):
        return f"{(1 - ma / mb) * 100:.0f}% less"
    return f"{L.OOM} for {'both' if ma == mb == L.OOM else 'the other'}" if L.OOM in (ma, mb) else "-"


def throughput_table(a, b, ra, rb, args):
    rows = []
    for c in args.contexts:
        xa, xb = ra["throughput"][c], rb["throughput"][c]
        ta, tb = get(xa, "tokens_per_s"), get(xb, "tokens_per_s")
        ratio = f"{ta / tb:.2f}x" if isinstance(ta, float) and isinstance(tb, float) else "-"
        rows.append([c, batch_cell(xa), fmt(ta, ".0f"), fmt(get(xa, "ms"), ".2f"),
                     batch_cell(xb), fmt(tb, ".0f"), fmt(get(xb, "ms"), ".2f"), ratio])
    return ["context", f"{a} batch", f"{a} tokens/s", f"{a} ms/step", f"{b} batch", f"{b} tokens/s",
            f"{b} ms/step", f"{a} / {b}"], rows


def batch_cell(x) -> str:
    """The batch that ran, and the larger ones tried here that ran out of memory."""
    if x == L.OOM:
        return L.OOM
    tried = x.get("oom_batches")
    return f"{x['batch']}" + (f" ({','.join(map(str, tried))}: OOM)" if tried else "")


def latency_table(a, b, ra, rb, args):
    rows = [[bs, *(fmt(get(r["latency"][bs], key), ".2f") for r in (ra, rb) for key in ("ms", "floor_ms"))]
            for bs in args.batches]
    return ["batch", f"{a} ms/step", f"{a} floor ms", f"{b} ms/step", f"{b} floor ms"], rows


def step_table(a, b, ra, rb, args):
    rows = []
    for name, r in ((a, ra), (b, rb)):
        for bs in (args.step_batch, 1):
            x = r["step"][bs]
            ms, floor = get(x, "ms"), get(x, "floor_ms")
            ratio = f"{ms / floor:.2f}" if isinstance(ms, float) else "-"
            rows.append([name, bs, args.step_prompt, fmt(ms, ".2f"), fmt(get(x, "tokens_per_s"), ".0f"),
                         fmt(None if x == L.OOM else x["floor_bytes"] / 1e9, ".2f"), fmt(floor, ".2f"), ratio])
    return ["model", "batch", "prompt", "ms/step", "new tokens/s", "GB moved/step", "floor ms", "measured/floor"], rows


def summary_table(a, b, ra, rb, args):
    c, rows = args.at_context, []
    if "throughput" in ra and c in ra["throughput"]:
        xa, xb = ra["throughput"][c], rb["throughput"][c]
        ta, tb = get(xa, "tokens_per_s"), get(xb, "tokens_per_s")
        ratio = f"{ta / tb:.2f}x" if isinstance(ta, float) and isinstance(tb, float) else "-"
        rows.append([f"decoding tokens/s at {c}, each at its largest batch",
                     f"{fmt(ta, '.0f')} (batch {fmt(get(xa, 'batch'), 'd')})",
                     f"{fmt(tb, '.0f')} (batch {fmt(get(xb, 'batch'), 'd')})", f"{a} / {b} = {ratio}"])
    if "memory" in ra and c in ra["memory"]:
        ma, mb = get(ra["memory"][c], "peak_gib"), get(rb["memory"][c], "peak_gib")
        rows.append([f"peak memory GiB at batch {args.memory_batch}, context {c}", fmt(ma, ".2f"), fmt(mb, ".2f"),
                     f"{a}: {less(ma, mb)}"])
    if "latency" in ra:
        for key, what in (("ms", "ms/step"), ("floor_ms", "memory-bandwidth floor")):
            spreads = []
            for r in (ra, rb):
                ms = [x[key] for x in r["latency"].values() if x != L.OOM]
                ran = [bs for bs, x in r["latency"].items() if x != L.OOM]
                spreads.append(f"within {(max(ms) / min(ms) - 1) * 100:.0f}% (batch {min(ran)}-{max(ran)})"
                               if ms else "-")
            rows.append([f"{what} spread over batches {args.batches[0]}-{args.batches[-1]} at {c} (max/min - 1)",
                         *spreads, ""])
    return ["figure", a, b, "ratio"], rows


TABLES = {"memory": memory_table, "throughput": throughput_table, "latency": latency_table, "step": step_table}
CHARTS = {  # section -> (x label, y label, key, log y)
    "memory": ("context (tokens)", "peak GPU memory (GiB)", "peak_gib", False),
    "throughput": ("context (tokens)", "decoding tokens/s (largest batch)", "tokens_per_s", True),
    "latency": ("batch", "ms per decoding step", "ms", False),
}


def notes_for(section: str, args, bw) -> str:
    common = (f"{args.dtype} weights (random init), greedy; {args.warmup_steps} untimed + {args.steps} timed "
              f"decoding steps per setting, prefill not timed; a new Generator per setting; compile={args.compile}"
              + f"; RetNet state_window={args.state_window or 'the engine default'} (the state written back "
                f"once every state_window tokens; {STATE_WINDOW} by default where the one-kernel step runs)")
    prompt = "prompt = context - new tokens" if args.full_prompts else (
        f"prompt {args.prompt_len} tokens into a state of max_len = context (the step's cost does not depend on it)")
    return {"memory": f"peak max_memory_allocated over one generate call of {args.new_tokens} new tokens, "
                      f"prompt = context - {args.new_tokens}, weights included; {args.dtype} weights, random init",
            "throughput": f"{common}; {prompt}; batch: the largest that fits, " + (
                f"halving from {args.max_batch}, then bisecting to within 1/{args.batch_refine} of it" if args.batch_refine
                else f"the largest power of two <= {args.max_batch}"),
            "latency": f"{common}; context {args.at_context}; {prompt}; floor as in the step section "
                       f"({bw[0]:.0f} GB/s)",
            "step": f"{common}; floor = (weights read per step (an untied embedding table: one row per sequence) "
                    f"+ RetNet fp32 state read and written / Transformer KV cache read) / {bw[0]:.0f} GB/s "
                    f"({bw[1]})",
            "summary": f"ratios from the sections above; context {args.at_context}"}[section]


def report(section: str, pair: list[str], results: dict, args, bw) -> tuple[list, list]:
    a, b = pair
    header, rows = (summary_table if section == "summary" else TABLES[section])(a, b, results[a], results[b], args)
    notes = notes_for(section, args, bw)
    if section in CHARTS and args.chart_dir is not None:
        xlabel, ylabel, key, logy = CHARTS[section]
        path = args.chart_dir / f"decode_{section}_{a}_vs_{b}.png"
        series = {n: [(x, get(r, key) if r != L.OOM else None) for x, r in results[n][section].items()]
                  for n in (a, b)}
        if L.chart(path, f"{section}: {a} vs {b}", xlabel, ylabel, series, logy=logy):
            notes += f"; chart: [{path.name}]({path.name})"
    append(f"Decoding {section}: {a} vs {b} (bench/decode.py)", header, rows, notes=notes, save=not args.no_save)
    return header, rows


def main(argv=None) -> dict:
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    device = torch.device(args.device)
    bw = L.bandwidth_gbs(args.bandwidth_gbs, device)
    if "step" in args.sections:
        print(f"memory-bandwidth floor at {bw[0]:.0f} GB/s: {bw[1]}")
    pair_sections = [s for s in args.sections if s != "step"]
    results: dict = {}
    for name in dict.fromkeys(args.pair + args.step_pair):  # each model once, in order
        sections = (pair_sections if name in args.pair else []) + (
            ["step"] if "step" in args.sections and name in args.step_pair else [])
        if sections:
            results[name] = measure_model(name, args, sections, bw)
    tables = {}
    for section in args.sections:
        tables[section] = report(section, args.step_pair if section == "step" else args.pair, results, args, bw)
    if pair_sections:
        tables["summary"] = report("summary", args.pair, results, args, bw)
    return tables


if __name__ == "__main__":
    main()
