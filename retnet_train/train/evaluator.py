"""Periodic validation: every trainer.eval_every steps and once at the end (trainer.eval_at_end)."""

from __future__ import annotations

from retnet_train.parallel import context_parallel

from .cadence import Every
from .data import build_val
from .evaluate import evaluate


class Evaluator:
    def __init__(self, trainer, data, engine, built, forward_kwargs: dict, ps, metrics):
        """trainer, data: the config's trainer and data sections."""
        t = trainer
        self.trainer, self.data, self.engine, self.built, self.fwd = trainer, data, engine, built, forward_kwargs
        self.ps, self.metrics = ps, metrics
        self.every = Every(t.eval_every, last=t.max_steps)  # the last step: see finish()
        self.at_end = t.eval_at_end
        self.val = None  # built at the first evaluation

    def maybe_run(self, state) -> None:
        if self.every(state.step):
            self.run(state)

    def finish(self, state) -> None:
        # not again when a finished run is started once more (its last evaluation is in its state)
        if self.at_end and state.last_eval_step != state.step:
            self.run(state)

    def run(self, state) -> dict:
        if self.val is None:
            # the ranks of a context-parallel group read the same batches (each keeps its slice)
            self.val = build_val(self.trainer, self.data, self.built.model_cfg.vocab_size, self.ps.data_rank,
                                 self.ps.data_size)
        result = evaluate(self.engine, self.val, self.fwd, self.ps.device, self.built.vocab_parallel,
                          self.trainer.fused_loss, self.data.reset_at_documents, context_parallel(),
                          self.built.precision)
        state.last_eval_step = state.step
        record = {"step": state.step, "tokens": state.tokens, **result}
        if "val/loss" in result:
            self.metrics.eval(record)
        return record
