"""One training step, side by side: our RetNet through the trainer and in a plain loop, fla's
RetNet-1.3B, and our Transformer, at the same tokens per step (issue 10's comparison).

    python bench/train_step.py                                   # all four, T=2048 (8 x 2048) and T=8192 (2 x 8192)
    python bench/train_step.py --runs plain fla --seq-len 2048 --kernels triton fla
    python bench/train_step.py --runs plain --seq-len 32768 131072 --tokens-per-step 32768 131072
    python bench/train_step.py --runs trainer transformer fla --compile --seq-len 8192 --memory-budget none 0.4 0.3 0.2
    python bench/train_step.py --runs fla trainer --compile --trainer-setup zero0:auto:tensorwise:bf16 --rounds 3

The plain loop is the same for every model: fp32 weights, bf16 autocast, fused AdamW, the loss of
each model's own training path (ours: `trainer.fused_loss`'s chunked loss where the model offers it;
fla: its fused cross-entropy). "trainer" is `python -m retnet_train`'s own loop (by default DeepSpeed
ZeRO-2, bf16 weights with fp32 master weights; `--trainer-setup zero0:bf16_autocast` also runs it with
the plain loop's precision and optimizer; synthetic tokens), as bench/train_throughput.py runs it. Every configuration runs in a fresh
process; tokens/s is the median over the measured steps; peak memory is torch's peak allocation
after the model is built (weights, optimizer state and activations). Prints the table, appends it to
bench/RESULTS.md and, with several lengths, writes bench/train_step.png.

Runs of one configuration move by 2-5% between calls on one GPU (bench/RESULTS.md): with --rounds N every
configuration runs N times, the rounds interleaved, and each row shows its median run and the spread.

Stopped by SIGTERM (`timeout`, a batch system) or Ctrl-C, the bench still appends the rows that finished,
its notes saying it was cut short, and exits with 128 + the signal's number.

Several --memory-budget values measure the speed/memory trade-off: each of our models runs once per
budget (fla, which has none, once), each row's peak memory is set against our Transformer's at the same
budget and at none, and bench/train_step_memory_budget_T<T>.png (one per length) plots tokens/s against
peak memory, one line per model through its budgets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.stoppable import cut_note, measure_until_stopped  # noqa: E402

from retnet_train.config import CompileTuning, Float8Recipe, Precision, ResidualDtype  # noqa: E402

RUNS = ("trainer", "plain", "fla", "transformer")
PRECISIONS = Precision.values()  # trainer.precision (bench/train_throughput.py --precision)
FLOAT8 = Float8Recipe.values()  # trainer.float8
RESIDUAL = ResidualDtype.values()  # trainer.residual_dtype


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--seq-len", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--tokens-per-step", nargs="+", type=int, default=[16384],
                   help="one value for every length, or one per length")
    p.add_argument("--size", default="1.3b", help="preset size: retnet_<size>, transformer_<size>")
    p.add_argument("--kernels", nargs="+", default=["auto"], help="our RetNet's model.kernels values to compare")
    # both: what experiment=retnet_1.3b trains with (the fastest measured; none recomputes in the backward)
    p.add_argument("--retention-keep", nargs="+", default=["both"],
                   help="our RetNet's model.retention_keep values to compare (none | states | scores | both)")
    p.add_argument("--trainer-setup", nargs="+", default=["zero2:auto"],
                   help="the trainer's ZeRO stage and trainer.precision, each "
                        "ZERO:PRECISION[:FLOAT8[:RESIDUAL[:KEY=VALUE...]]] "
                        "(zero0:bf16_autocast: fp32 weights, bf16 autocast and torch's fused AdamW, as the plain "
                        "loop; zero0:auto:tensorwise: also trainer.float8=tensorwise; zero0:auto:tensorwise:bf16: "
                        "also trainer.residual_dtype=bf16; further fields KEY=VALUE set other trainer keys, e.g. "
                        "zero0:auto:tensorwise:bf16:float8_fast_accum=all)")
    p.add_argument("--compile", action="store_true", help="torch.compile our models")
    p.add_argument("--compile-tuning", default="default", choices=CompileTuning.values(),
                   help="with --compile: how inductor sizes our compiled blocks' kernels (trainer.compile_tuning)")
    p.add_argument("--compile-pdl", action="store_true",
                   help="with --compile: our compiled blocks' kernels use programmatic dependent launch "
                        "(trainer.compile_pdl)")
    p.add_argument("--act-ckpt", default="none", help="our models' activation checkpointing mode")
    p.add_argument("--memory-budget", nargs="+", default=["none"],
                   help="with --compile: our models' compiled blocks keep at most this share of their activations "
                        "(trainer.activation_memory_budget; the compiler recomputes the rest); each value (none or "
                        "a share) is its own run of each of our models")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, the rounds interleaved (each run a fresh process): "
                        "each row then shows its median run and the spread of its tokens/s, so a ratio near a bar "
                        "can be told from the variation between runs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step after the measured ones and print its device time by kernel family")
    # internal: RUN:T:TOKENS:KERNELS:SETUP:KEEP:BUDGET, result to --result-json
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- the models -----------------------------------------------------------------------------------


def ours(arch: str, args, kernels: str, keep: str = "none"):
    from retnet_train.model import build_model

    overrides = {"kernels": kernels, "retention_keep": keep} if arch == "retnet" else {}
    model = build_model(f"{arch}_{args.size}", **overrides)
    if args.act_ckpt != "none":
        model.set_activation_checkpointing(args.act_ckpt)
    return model


def fla_retnet(args):
    from fla.models import RetNetConfig, RetNetForCausalLM

    from retnet_train.model import load_preset

    ref = load_preset(f"retnet_{args.size}")
    # fla's defaults are its RetNet recipe (fused norms, SwiGLU, fused cross-entropy); only the size is ours
    cfg = RetNetConfig(hidden_size=ref.d_model, num_hidden_layers=ref.n_layers, num_heads=ref.n_heads,
                       expand_v=ref.value_width / ref.d_model, vocab_size=ref.vocab_size)
    return RetNetForCausalLM(cfg)


def loss_fn(kind: str, model):
    """The training loss of each model, as its own training path computes it."""
    if kind == "fla":
        return lambda ids, labels: model(input_ids=ids, labels=labels).loss
    from retnet_train.train.evaluate import lm_loss_from_hidden

    # as the trainer with trainer.fused_loss: final hidden states, then the LM head and the loss in
    # token chunks (liger on GPU), never the [B, T, vocab] fp32 logits
    fwd = {"mode": "chunkwise"} if kind == "plain" else {}
    kernels = getattr(model, "kernels", "torch")
    return lambda ids, labels: lm_loss_from_hidden(model(ids, return_hidden=True, **fwd), model.lm_head, labels,
                                                   kernels=kernels)


def plain_loop(kind: str, seq_len: int, tokens: int, args, kernels: str, keep: str,
               budget: float | None = None) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    with dev:
        model = fla_retnet(args) if kind == "fla" else ours("retnet" if kind == "plain" else "transformer", args,
                                                            kernels, keep)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if args.compile and kind != "fla":
        # each block, as trainer.compile does (regional: one graph for every layer; compiling the
        # whole 24-layer model took minutes); liger's fused loss stays eager (a fake-tensor
        # TypeError in its addmm, H100, torch 2.11)
        model.compile_blocks(memory_budget=budget, tuning=args.compile_tuning, pdl=args.compile_pdl)
    step_loss = loss_fn(kind, model)
    batch = max(1, tokens // seq_len)
    vocab = model.config.vocab_size
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    n = args.warmup + args.steps
    profiler = _profiler(args, n + 1, f"{kind}-T{seq_len}")
    for i in range(n + (1 if profiler else 0)):
        if profiler:
            profiler.step_begins(i + 1)
        ids = torch.randint(0, vocab, (batch, seq_len + 1), device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if profiler:
            profiler.step_ended(i + 1)
        if i >= n:  # the profiled step: neither timed nor in the losses
            break
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if profiler:
        print(f"== profile, {kind} T={seq_len}\n{profiler.report.read_text()}", flush=True)
    seconds = sorted(times)[len(times) // 2]
    return {"tokens_per_s": batch * seq_len / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "batch": batch, "loss": f"{losses[0]:.2f} -> {losses[-1]:.2f}",
            "kernels": getattr(model, "kernels", "fla" if kind == "fla" else "-")}


def _profiler(args, step: int, name: str):
    """A StepProfiler for step `step` of a plain loop (None without --profile), reporting to a temp folder."""
    if not args.profile:
        return None
    from types import SimpleNamespace

    import torch

    from retnet_train.train.profiling import StepProfiler

    cfg = SimpleNamespace(start=step, steps=1, ranks=[0], trace=False, top=30)
    return StepProfiler(cfg, tempfile.mkdtemp(prefix=f"train_step_profile_{name}_"), 0, torch.device("cuda"))


def parse_setup(setup: str) -> tuple[int, str, str, str, dict[str, str]]:
    """"zero2:auto" -> (2, "auto", "none", "weights", {}), "zero0:auto:tensorwise:bf16:float8_fast_accum=all"
    -> (0, "auto", "tensorwise", "bf16", {"float8_fast_accum": "all"}): a --trainer-setup value (the
    optional third field is trainer.float8, the optional fourth trainer.residual_dtype, any further
    ones KEY=VALUE of other trainer keys), checked before any run starts."""
    from dataclasses import fields

    from retnet_train.config import TrainerConfig

    parts = setup.split(":")
    zero, precision, float8, residual = (parts + ["", "", ""])[:4]  # the last two may be left out
    more = parts[4:]
    float8, residual = float8 or "none", residual or "weights"
    keys = {f.name for f in fields(TrainerConfig)}
    extra = dict(item.partition("=")[::2] for item in more)
    if (not zero.startswith("zero") or not zero[4:].isdigit() or precision not in PRECISIONS
            or float8 not in FLOAT8 or residual not in RESIDUAL
            or any("=" not in item or not item.partition("=")[2] for item in more) or not set(extra) <= keys):
        raise SystemExit(f"--trainer-setup {setup!r}: expected zero<stage>:<precision>[:<float8>[:<residual>[:KEY=VALUE"
                         f"...]]], precision one of {PRECISIONS}, float8 one of {FLOAT8}, residual one of {RESIDUAL}, "
                         f"KEY a trainer key")
    return int(zero[4:]), precision, float8, residual, extra


def through_trainer(seq_len: int, tokens: int, args, kernels: str, setup: str, keep: str,
                    budget: float | None = None) -> dict:
    from bench.train_throughput import measure
    from bench.train_throughput import parse as throughput_args

    batch = max(1, tokens // seq_len)
    zero, precision, float8, residual, extra = parse_setup(setup)
    # train_throughput's own parser fills every option measure() reads, so one added there later
    # gets its default here too (a hand-made Namespace missed `cp` once and every row failed)
    flags = ["--micro-batch", str(batch), "--tokens-per-step", str(tokens), "--warmup", str(args.warmup),
             "--steps", str(args.steps), "--zero", str(zero), "--precision", precision,
             *(["--compile"] if args.compile else []),
             *(["--profile"] if args.profile else []),
             *(["--chunk-size", str(args.chunk_size)] if args.chunk_size else []), f"model.kernels={kernels}",
             f"model.retention_keep={keep}", *([f"trainer.float8={float8}"] if float8 != "none" else []),
             *([f"trainer.residual_dtype={residual}"] if residual != "weights" else []),
             *[f"trainer.{key}={value}" for key, value in extra.items()],
             *([f"trainer.activation_memory_budget={budget}"] if budget is not None else []),
             *([f"trainer.compile_tuning={args.compile_tuning}"] if args.compile_tuning != "default" else []),
             *(["trainer.compile_pdl=true"] if args.compile_pdl else [])]
    ns = throughput_args(flags)
    ns.act_ckpt = args.act_ckpt  # a mode name here (none | full | selective), a flag there
    row = measure(f"retnet_{args.size}", seq_len, ns)
    return {"tokens_per_s": row["tokens_per_s"], "peak_gib": row["peak_mem_gib"], "batch": batch,
            "loss": f"{row['first_loss']:.2f} -> {row['loss']:.2f}", "kernels": kernels, "precision": row["precision"]}


def parse_spec(spec: str) -> tuple[str, int, int, str, str, str, str]:
    """"RUN:T:TOKENS:KERNELS:SETUP:KEEP:BUDGET" -> its fields; SETUP holds a colon itself (zero2:auto) or
    is "-", so the last two fields are split off from the right."""
    kind, seq_len, tokens, kernels, rest = spec.split(":", 4)
    setup, keep, budget = rest.rsplit(":", 2)
    return kind, int(seq_len), int(tokens), kernels, setup, keep, budget


def measure_one(spec: str, args) -> dict:
    import torch

    kind, seq_len, tokens, kernels, setup, keep, budget = parse_spec(spec)
    budget = None if budget == "-" else budget_value(budget)  # fla's "-": it compiles nothing
    try:
        out = (through_trainer(seq_len, tokens, args, kernels, setup, keep, budget) if kind == "trainer"
               else plain_loop(kind, seq_len, tokens, args, kernels, keep, budget))
    except torch.OutOfMemoryError:
        out = {"error": "out of memory"}
    return {"run": kind, "seq_len": seq_len, **out}


# ---- the table ------------------------------------------------------------------------------------


def run_isolated(spec: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", spec, "--result-json", f.name]
        proc = subprocess.run(cmd)
        text = Path(f.name).read_text()
    kind, seq_len = spec.split(":")[:2]
    if proc.returncode != 0 or not text:
        return {"run": kind, "seq_len": int(seq_len), "error": f"failed (exit {proc.returncode})"}
    print(f"RESULT {spec} {text}", flush=True)  # each figure as soon as it exists (a run cut short keeps them)
    return json.loads(text)


def label(run: str, args, kernels: str, setup: str = "-", keep: str = "none", budget: str = "none",
          precision: str | None = None) -> str:
    """precision: what a trainer run's `auto` resolved to, shown beside it (auto's meaning at ZeRO-0
    changed at c7a4a2b: bf16 weights before, bf16_autocast since)."""
    if setup in ("-", "zero2:auto"):  # the default keeps its old label
        setup = ""
    else:
        auto = parse_setup(setup)[1] == "auto"
        setup = f", {setup} = {precision}" if precision and auto else f", {setup}"
    kept = "" if keep in ("-", "none") else f", retention_keep={keep}"
    budget = "" if budget in ("-", "none") else f", memory budget {budget}"  # our models' compiled blocks
    return {"trainer": f"our RetNet-{args.size}, trainer (kernels={kernels}{setup}{kept}{budget})",
            "plain": f"our RetNet-{args.size}, plain loop (kernels={kernels}{kept}{budget})",
            "fla": f"fla RetNet-{args.size} (flash-linear-attention)",
            "transformer": f"our Transformer-{args.size} (SDPA{budget})"}[run]


def budget_value(text: str) -> float | None:
    """A --memory-budget value as trainer.activation_memory_budget: "none" -> None, else a number."""
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"--memory-budget {text!r}: expected none or a share of the activations in [0, 1]") from None


def check_budget(text: str, args) -> str:
    """One --memory-budget value, checked as the trainer checks trainer.activation_memory_budget (our
    plain loop does not load a config) before any run starts; returns it as a spec's budget field
    ("none", or the number as older labels wrote it: 0.3)."""
    from retnet_train.config import memory_budget_problem

    budget = budget_value(text)
    problem = memory_budget_problem(budget, args.compile, args.act_ckpt, None)
    if problem:
        raise SystemExit(f"--memory-budget {budget:g}: {problem} (the bench's --compile and --act-ckpt set those keys)")
    return "none" if budget is None else f"{budget:g}"


def run_specs(args, budgets: list[str]) -> list[str]:
    """Each run's --one spec: our models once per kernels, retention_keep, trainer setup and budget; fla,
    which has none of them, once; each at every length (the innermost loop, so a model's budgets come
    in --memory-budget's order at each length)."""
    tokens = dict(zip(args.seq_len, args.tokens_per_step * len(args.seq_len) if len(args.tokens_per_step) == 1
                      else args.tokens_per_step))
    specs = []
    for run in args.runs:
        ours_run = run in ("trainer", "plain")
        fields = itertools.product(args.kernels if ours_run else ["-"], args.retention_keep if ours_run else ["-"],
                                   args.trainer_setup if run == "trainer" else ["-"],
                                   ["-"] if run == "fla" else budgets, args.seq_len)
        specs += [f"{run}:{t}:{tokens[t]}:{k}:{setup}:{keep}:{budget}" for k, keep, setup, budget, t in fields]
    return specs


def run_rounds(specs: list[str], n: int) -> tuple[list[dict[tuple, dict]], int | None]:
    """Each round's results (parse_spec's fields -> run_isolated's result), the rounds interleaved: a
    machine that drifts (clocks, a neighbour) moves every row alike. A stop (bench/stoppable.py) keeps
    the runs that finished: returns every round (those the stop cut short partial or empty) and the signal's
    number, or None."""
    plan = [(r, spec) for r in range(n) for spec in specs]
    done, stopped = measure_until_stopped(plan, lambda item: run_isolated(item[1]))
    rounds: list[dict[tuple, dict]] = [{} for _ in range(n)]  # those not reached stay empty
    for (r, spec), result in zip(plan, done):
        rounds[r][parse_spec(spec)] = result
    return rounds, stopped


def combine_rounds(rounds: list[dict[tuple, dict]]) -> dict[tuple, dict]:
    """Each configuration's result over the rounds (each round: parse_spec's fields -> that run's
    result): the run with the median tokens/s, its peak memory and loss with it (the lower median for
    an even count: a run that happened, not an average), plus `runs` and `spread`, (max - min) / median
    of the tokens/s in percent. Failed runs are left out; a configuration that failed in every round
    keeps its last error. A round cut short (run_rounds) lacks the configurations it did not reach."""
    out = {}
    for key in rounds[0]:
        ran = [r[key] for r in rounds if key in r]
        good = sorted((r for r in ran if "error" not in r), key=lambda r: r["tokens_per_s"])
        if not good:
            out[key] = ran[-1]
            continue
        median = good[(len(good) - 1) // 2]
        rates = [r["tokens_per_s"] for r in good]
        out[key] = {**median, "runs": len(good), "spread": 100 * (max(rates) - min(rates)) / median["tokens_per_s"]}
    return out


def _ratio(r: dict, ref: dict | None, field: str) -> str:
    return f"{r[field] / ref[field]:.2f}" if ref else ""


def table(results: dict[tuple, dict], args) -> tuple[list[str], list[list]]:
    """The header and rows of `results` (parse_spec's fields -> that run's result). Each row against fla's
    rate and our Transformer's peak memory at its length; the Transformer's at the row's own budget
    (fla has none: blank) and at none. A reference that is absent or failed leaves its cell blank."""
    refs = {(run, t, budget): r for (run, t, *_, budget), r in results.items()
            if run in ("fla", "transformer") and "error" not in r}
    rounds = args.rounds > 1  # then a column of each row's spread over its runs
    header = ["model", "T", "batch", "tokens/s", *(["tokens/s spread (runs)"] if rounds else []), "peak GiB",
              "x fla tokens/s", "x Transformer memory (same budget)", "x Transformer memory (no budget)", "loss"]
    rows = []
    for (run, t, _, k, setup, keep, budget), r in results.items():
        name = label(run, args, k, setup, keep, budget, r.get("precision"))
        if "error" in r:
            rows.append([name, t, "", r["error"], *([""] if rounds else []), "", "", "", "", ""])
            continue
        rows.append([name, t, r["batch"], f"{r['tokens_per_s'] / 1e3:.1f}k",
                     *([f"{r['spread']:.1f}% ({r['runs']})"] if rounds else []), f"{r['peak_gib']:.1f}",
                     _ratio(r, refs.get(("fla", t, "-")), "tokens_per_s"),
                     _ratio(r, refs.get(("transformer", t, budget)), "peak_gib"),
                     _ratio(r, refs.get(("transformer", t, "none")), "peak_gib"), r["loss"]])
    return header, rows


def budget_charts(results: dict[tuple, dict], args) -> list[Path]:
    """One chart per length: tokens/s against peak memory, a line per model through its budgets (in
    --memory-budget's order; fla a single point); failed runs left out. Returns the charts written."""
    from bench.charts import beside_results, chart

    written = []
    for t in args.seq_len:
        series: dict[str, list] = {}
        budgets: dict[str, list] = {}  # each point's budget, written beside it
        for (run, seq_len, _, k, setup, keep, budget), r in results.items():
            if seq_len == t and "error" not in r:
                name = label(run, args, k, setup, keep)
                series.setdefault(name, []).append((r["peak_gib"], r["tokens_per_s"]))
                budgets.setdefault(name, []).append("" if budget == "-" else budget)
        path = beside_results(f"train_step_memory_budget_T{t}")
        if chart(path, f"training step, T={t}: tokens/s by activation memory budget", "peak GiB", "tokens/s",
                 series, logx=False, point_labels=budgets):
            written.append(path)
    return written


def main() -> None:
    args = parse()
    if args.one:
        Path(args.result_json).write_text(json.dumps(measure_one(args.one, args)))
        return
    for setup in args.trainer_setup:
        parse_setup(setup)
    if args.compile_tuning != "default" and not args.compile:
        raise SystemExit(f"--compile-tuning {args.compile_tuning}: needs --compile (it tunes the compiled kernels)")
    if args.compile_pdl and not args.compile:
        raise SystemExit("--compile-pdl: needs --compile (it launches the compiled kernels)")
    # 0.3 and 0.30 are one budget: one run each, one row (the results are keyed by the spec's fields)
    budgets = list(dict.fromkeys(check_budget(b, args) for b in args.memory_budget))
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    specs = run_specs(args, budgets)
    measured, stopped = run_rounds(specs, args.rounds)
    if stopped and not measured[0]:  # stopped in its first run: no row to write
        raise SystemExit(128 + stopped)
    results = combine_rounds(measured)
    header, rows = table(results, args)
    from bench.results import append

    rounds = (f", every configuration in {args.rounds} interleaved rounds (the median run shown)"
              if args.rounds > 1 else "")
    pdl = ", dependent launches" if args.compile_pdl else ""
    notes = (f"bench/train_step.py: {args.warmup} warmup + {args.steps} measured steps (median){rounds}, "
             f"tokens per step {args.tokens_per_step}; compile={args.compile}"
             f"{f' (kernel tiles: {args.compile_tuning}{pdl})' if args.compile else ''}, activation checkpointing "
             f"{args.act_ckpt}, activation memory budgets measured: {', '.join(budgets)} (each of our models at each; "
             f"fla has none); plain loop: fp32 weights, bf16 autocast, fused AdamW; trainer: "
             f"{', '.join(args.trainer_setup)} (ZeRO stage: trainer.precision; auto: bf16 weights with fp32 masters at "
             f"ZeRO 1-3, bf16_autocast at ZeRO-0)")
    if len(args.seq_len) > 1 and not args.no_save:  # the curve: how each model's rate bends with length
        from bench.charts import beside_results, chart

        path = beside_results("train_step")
        series: dict[str, list] = {}
        for (run, t, _, k, setup, keep, budget), r in results.items():
            series.setdefault(label(run, args, k, setup, keep, budget), []).append(
                (t, r["tokens_per_s"] if "error" not in r else None))
        if chart(path, "training step: tokens/s by sequence length", "sequence length T", "tokens/s", series):
            notes += f"; chart: [{path.name}]({path.name})"
    if len(budgets) > 1 and not args.no_save:  # the trade-off: what each share of memory saved costs in speed
        for path in budget_charts(results, args):
            notes += f"; memory budget chart: [{path.name}]({path.name})"
    if stopped:
        notes += "; " + cut_note(stopped, sum(len(r) for r in measured), len(specs) * args.rounds)
    append("Training step side by side (bench/train_step.py)", header, rows, notes=notes, save=not args.no_save)
    if stopped:
        raise SystemExit(128 + stopped)


if __name__ == "__main__":
    main()
