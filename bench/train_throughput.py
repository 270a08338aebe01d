"""Training throughput through the real trainer: tokens/s, MFU and peak memory.

    python bench/train_throughput.py --preset retnet_1.3b transformer_1.3b --seq-len 2048 8192 \
        --tokens-per-step 16384 --zero 2
    torchrun --nproc_per_node 4 bench/train_throughput.py --preset retnet_6.7b --zero 3
    torchrun --nproc_per_node 4 bench/train_throughput.py --preset retnet_6.7b --tp 2 --zero 1
    python bench/train_throughput.py --preset retnet_tiny --seq-len 256 --micro-batch 4 --steps 4  # CPU
    python bench/train_throughput.py --experiment retnet_1.3b retnet_1.3b_128k --steps 3 --warmup 2

Each configuration builds the same Trainer that `python -m retnet_train` builds (DeepSpeed
engine, optimizer, loop), on synthetic tokens (no shards, no data-loading cost), runs
warmup + measured optimizer steps, and reads the figures from its metrics.jsonl. Defaults: bf16 and
fused AdamW on CUDA, ZeRO-2. Micro-batch: --micro-batch, else tokens-per-step / seq-len.
With --experiment, each conf/experiment is measured as it is written (model, sequence length,
micro-batch, form, checkpointing, compile, ZeRO stage, layout): only the data becomes synthetic,
the step count and logging are the bench's, and one optimizer step is one micro-batch per rank
(plus the trailing key=value overrides); the shape and trainer flags are not used.
Prints a table; rank 0 appends it to bench/RESULTS.md unless --no-save.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.stoppable import cut_note, measure_until_stopped  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["retnet_1.3b"], help="conf/model presets")
    p.add_argument("--seq-len", nargs="+", type=int, default=[2048])
    p.add_argument("--experiment", nargs="+", default=None,
                   help="conf/experiment names, each measured with its own settings (replaces --preset/--seq-len)")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="tokens per rank per micro-batch")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (overrides the above)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (data-parallel size = GPUs / (tp x cp))")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size: ranks that split each sequence")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "bf16_autocast", "fp32"])
    p.add_argument("--mode", default="auto", choices=["auto", "parallel", "chunkwise"],
                   help="RetNet training form; auto: chunkwise (fla kernels on CUDA when installed)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--profile", action="store_true",
                   help="also run one more, untimed step under the profiler on rank 0 (logging.profile) and print "
                        "where its device time goes by kernel family")
    p.add_argument("--result-json", help=argparse.SUPPRESS)  # internal: one configuration, result to this file
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    return p.parse_args(argv)


def experiment_key(name: str) -> str:
    """The configuration key of a conf/experiment in place of a preset name (seq_len: None)."""
    return f"experiment={name}"


def shape_overrides(preset: str, seq_len: int | None, args, world: int) -> list[str]:
    """What a configuration fixes: the model and shape from the flags, or an experiment's own file
    with only the batch made one micro-batch per rank per step."""
    if seq_len is None:  # an experiment: its micro-batch, sequence length and layout
        from retnet_train.config import load_config

        cfg = load_config([preset, "trainer.data_source=synthetic"])
        t = cfg.trainer
        dp = max(1, world // (cfg.parallel.tp * cfg.parallel.cp))
        return [preset, f"trainer.global_batch_tokens={t.micro_batch_size * t.seq_len * dp * args.grad_accum}"]
    micro = args.micro_batch or max(1, args.tokens_per_step // seq_len)
    mode = "chunkwise" if args.mode == "auto" and preset.startswith("retnet") else args.mode
    mode = "parallel" if mode == "auto" else mode
    dp = max(1, world // (args.tp * args.cp))  # ranks of a tensor- or context-parallel group share one micro-batch
    shape = [
        f"model={preset}", f"trainer.seq_len={seq_len}",
        f"trainer.micro_batch_size={micro}", f"trainer.global_batch_tokens={micro * seq_len * dp * args.grad_accum}",
        f"trainer.precision={args.precision}", f"trainer.mode={mode}",
        f"trainer.activation_checkpointing={args.act_ckpt}", f"trainer.compile={args.compile}",
        f"deepspeed=zero{args.zero}", f"parallel.tp={args.tp}", f"parallel.cp={args.cp}",
    ]
    return shape + ([f"trainer.chunk_size={args.chunk_size}"] if args.chunk_size else [])


def run_overrides(preset: str, seq_len: int | None, args, world: int, run_dir: str) -> list[str]:
    """Every override of one measured run: its shape, synthetic tokens, no evaluation or checkpoints,
    with --profile one more step (profiled, not timed), then the command line's own key=value pairs."""
    total = args.warmup + args.steps + (1 if args.profile else 0)
    return [
        *shape_overrides(preset, seq_len, args, world), "trainer.data_source=synthetic",
        f"trainer.max_steps={total}", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.eval_at_end=false", "checkpoint.every=0", "checkpoint.save_at_end=false", "checkpoint.resume=false",
        "logging.wandb.mode=disabled", "logging.console=false", f"run_dir={run_dir}", "name=bench",
        "optim.warmup_steps=1",
        *([f"logging.profile.start={total}", "logging.profile.trace=false"] if args.profile else []),
        *args.overrides,
    ]


