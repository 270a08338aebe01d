"""bench/saved_activations.py counts what autograd keeps per token against a hand count (eager
retnet_tiny: no Triton, no compile; the bench's own CPU runs use both)."""

from __future__ import annotations

import torch

from bench import saved_activations as bench
from retnet_train.model import build_model


def test_a_fully_checkpointed_block_keeps_its_input_and_the_final_norm_its_own():
    model = build_model("retnet_tiny", kernels="torch", n_layers=1).train()
    model.set_activation_checkpointing("full")
    total, kinds = bench.per_token(model, [40, 72], torch.device("cpu"))
    d = model.config.d_model
    # per token: the block's fp32 input and the final norm's fp32 input (d each), the norm's fp32
    # mean and rstd, the embedding's int64 token id
    assert kinds == {f"float32 [1, T, {d}]": 2 * 4 * d, "float32 [1, T, 1]": 8, "int64 [1, T]": 8}
    assert total == 2 * 4 * d + 16


def test_an_uncheckpointed_block_keeps_more_and_eager_selective_is_left_out():
    kept = {}
    for mode in ("none", "full"):
        model = build_model("retnet_tiny", kernels="torch", n_layers=1).train()
        model.set_activation_checkpointing(mode)
        kept[mode] = bench.per_token(model, [40, 72], torch.device("cpu"))[0]
    assert kept["none"] > 4 * kept["full"], kept
    args = bench.parse(["--modes", "none", "selective", "full", "--budgets", "0.3"])
    assert bench.setups(args) == [("none", False, None), ("full", False, None), ("none", True, None),
                                  ("selective", True, None), ("full", True, None), ("none", True, 0.3)]
