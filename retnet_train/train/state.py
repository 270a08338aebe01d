"""TrainingState: the trainer's own state in one object (the model and optimizer live in the engine).

It holds the counters that the loop advances (step, tokens, the NaN-guard counters, the step of the
last evaluation) and reaches the data cursor (the stream) and this process's RNG; `state_dict()` is
what a checkpoint stores per rank, `load_state_dict()` puts a saved one back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .rng import get_rng_state, seed_all, set_rng_state

log = logging.getLogger(__name__)

# 1: the trainer_state files of earlier retnet_train (the same keys, no "version"); 2: with "version".
VERSION = 2
COUNTERS = ("step", "tokens", "bad_in_row", "skipped_total", "last_eval_step")


class TrainingStateError(ValueError):
    pass


@dataclass
class TrainingState:
    stream: Any                 # the data stream: its state_dict() is the data cursor
    rng_seed: int               # this rank's seed: re-seeds the RNG where no saved RNG state applies
    step: int = 0               # optimizer steps taken
    tokens: int = 0             # tokens trained on, all ranks together
    bad_in_row: int = 0         # consecutive steps skipped by the NaN guard
    skipped_total: int = 0      # all steps skipped by the NaN guard
    last_eval_step: int = -1    # the step of the last evaluation (-1: none yet)

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens

    def state_dict(self) -> dict:
        return {"version": VERSION, **{k: getattr(self, k) for k in COUNTERS},
                "data": self.stream.state_dict(), "rng": get_rng_state()}

    def load_state_dict(self, state: dict, source: str = "trainer state") -> None:
        """`state` from state_dict() (or an older trainer_state file, version 1). Without "rng" (a
        resume at another world size, where ranks have no saved RNG state of their own), the RNGs
        are re-seeded from (rng_seed, step): deterministic, but not the draws of any earlier run."""
        version = state.get("version", 1)
        if version not in (1, VERSION):
            raise TrainingStateError(f"{source}: version {version!r}; this retnet_train reads 1 and {VERSION}")
        missing = [k for k in ("step", "tokens", "data") if k not in state]
        if missing:
            raise TrainingStateError(f"{source}: no {', '.join(repr(k) for k in missing)}")
        for key in COUNTERS:
            if key in state:
                setattr(self, key, int(state[key]))
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError as e:
            raise TrainingStateError(f"{source}: {e}") from None
        if "rng" in state:
            set_rng_state(state["rng"])
        else:
            seed_all(self.rng_seed + 1_000_003 * self.step)
            log.info("RNG re-seeded from trainer.seed, data-parallel rank and step %d (no saved RNG state "
                     "for this rank)", self.step)
