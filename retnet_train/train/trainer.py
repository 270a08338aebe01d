"""The training loop: steps, gradient accumulation, NaN guard, logging, eval, checkpoints, signals."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from retnet_train.config import batch_layout
from retnet_train.parallel import barrier, context_parallel, destroy, init_distributed, mpu, world_max_on_host

from . import faults
from .build_lock import bound_build_lock_wait
from .build import build_engine, forward_kwargs, is_export_dir
from .cadence import Every
from .checkpoint import CheckpointManager, checkpoints_named_by
from .clipping import clip_and_guard, clips_in_optimizer
from .collector import ScheduledCollection
from .data import build_train_stream, resolve_vocab_size, verify_data
from .evaluate import lm_loss, lm_loss_from_hidden, loss_autocast, model_inputs
from .evaluator import Evaluator
from .metrics import MetricsWriter
from .profiling import StepProfiler
from .rng import seed_all
from .schedule import schedule_from_config
from .signals import StopRequest, signal_name
from .state import TrainingState
from .step_log import StepLog
from .step_values import StepValues
from .throughput import flops_per_token, peak_flops_per_device, peak_memory_gib

log = logging.getLogger("retnet_train")

# trainer keys that change the arithmetic but not the weights: a checkpoint records them (with the
# value a checkpoint written before the key existed ran with), and a resume that changes one says so
NUMERICS_KEYS = {"float8": "none", "float8_fast_accum": "output", "residual_dtype": "weights"}


class TooManyBadSteps(RuntimeError):
    pass


def log_file(run_dir, rank: int) -> Path:
    """Where rank `rank` keeps its log, and the traceback of an error (the console gets one line)."""
    return Path(run_dir) / "logs" / f"rank{rank:05d}.log"


def setup_logging(level: str, rank: int, run_dir) -> None:
    """Console: rank 0 at `level`, the others warnings only. Each rank's log file: `level`."""
    console = logging.StreamHandler()
    console.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s" if rank else
                                           "%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[console, file], force=True)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Trainer:
    """The one holder of the whole config (the root, from load_config); everything it builds gets only
    the sections it reads."""

    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.trainer
        self.stop = StopRequest()
        bound_build_lock_wait(t.build_lock_timeout_s)
        self.ps = init_distributed(t.device, cfg.parallel.backend, cfg.parallel.tp,
                                   cfg.parallel.timeout_minutes, cfg.parallel.cp, cfg.parallel.host_group)
        self.cp = context_parallel()  # None at parallel.cp=1
        setup_logging(cfg.logging.level, self.ps.rank, cfg.run_dir)
        if self.ps.device.type == "cpu":
            # Denormal floats (e.g. the softmax gradient of tokens the model has learned to rule out)
            # make x86 arithmetic ~100x slower; measured: a CPU run fell from 4k to 0.5k tokens/s.
            torch.set_flush_denormal(True)
        self.layout = batch_layout(cfg.parallel, t, self.ps.world_size)
        self.run_dir = Path(cfg.run_dir)
        verify_data(t, cfg.data, self.ps.is_main)
        vocab = resolve_vocab_size(t, cfg.data)
        if vocab is not None and vocab != cfg.model.vocab_size:
            log.info("model.vocab_size %d -> %d (the tokenizer's vocabulary)", cfg.model.vocab_size, vocab)
            cfg.model.vocab_size = vocab
        seed_all(t.seed)  # identical initial weights on every rank
        self.built = build_engine(cfg.model, t, cfg.optim, cfg.deepspeed, cfg.checkpoint.init_from, self.layout,
                                  self.ps.device)
        self.engine = self.built.engine
        # One data-parallel rank at ZeRO-0 with the raw optimizer: there is nothing to all-reduce,
        # but DeepSpeed would still flatten every gradient into buckets and copy it back (7.6 ms a
        # step at retnet_1.3b on an H100, profiled). Its no_sync() skips that; the other setups
        # keep DeepSpeed's reduction (its optimizer wrappers take part in it).
        # (On more ranks DeepSpeed's reduction also gives a parameter without a gradient a zero one;
        # here such a parameter would sit out the step. The models have none.)
        self._reduce_grads = not (self.built.own_clipping and self.engine.seq_dp_world_size == 1)
        if self.built.own_clipping:
            log.info("ZeRO-0, fp32 weights (%s): the trainer clips the gradients (%s); gradient all-reduce %s",
                     self.built.precision,
                     "in the fused AdamW's kernel" if clips_in_optimizer(self.engine.optimizer) else "in place",
                     "on" if self._reduce_grads else "skipped: one data-parallel rank")
        if self.ps.device.type == "cuda":
            # the model was built in fp32 on the device before ZeRO / tensor parallelism cut it down:
            # report that peak once, and let mem_gib show what training itself holds
            log.info("peak device memory while building: %.1f GiB", peak_memory_gib(self.ps.device))
            torch.cuda.reset_peak_memory_stats(self.ps.device)
        self.fwd = forward_kwargs(t, self.built.model_cfg)
        self.lr_at = schedule_from_config(cfg.optim, t.max_steps)
        try:
            self.flops_per_token = flops_per_token(self.built.model_cfg, t.seq_len, self.fwd.get("mode", "parallel"))
        except ImportError:
            n = sum(p.numel() for p in self.engine.module.parameters())
            self.flops_per_token = 6.0 * n
        self.peak_flops = peak_flops_per_device(self.ps.device, cfg.logging.peak_tflops) * self.ps.world_size

        c = cfg.checkpoint
        self.ckpt = CheckpointManager(self.run_dir, c.keep, c.checksums,
                                      every=Every(c.every, last=t.max_steps), save_at_end=c.save_at_end)
        self.ckpt.clean_partial()

        # dropout differs across data-parallel ranks but not within a tensor-parallel group, whose ranks
        # hold the same replicated activations (sharded activations use ShardedDropout's own streams)
        rank_seed = t.seed + 1000 * self.ps.dp_rank
        seed_all(rank_seed)
        # the ranks of a context-parallel group read the same samples; each keeps its slice
        self.stream = build_train_stream(t, cfg.data, self.built.model_cfg.vocab_size, self.ps.data_rank,
                                         self.ps.data_size)
        self.state = TrainingState(self.stream, rng_seed=rank_seed)
        self._restore()
        if self.ps.is_main:  # only now: a run refused above must not overwrite the config of the run it found
            OmegaConf.save(cfg, self.run_dir / "config.yaml")
        barrier()
        self.metrics = self._metrics_writer()
        self.step_log = StepLog(self.metrics, Every(t.log_every, last=t.max_steps, at_last=True),
                                t.global_batch_tokens, t.max_steps, self.flops_per_token, self.peak_flops,
                                self.ps.device)
        self.evaluator = Evaluator(t, cfg.data, self.engine, self.built, self.fwd, self.ps, self.metrics)
        self.profiler = StepProfiler(cfg.logging.profile, self.run_dir, self.ps.rank, self.ps.device)

    # ---- set-up -----------------------------------------------------------------------------------
    def _restore(self) -> None:
        cfg = self.cfg
        latest = self.ckpt.resume_point() if cfg.checkpoint.resume else None
        if latest is not None:
            meta = self.ckpt.restore(self.engine, latest, self.state, model_config=self._model_config())
            self.resumed_from = latest
            log.info("resumed from %s (step %d, %s tokens)", latest, self.state.step, f"{self.state.tokens:,}")
            for key, default in NUMERICS_KEYS.items():
                before, now = meta.get(key, default), str(cfg.trainer[key])
                if before != now:  # the weights carry over either way; the arithmetic changes here
                    log.warning("trainer.%s=%s from here on; the checkpoint's steps ran with trainer.%s=%s",
                                key, now, key, before)
        elif cfg.checkpoint.init_from and not is_export_dir(cfg.checkpoint.init_from):  # exports load in build
            path = self.ckpt.pick(checkpoints_named_by(cfg.checkpoint.init_from))
            self.ckpt.load(self.engine, path, model_config=self._model_config())
            self.resumed_from = None
            log.info("initialised weights from %s", path)
        else:
            self.resumed_from = None

    def _model_config(self) -> dict:
        """This run's `model` section as a checkpoint's meta.json records it."""
        return OmegaConf.to_container(self.cfg.model, resolve=True, enum_to_str=True)

    def _metrics_writer(self) -> MetricsWriter:
        wandb_run = None
        if self.ps.is_main:
            from .wandb_run import start_wandb

            wandb_run = start_wandb(self.cfg.logging.wandb, self.cfg.name, self.run_dir,
                                    OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True))
        writer = MetricsWriter(self.run_dir, self.ps.is_main, self.cfg.logging.console, self.cfg.trainer.max_steps,
                               wandb_run)
        # records of steps after the point this run starts from were written by a run that stopped
        # before saving them (no checkpoint at all: step 0); they are about to be written again
        writer.truncate_after(self.state.step)
        return writer

    # ---- one optimizer step -----------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _queue_step(self) -> dict:
        """Queue one optimizer step's work; its loss and gradient norm stay on their way to the host
        (StepValues) until _read()."""
        engine, gas, dev = self.engine, self.layout["grad_accum"], self.ps.device
        step = self.state.step + 1  # 1-based number of the step being taken
        lr = self.lr_at(self.state.step)
        self._set_lr(lr)
        cursor = self.stream.state_dict()
        skipped_before = engine.skipped_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        sources: set = set()
        grad_norm = None
        for micro in range(gas):
            batch = next(self.it)
            sources.update(self._source_names(batch.get("source")))
            loss = self._loss(*model_inputs(batch, self.fwd, dev, self.cfg.data.reset_at_documents, self.cp))
            if faults.active("nan_loss", step):
                loss = loss * float("nan")
            with contextlib.nullcontext() if self._reduce_grads else engine.no_sync():
                engine.backward(loss)
            if micro == gas - 1 and self.built.own_clipping:
                grad_norm = self._clip_and_guard()
            engine.step()
            loss_sum += loss.detach().double()
        if grad_norm is None:  # DeepSpeed's norm (None where its optimizer wrapper computes none)
            grad_norm = engine.get_global_grad_norm()
        values = StepValues(loss_sum, grad_norm)
        self.state.advance(self.cfg.trainer.global_batch_tokens)
        return {"values": values, "lr": lr, "cursor": cursor, "sources": sorted(str(s) for s in sources),
                "skipped": engine.skipped_steps > skipped_before, "step": self.state.step,
                "tokens": self.state.tokens}

    def _read(self, queued: dict) -> dict:
        """A queued step's record: its loss (the micro-batches' mean), gradient norm, whether it was
        bad (skipped by the optimizer, or a non-finite loss or norm), and the step and token count
        it ended at."""
        loss_sum, grad_norm = queued["values"].read()
        loss = loss_sum / self.layout["grad_accum"]
        bad = (queued["skipped"] or not math.isfinite(loss)
               or (grad_norm is not None and not math.isfinite(grad_norm)))
        return {"loss": loss, "lr": queued["lr"], "grad_norm": grad_norm, "bad": bad, "cursor": queued["cursor"],
                "sources": queued["sources"], "step": queued["step"], "tokens": queued["tokens"]}

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor, fwd: dict) -> torch.Tensor:
        """Mean next-token loss of one micro-batch (this rank's slice with context parallelism);
        trainer.fused_loss: from the final hidden states [B, T, d] and the LM head in token chunks,
        without the [B, T, vocab] fp32 logits."""
        engine, vp = self.engine, self.built.vocab_parallel
        if not self.cfg.trainer.fused_loss:
            return lm_loss(engine(ids, **fwd), labels, vocab_parallel=vp)
        hidden = engine(ids, return_hidden=True, **fwd)
        with loss_autocast(self.built.precision, hidden.device):
            return lm_loss_from_hidden(hidden, engine.module.lm_head, labels, vocab_parallel=vp,
                                       kernels=engine.module.kernels)

    def _source_names(self, src) -> set:
        if src is None:
            return set()
        if isinstance(src, torch.Tensor):  # source indices; the stream's plan knows their names
            names = getattr(getattr(self.stream, "plan", None), "names", None)
            return {names[i] if names else str(i) for i in src.tolist()}
        return {str(s) for s in src}

    def _clip_and_guard(self) -> torch.Tensor:
        """ZeRO-0 fp32: clip here (after the backward's all-reduce, where there is one); a non-finite
        norm makes the optimizer step that follows change nothing."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        # the whole model's norm: with tp > 1 each rank holds slices, and every rank must scale alike
        tp_group = mpu().get_model_parallel_group() if self.ps.tp_size > 1 else None
        return clip_and_guard(self.engine.optimizer, params, self.cfg.optim.grad_clip, tp_group)

    # ---- the loop ---------------------------------------------------------------------------------
    def save(self, reason: str) -> None:
        meta = {"tokens": self.state.tokens, "reason": reason, "time": time.time(),
                "model_config": self._model_config(),
                "zero_stage": self.cfg.deepspeed.stage, "precision": self.built.precision,
                **{key: str(self.cfg.trainer[key]) for key in NUMERICS_KEYS}, "tokenizer": self._tokenizer_path()}
        path = self.ckpt.save(self.engine, self.state, meta)
        self.metrics.event({"event": "checkpoint", "step": self.state.step, "path": str(path), "reason": reason})

    def _tokenizer_path(self):
        if self.cfg.trainer.data_source != "stream":
            return None
        return str(Path(self.cfg.data.tokenizer).resolve())

    def _sync_stop(self) -> int:
        """The stop signal's number if any rank received one (0 if none): every rank decides alike,
        on the host, so the check does not wait for the step just queued."""
        return int(world_max_on_host([float(self.stop.signum or 0)])[0])

    def fit(self) -> int:
        self.collection = ScheduledCollection(self.cfg.trainer.gc_every)
        try:
            return self._fit()
        finally:
            self.collection.close()  # the collector as it was, also after an error

    def _fit(self) -> int:
        t, state = self.cfg.trainer, self.state
        self.engine.train()
        self.it = iter(self.stream)
        log.info("run_dir %s | %d ranks (dp %d, cp %d, tp %d) | %d tokens/step = %d x %d seqs x %d accumulation "
                 "x %d data-parallel ranks", self.run_dir, self.ps.world_size, self.ps.data_size, self.ps.cp_size,
                 self.ps.tp_size, t.global_batch_tokens, t.micro_batch_size, t.seq_len, self.layout["grad_accum"],
                 self.ps.data_size)
        defer = bool(t.defer_step_values)
        if defer:
            log.info("trainer.defer_step_values: each step's loss and gradient norm are read after the next step "
                     "is queued (at once before evaluations, checkpoints and the last step)")
        pending = None  # with defer_step_values: (the queued step not yet read, when it began)
        last_read = 0.0

        def read(queued: dict, began: float) -> tuple[dict, float]:
            """A queued step's record and its seconds: a deferred step's time runs from the previous
            read, as the steps overlap on the host."""
            nonlocal last_read
            out, now = self._read(queued), time.time()
            seconds, last_read = now - max(began, last_read), now
            return out, seconds

        while state.step < t.max_steps:
            self.profiler.step_begins(state.step + 1)
            t0 = time.time()
            queued = self._queue_step()
            # deferred: this step is read after the next one is queued, unless something needs it now
            deferred = defer and not self._needs_step_now(state.step)
            to_read = ([pending] if pending is not None else []) + ([] if deferred else [(queued, t0)])
            pending = (queued, t0) if deferred else None
            finished = [read(*q) for q in to_read]
            self.profiler.step_ended(state.step)
            for out, seconds in finished:
                self._account(out, seconds)
            self.evaluator.maybe_run(state)  # never due at a deferred step (_needs_step_now)
            signum = self._sync_stop()
            if signum:
                if pending is not None:  # the step queued last: read it, so the checkpoint is of it
                    self._account(*read(*pending))
                log.info("%s: stopping at step %d; saving a checkpoint", signal_name(signum), state.step)
                self.save(reason=f"signal {signum}")
                log.info("stopped at step %d; the same command resumes from here", state.step)
                self.close()
                return 0
            if self.ckpt.due(state.step):
                self.save(reason="every")
        self.evaluator.finish(state)
        if self.ckpt.due_at_end(state.step):
            self.save(reason="end")
        self.close()
        return 0

    def _needs_step_now(self, step: int) -> bool:
        """Whether step `step` must be read before the next one is queued: an evaluation or a
        checkpoint follows it, or it is the last."""
        return step >= self.cfg.trainer.max_steps or self.evaluator.every(step) or self.ckpt.due(step)

    def _account(self, out: dict, seconds: float) -> None:
        """A read step's bookkeeping: the NaN guard's counters, the train records, the garbage
        collector's schedule (and the fault injection of the tests)."""
        if out["bad"]:
            self._bad_step(out)
        else:
            self.state.bad_in_row = 0
        faults.maybe_kill("kill", out["step"])
        faults.maybe_signal_last_rank(out["step"], self.ps.rank, self.ps.world_size)
        self.step_log.add(out, seconds)
        self.step_log.maybe_write(out, self.state.skipped_total)
        self.collection.step_ended(out["step"])

    def _bad_step(self, out: dict) -> None:
        state, step = self.state, out["step"]
        state.bad_in_row += 1
        state.skipped_total += 1
        self.metrics.event(
            {"event": "bad_step", "step": step, "loss": out["loss"], "grad_norm": out["grad_norm"],
             "batch": out["cursor"], "sources": out["sources"], "bad_in_row": state.bad_in_row},
            message=(f"step {step}: non-finite loss or gradient (loss={out['loss']}, "
                     f"grad_norm={out['grad_norm']}); update skipped; batch cursor {out['cursor']}"),
            warn=True)
        if state.bad_in_row >= self.cfg.trainer.max_bad_steps:
            raise TooManyBadSteps(
                f"{state.bad_in_row} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping. The last good checkpoint "
                f"is in {self.ckpt.root}; lower optim.lr or inspect the batches logged in metrics.jsonl")

    def close(self) -> None:
        self.profiler.finish(self.state.step)  # a run that stops inside the profiled steps
        self.metrics.close()
        barrier()


def train(cfg) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        destroy()
