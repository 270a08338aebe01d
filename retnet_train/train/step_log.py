"""The train records (metrics.jsonl, console, wandb): averages over the steps since the last record,
written every trainer.log_every steps and at the last step."""

from __future__ import annotations

import time

from retnet_train.parallel import all_reduce_sum

from .cadence import Every
from .metrics import MetricsWriter
from .throughput import peak_memory_gib


class StepLog:
    def __init__(self, metrics: MetricsWriter, every: Every, global_batch_tokens: int, max_steps: int,
                 flops_per_token: float, peak_flops: float, device):
        self.metrics, self.every = metrics, every
        self.global_batch_tokens, self.max_steps = global_batch_tokens, max_steps
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_flops, device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.good_steps, self.steps, self.seconds = 0.0, 0, 0, 0.0

    def add(self, out: dict, seconds: float) -> None:
        """One finished step: its record (Trainer._read) and the seconds it took. Only the time of
        training steps counts toward tokens/s (not evaluation, checkpoints or this logging)."""
        if not out["bad"]:  # a skipped step's loss is NaN or inf; it would poison the average
            self.loss_sum += out["loss"]
            self.good_steps += 1
        self.steps += 1
        self.seconds += seconds

    def maybe_write(self, out: dict, skipped_total: int) -> None:
        """Every rank calls this for every step, in order (the average is reduced over the
        data-parallel ranks). out: the step's record (its "step" and "tokens" are where it ended)."""
        if not self.every(out["step"]):
            return
        total_loss, total_steps = all_reduce_sum([self.loss_sum, float(self.good_steps)])
        loss = total_loss / total_steps if total_steps else float("nan")
        tokens = self.steps * self.global_batch_tokens
        tps = tokens / max(self.seconds, 1e-9)
        step_time = self.seconds / max(1, self.steps)
        self.metrics.train({
            "step": out["step"], "loss": loss, "lr": out["lr"],
            "grad_norm": out["grad_norm"], "tokens": out["tokens"], "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak_flops, "mem_gib": peak_memory_gib(self.device),
            "eta_s": (self.max_steps - out["step"]) * step_time, "skipped_steps": skipped_total,
            "time": time.time(),
        })
        self._reset()
