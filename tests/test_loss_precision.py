"""The fused loss runs in the trainer's precision: with trainer.precision=bf16_autocast its head
matmul is bf16 like the model's (DeepSpeed's autocast covers only the engine's forward), with fp32 it
stays fp32."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from retnet_train.model import build_model
from retnet_train.train.evaluate import loss_autocast
from retnet_train.train.trainer import Trainer


class _AutocastEngine:
    """What DeepSpeed's engine does with torch_autocast on: the forward alone under autocast."""

    def __init__(self, module, precision):
        self.module, self.precision = module, precision

    def __call__(self, ids, **kw):
        with loss_autocast(self.precision, ids.device):
            return self.module(ids, **kw)


def _trainer(precision, model):
    cfg = types.SimpleNamespace(trainer=types.SimpleNamespace(fused_loss=True))
    built = types.SimpleNamespace(precision=precision, vocab_parallel=False)
    return types.SimpleNamespace(engine=_AutocastEngine(model, precision), built=built, cfg=cfg)


@pytest.mark.parametrize("precision, compute", [("bf16_autocast", torch.bfloat16), ("fp32", torch.float32)])
def test_fused_loss_matmul_in_the_precision_of_the_forward(precision, compute):
    torch.manual_seed(0)
    model = build_model("retnet_tiny", kernels="torch")
    ids, labels = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    loss = Trainer._loss(_trainer(precision, model), ids, labels, {})
    with loss_autocast(precision, ids.device):
        hidden = model(ids, return_hidden=True)
    logits = (hidden.to(compute) @ model.lm_head.weight.to(compute).t()).float()
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    other = torch.float32 if compute == torch.bfloat16 else torch.bfloat16
    wrong = F.cross_entropy((hidden.to(other) @ model.lm_head.weight.to(other).t()).float().flatten(0, 1),
                            labels.flatten())
    assert abs(loss.item() - wrong.item()) > 1e-5  # the two precisions are told apart here


def test_loss_autocast_only_for_bf16_autocast():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with loss_autocast("bf16_autocast", x.device):
        assert (x @ w).dtype == torch.bfloat16
    for precision in ("fp32", "bf16"):
        with loss_autocast(precision, x.device):
            assert (x @ w).dtype == torch.float32


# ---- which precision `auto` means, and what start-up says about one ------------------------------


@pytest.mark.parametrize("precision, device, stage, impl, expected", [
    ("auto", "cuda", 0, "auto", "bf16_autocast"),  # DeepSpeed's ZeRO-0 bf16 path is its unfused fp16 optimizer
    ("auto", "cuda", 0, "fused", "bf16_autocast"),
    ("auto", "cuda", 0, "deepspeed", "bf16"),  # its own Adam with fp32 weights would clip with no overflow check
    ("auto", "cuda", 1, "auto", "bf16"), ("auto", "cuda", 2, "auto", "bf16"), ("auto", "cuda", 3, "auto", "bf16"),
    ("auto", "cpu", 0, "auto", "fp32"), ("auto", "cpu", 2, "auto", "fp32"),
    ("bf16", "cuda", 0, "auto", "bf16"), ("fp32", "cuda", 2, "auto", "fp32"),
    ("bf16_autocast", "cpu", 2, "auto", "bf16_autocast"),
])
def test_auto_precision_depends_on_device_zero_stage_and_optimizer_and_a_chosen_one_is_kept(precision, device, stage,
                                                                                          impl, expected):
    from retnet_train.train.build import resolve_precision

    assert resolve_precision(precision, torch.device(device), stage, impl) == expected


def test_auto_at_zero0_on_cuda_is_autocast_with_the_trainer_clipping():
    """What the engine is built with for `auto` at ZeRO-0 on CUDA: DeepSpeed's torch autocast, its own
    clipping off (the trainer clips and guards), no bf16 mode; at ZeRO-2 DeepSpeed's bf16 mode clips."""
    from omegaconf import OmegaConf

    from retnet_train.train.build import resolve_precision, trainer_clips
    from retnet_train.train.ds_config import build_ds_config

    optim = OmegaConf.create({"impl": "auto", "grad_clip": 1.0, "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                              "weight_decay": 0.1})
    layout = {"grad_accum": 1, "dp_size": 1}
    for stage, clips, autocast, bf16 in ((0, True, True, False), (2, False, False, True)):
        ds = OmegaConf.create({"stage": stage, "reduce_bucket_size": 1, "allgather_bucket_size": 1,
                               "overlap_comm": False, "contiguous_gradients": True, "offload_optimizer": False,
                               "offload_params": False, "extra": None})
        precision = resolve_precision("auto", torch.device("cuda"), stage, optim.impl)
        own = trainer_clips(stage, precision, optim.impl)
        cfg = build_ds_config(ds, optim, 2, layout, precision, own)
        assert (own, "torch_autocast" in cfg, cfg["bf16"]["enabled"]) == (clips, autocast, bf16)
        assert cfg["gradient_clipping"] == (0.0 if clips else 1.0)
    assert not trainer_clips(0, "bf16_autocast", "deepspeed") and not trainer_clips(1, "fp32", "auto")


def test_bf16_weights_at_zero0_and_on_cpu_are_warned_about():
    from retnet_train.train.build import precision_warnings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    (zero0,) = precision_warnings("bf16", cuda, 0, "auto")
    assert "ZeRO-0" in zero0 and "bf16_autocast" in zero0 and "zero gradients" in zero0
    assert [w.split(":")[0] for w in precision_warnings("bf16", cpu, 0, "auto")] == [
        "trainer.precision=bf16 on CPU", "trainer.precision=bf16 with ZeRO-0"]
    assert precision_warnings("bf16", cuda, 2, "auto") == []
    assert precision_warnings("bf16_autocast", cuda, 0, "auto") == []
    # DeepSpeed's own Adam: auto's bf16 there is not the unfused path, and bf16_autocast is no advice
    assert precision_warnings("bf16", cuda, 0, "deepspeed") == []
