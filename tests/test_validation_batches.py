"""Validation: trainer.eval_batches means what it says, and evaluation builds no autograd graph."""

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.mark.skipif(not (SAMPLE / ".complete").is_file(), reason="needs `make sample-data`")
@pytest.mark.parametrize("eval_batches,want", [(None, 4), (2, 2), (6, 6)])
def test_eval_batches_is_the_number_of_validation_batches(eval_batches, want):
    """trainer.eval_batches sets the validation batches per source, above data.val_batches (4 in
    the sample config) too; null leaves the data config's count."""
    from retnet_train.config import load_config
    from retnet_train.train.data import build_val

    cfg = load_config(["trainer.data_source=stream", "data=sample", f"data.root={SAMPLE}", "trainer.seq_len=64",
                       "trainer.micro_batch_size=2", "trainer.global_batch_tokens=128",
                       f"trainer.eval_batches={'null' if eval_batches is None else eval_batches}"])
    batches = build_val(cfg.trainer, cfg.data, 256, 0, 1)
    assert batches and all(len(v) == want for v in batches.values()), {k: len(v) for k, v in batches.items()}


def test_eval_batches_is_the_count_that_verification_and_validation_read():
    """One rule (train/data.py val_batches): trainer.eval_batches when set, else data.val_batches,
    else (synthetic data, no data config) 4; verify_data checks the validation split against it too."""
    from types import SimpleNamespace as NS

    from retnet_train.train.data import val_batches

    data = NS(val_batches=0)
    assert val_batches(NS(eval_batches=None, data_source="stream"), data) == 0
    assert val_batches(NS(eval_batches=6, data_source="stream"), data) == 6
    assert val_batches(NS(eval_batches=None, data_source="synthetic"), None) == 4
    assert val_batches(NS(eval_batches=2, data_source="synthetic"), None) == 2


def test_validation_runs_without_autograd():
    """evaluate() builds no autograd graph (it once lost its no_grad to a function inserted above it,
    and held every layer's activations during validation)."""
    import torch

    from retnet_train.model import build_model
    from retnet_train.train.evaluate import evaluate

    model = build_model("retnet_tiny", d_model=32, n_layers=1, n_heads=2, vocab_size=64)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    val = {"a": [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]}
    out = evaluate(model, val, {}, torch.device("cpu"))
    assert seen == [(False, False)] and out["val/a/loss"] > 0
