"""trainer.gc_every: Python's collector left alone at 0; otherwise off for the run, a full
collection after every N-th step, and restored at the end, also after an error."""

from __future__ import annotations

import gc
import weakref

import pytest

from retnet_train.train.collector import ScheduledCollection


class Node:
    pass


def cyclic_garbage() -> weakref.ref:
    """A reference cycle nothing else points to: only the cyclic collector frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def collector_enabled():
    gc.enable()
    yield
    gc.enable()


def test_zero_leaves_the_collector_alone():
    collection = ScheduledCollection(0)
    assert gc.isenabled()
    assert not any(collection.step_ended(step) for step in range(1, 10))
    collection.close()
    assert gc.isenabled()


def test_every_n_collects_after_the_nth_step_only_and_restores_the_collector():
    collection = ScheduledCollection(3)
    assert not gc.isenabled()
    garbage = cyclic_garbage()
    for _ in range(100_000):  # what would trigger automatic collections
        Node()
    assert [collection.step_ended(step) for step in (1, 2)] == [False, False]
    assert garbage() is not None  # nothing collected it yet
    assert collection.step_ended(3)
    assert garbage() is None
    assert [collection.step_ended(step) for step in (4, 5, 6)] == [False, False, True]
    collection.close()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    collection = ScheduledCollection(2)
    collection.close()
    assert not gc.isenabled()


def test_a_negative_interval_is_refused_by_name():
    with pytest.raises(ValueError, match=r"trainer.gc_every=-1: must be >= 0"):
        ScheduledCollection(-1)


def test_a_run_with_scheduled_collection_computes_the_reference_losses(tmp_path):
    """The trainer with trainer.gc_every=2: the same arithmetic as the plain-PyTorch reference, and
    the log says the collector's schedule."""
    from test_train_utils import losses, reference_losses, run_train

    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=3", "trainer.gc_every=2", "trainer.eval_at_end=false",
              "checkpoint.save_at_end=false", "optim.decay_steps=3")
    got, want = losses(run), reference_losses(3)
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert abs(loss - want[step]) < 1e-5, (step, loss, want[step])
    assert "trainer.gc_every=2: Python's automatic garbage collection off" in (
        run / "logs" / "rank00000.log").read_text()