def measure(preset: str, seq_len: int | None, args) -> dict:
    import torch

    from retnet_train.config import checkpointing_mode, load_config
    from retnet_train.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = tempfile.mkdtemp(prefix="train_throughput_")
    cfg = load_config(run_overrides(preset, seq_len, args, world, run_dir))
    seq_len, micro = cfg.trainer.seq_len, cfg.trainer.micro_batch_size

    trainer = Trainer(cfg)  # it resets the device's peak memory once the model is built
    trainer.fit()
    # memory per device: the largest training peak of any rank (the trainer resets it after building)
    from retnet_train.parallel.groups import world_max_on_host
    from retnet_train.train.throughput import peak_memory_gib

    peak_mem = world_max_on_host([peak_memory_gib(trainer.ps.device)])[0]
    if not trainer.ps.is_main:  # only rank 0 writes metrics.jsonl (each rank made its own temp run_dir)
        del trainer
        gc.collect()
        return {"preset": preset, "seq_len": seq_len, "is_main": False}
    if trainer.profiler.report.is_file():
        print(f"== profile, {preset} T={seq_len}\n{trainer.profiler.report.read_text()}", flush=True)
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "event" not in r and "loss" in r]
    print(f"{preset} T={seq_len} tp={cfg.parallel.tp} zero={cfg.deepspeed.stage}: loss by step "
          + " ".join(f"{r['step']}:{r['loss']:.3f}" for r in logged), flush=True)
    steps = [r for r in logged if args.warmup < r["step"] <= args.warmup + args.steps]  # not a profiled one
    if not steps:  # e.g. a time limit's SIGTERM, which the trainer takes as a request to stop early
        raise RuntimeError(f"{preset} T={seq_len}: the trainer logged {len(logged)} steps, none of the measured "
                           f"steps {args.warmup + 1}-{args.warmup + args.steps} (stopped early?)")
    seconds = sum(cfg.trainer.global_batch_tokens / r["tokens_per_s"] for r in steps)
    tokens = cfg.trainer.global_batch_tokens * len(steps)
    tps = tokens / seconds
    t = cfg.trainer
    ckpt = checkpointing_mode(t.activation_checkpointing)
    layers = "" if ckpt == "none" or t.checkpoint_layers is None else f", {t.checkpoint_layers} blocks"
    row = {"preset": preset.removeprefix("experiment="), "seq_len": seq_len, "micro": micro,
           "world": trainer.ps.world_size, "zero": cfg.deepspeed.stage, "tp": cfg.parallel.tp, "cp": cfg.parallel.cp,
           "precision": trainer.built.precision + ("" if t.float8 == "none" else f" + fp8 {t.float8}")
           + ("" if t.residual_dtype == "weights" else f" + {t.residual_dtype} residual"),
           "mode": t.mode if trainer.built.model_cfg.arch == "retnet" else "attention",
           "act_ckpt": ckpt + layers, "compile": bool(t.compile),
           "tokens_per_s": tps, "tokens_per_s_per_device": tps / trainer.ps.world_size,
           "mfu": tps * trainer.flops_per_token / trainer.peak_flops,
           "peak_mem_gib": peak_mem, "first_loss": logged[0]["loss"], "loss": steps[-1]["loss"],
           "is_main": trainer.ps.is_main}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def measure_isolated(preset: str, seq_len: int | None) -> dict:
    """One configuration in a fresh process: nothing of the previous one stays on the GPU."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, __file__, *argv, "--result-json", f.name]
        # the child measures exactly this configuration
        if seq_len is None:
            cmd = _replace_list(cmd, "--experiment", [preset.removeprefix("experiment=")])
        else:
            cmd = _replace_list(cmd, "--preset", [preset])
            cmd = _replace_list(cmd, "--seq-len", [str(seq_len)])
        proc = subprocess.run(cmd)
        text = Path(f.name).read_text()
    if proc.returncode != 0 or not text:
        return {"preset": preset, "seq_len": seq_len, "error": f"failed (exit {proc.returncode})", "is_main": True}
    return json.loads(text)


def _replace_list(cmd: list[str], flag: str, values: list[str]) -> list[str]:
    out, skip = [], False
    for a in cmd:
        if a == flag:
            skip = True
            continue
        if skip and not a.startswith("--") and "=" not in a:
            continue
        skip = False
        out.append(a)
    return out[:2] + [flag, *values] + out[2:]


def measure_safely(preset: str, seq_len: int, args) -> dict:
    import torch

    try:
        return measure(preset, seq_len, args)
    except torch.OutOfMemoryError as e:
        # the allocator's message says how much was asked for and what was held: where it ran out
        first_line = (str(e).splitlines() or [""])[0]
        print(f"{preset} T={seq_len}: out of memory: {first_line}", file=sys.stderr)
        return {"preset": preset, "seq_len": seq_len, "error": "out of memory", "is_main": True}


def main() -> None:
    args = parse()
    if args.experiment:
        configs = [(experiment_key(e), None) for e in args.experiment]
    else:
        configs = [(p, t) for p in args.preset for t in args.seq_len]
    if args.result_json:  # a child of measure_isolated
        Path(args.result_json).write_text(json.dumps(measure_safely(*configs[0], args)))
        return
    stopped = None
    if len(configs) > 1 and "WORLD_SIZE" not in os.environ:
        rows, stopped = measure_until_stopped(configs, lambda config: measure_isolated(*config))
    else:  # under torchrun: in this process, one configuration after another (the trainer's own signals)
        rows = [measure_safely(p, t, args) for p, t in configs]
    if not rows or not rows[0].get("is_main"):
        if stopped:
            raise SystemExit(128 + stopped)
        return
    from bench.results import append

    header = ["model" if not args.experiment else "experiment", "T", "micro-batch", "GPUs", "tp", "cp", "ZeRO",
              "precision", "form", "act. ckpt", "compile", "tokens/s", "tokens/s/device", "MFU", "peak mem (GiB)",
              "loss first -> last"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["preset"].removeprefix("experiment="), r["seq_len"] or "-"] + [r["error"]]
                         + [""] * (len(header) - 3))
            continue
        table.append([r["preset"], r["seq_len"], r["micro"], r["world"], r.get("tp", 1), r.get("cp", 1), r["zero"], r["precision"], r["mode"],
                      "no" if r["act_ckpt"] == "none" else r["act_ckpt"], "blocks" if r["compile"] else "no",
                      f"{r['tokens_per_s'] / 1e3:.1f}k",
                      f"{r['tokens_per_s_per_device'] / 1e3:.1f}k", f"{100 * r['mfu']:.1f}%",
                      f"{r['peak_mem_gib']:.1f}", f"{r['first_loss']:.2f} -> {r['loss']:.2f}"])
    notes = (f"bench/train_throughput.py: the trainer's own loop on synthetic tokens, {args.warmup} warmup + "
             f"{args.steps} measured steps, grad accumulation {args.grad_accum}; MFU from "
             "retnet_train.model.flops.training_flops_per_token over the device's dense bf16 peak "
             "(CPU: a rough cores x 2.5 GHz x 64 (AVX-512) or 32 (AVX2) fp32 FLOP/cycle); peak mem: the "
             "largest training peak of any rank, the fp32 build before it not counted")
    if len({r["seq_len"] for r in rows}) > 1 and not args.no_save:  # a curve only where T varies
        from bench.charts import beside_results, chart

        path = beside_results("train_throughput")
        series: dict[str, list] = {}
        for r in rows:
            series.setdefault(r["preset"], []).append((r["seq_len"], r.get("tokens_per_s")))
        if chart(path, "training throughput by sequence length", "sequence length T", "tokens/s", series):
            notes += f"; chart: [{path.name}]({path.name})"
    if stopped:
        notes += "; " + cut_note(stopped, len(rows), len(configs))
    append("Training throughput (bench/train_throughput.py)", header, table, notes=notes, save=not args.no_save)
    if stopped:
        raise SystemExit(128 + stopped)
    from retnet_train.parallel import destroy

    destroy()


if __name__ == "__main__":
    main()
