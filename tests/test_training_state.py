"""The trainer's own state (state.py), the cadence of periodic work (cadence.py) and the synthetic
stream's cursor across data-parallel sizes: in-process, no trainer started."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from retnet_train.train.cadence import Every
from retnet_train.train.state import TrainingState, TrainingStateError
from retnet_train.train.synthetic import SyntheticStream


def _rows(batches) -> list[tuple]:
    return [tuple(r.tolist()) for b in batches for r in b["input_ids"]]


def test_state_round_trip_restores_counters_cursor_and_rng():
    saved = TrainingState(SyntheticStream(256, 16, 2), rng_seed=7, step=5, tokens=2560, bad_in_row=1,
                          skipped_total=2, last_eval_step=4)
    for _ in range(3):
        next(saved.stream)
    sd = saved.state_dict()
    want_rng = torch.rand(4)
    fresh = TrainingState(SyntheticStream(256, 16, 2), rng_seed=7)
    torch.manual_seed(999)
    fresh.load_state_dict(sd)
    assert (fresh.step, fresh.tokens, fresh.bad_in_row, fresh.skipped_total, fresh.last_eval_step) == (5, 2560, 1, 2, 4)
    assert torch.equal(torch.rand(4), want_rng)  # the RNG continues where it was saved
    assert _rows([next(fresh.stream)]) == _rows([next(saved.stream)])


def test_older_trainer_state_files_load_and_unknown_versions_are_refused():
    stream = SyntheticStream(256, 16, 2)
    old = {"step": 3, "tokens": 1536, "bad_in_row": 0, "skipped_total": 0, "data": stream.state_dict(),
           "rng": TrainingState(stream, 0).state_dict()["rng"]}  # the keys of retnet_train before "version"
    state = TrainingState(SyntheticStream(256, 16, 2), rng_seed=0)
    state.load_state_dict(old)
    assert (state.step, state.tokens, state.last_eval_step) == (3, 1536, -1)
    with pytest.raises(TrainingStateError, match=r"trainer_state_rank00000.pt: version 9"):
        state.load_state_dict({**old, "version": 9}, source="trainer_state_rank00000.pt")
    with pytest.raises(TrainingStateError, match=r"x.pt: no 'data'"):
        state.load_state_dict({"step": 1, "tokens": 2}, source="x.pt")


def test_without_a_saved_rng_each_rank_reseeds_from_its_seed_and_the_step():
    def draws_after_load(seed, step, before=999):
        sd = TrainingState(SyntheticStream(256, 16, 2), 0, step=step).state_dict()
        del sd["rng"]
        random.seed(before)  # the RNGs' state before the load must not matter
        np.random.seed(before)
        torch.manual_seed(before)
        TrainingState(SyntheticStream(256, 16, 2), rng_seed=seed).load_state_dict(sd)
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    base = draws_after_load(11, 4)
    # same seed and step: same draws in every generator, from another state before
    assert draws_after_load(11, 4, before=123) == base
    # another seed or another step: other draws in every generator (a reseed from the seed alone,
    # or one generator left alone, fails here)
    for other in (draws_after_load(12, 4), draws_after_load(11, 5)):
        assert all(a != b for a, b in zip(base, other)), (base, other)


def test_every():
    log = Every(3, last=7, at_last=True)
    assert [s for s in range(1, 8) if log(s)] == [3, 6, 7]
    save = Every(3, last=6)  # the end of the run saves on its own
    assert [s for s in range(1, 7) if save(s)] == [3]
    assert not any(Every(0, last=9)(s) for s in range(1, 9))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_synthetic_cursor_continues_at_another_data_parallel_size(before, after):
    """Optimizer steps of 4 micro-batches: after 3 steps at dp=`before`, the ranks at dp=`after`
    read the very micro-batches that an uninterrupted dp=`after` run reads at steps 4 and 5."""
    per_step = 4
    old = [SyntheticStream(256, 16, 2, r, before) for r in range(before)]
    for s in old:
        for _ in range(3 * per_step // before):
            next(s)
    uninterrupted = [SyntheticStream(256, 16, 2, r, after) for r in range(after)]
    resumed = [SyntheticStream(256, 16, 2, r, after) for r in range(after)]
    for u, r in zip(uninterrupted, resumed):
        for _ in range(3 * per_step // after):
            next(u)
        r.load_state_dict(old[0].state_dict())
    for u, r in zip(uninterrupted, resumed):
        n = 2 * per_step // after
        assert _rows([next(r) for _ in range(n)]) == _rows([next(u) for _ in range(n)])
    with pytest.raises(ValueError, match="do not split over dp_size=3"):
        SyntheticStream(256, 16, 2, 0, 3).load_state_dict({**old[0].state_dict(), "index": 1, "dp_size": 2})
