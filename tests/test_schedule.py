"""The LR schedule (train/schedule.py) against values computed by hand: linear warmup, then linear
or cosine decay to lr * min_lr_ratio at decay_steps, flat after."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from retnet_train.config import OptimConfig
from retnet_train.train.schedule import lr_at, schedule_from_config

LR = 1e-3
# cos(pi / 4) = sqrt(2) / 2, so cosine's factor 0.5 * (1 + cos(pi * progress)) at progress 1/4, 3/4:
C1, C3 = 0.5 + 0.25 * 2 ** 0.5, 0.5 - 0.25 * 2 ** 0.5  # 0.853553..., 0.146446...


def _lrs(steps, **kw):
    return [lr_at(s, LR, **kw) for s in steps]


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    # step s (0-based) of 4 warmup steps: lr * (s + 1) / 4, whatever the decay
    for decay in ("linear", "cosine", "constant"):
        got = _lrs(range(4), warmup_steps=4, decay_steps=12, decay=decay, min_lr_ratio=0.1)
        assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12), decay


@pytest.mark.parametrize("decay,ratio,want", [
    # steps 4, 6, 8, 10, 12, 20 of warmup 4, decay_steps 12: progress 0, 1/4, 1/2, 3/4, 1, 1 (held)
    ("linear", 0.0, [1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0]),
    ("linear", 0.1, [1e-3, 1e-4 + 9e-4 * 0.75, 5.5e-4, 1e-4 + 9e-4 * 0.25, 1e-4, 1e-4]),
    ("cosine", 0.0, [1e-3, 1e-3 * C1, 5e-4, 1e-3 * C3, 0.0, 0.0]),
    ("cosine", 0.1, [1e-3, 1e-4 + 9e-4 * C1, 5.5e-4, 1e-4 + 9e-4 * C3, 1e-4, 1e-4]),
    ("constant", 0.1, [1e-3] * 6),  # constant ignores min_lr_ratio
])
def test_decay_reaches_lr_times_min_lr_ratio_at_decay_steps_and_stays(decay, ratio, want):
    got = _lrs([4, 6, 8, 10, 12, 20], warmup_steps=4, decay_steps=12, decay=decay, min_lr_ratio=ratio)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_no_warmup_and_decay_ending_inside_warmup():
    # warmup 0: step 0 is already lr; linear over 10 steps halves it at step 5
    assert _lrs([0, 5, 10], warmup_steps=0, decay_steps=10) == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-18)
    # decay_steps <= warmup_steps: nothing to decay over, lr after warmup
    assert _lrs([1, 2, 9], warmup_steps=2, decay_steps=2, decay="cosine", min_lr_ratio=0.5) == \
        pytest.approx([1e-3, 1e-3, 1e-3], rel=1e-12)


def test_unknown_decay_is_refused():
    with pytest.raises(ValueError, match=r"optim.decay='step' is not one of"):
        lr_at(5, LR, warmup_steps=2, decay_steps=10, decay="step")


def test_schedule_from_config_decays_to_max_steps_unless_decay_steps_is_set():
    """The trainer's path: a structured optim config (decay an enum), decay_steps null -> max_steps."""
    optim = OmegaConf.merge(OmegaConf.structured(OptimConfig),
                            OmegaConf.from_dotlist(["optim.lr=1e-3", "optim.warmup_steps=4", "optim.decay=cosine",
                                                    "optim.min_lr_ratio=0.1"]).optim)
    fn = schedule_from_config(optim, max_steps=12)
    assert [fn(s) for s in (0, 8, 10, 12)] == pytest.approx([2.5e-4, 5.5e-4, 1e-4 + 9e-4 * C3, 1e-4], rel=1e-12)
    optim.decay_steps = 8  # ends the decay at step 8 although the run is 12 steps
    fn = schedule_from_config(optim, max_steps=12)
    assert [fn(s) for s in (6, 8, 12)] == pytest.approx([5.5e-4, 1e-4, 1e-4], rel=1e-12)
