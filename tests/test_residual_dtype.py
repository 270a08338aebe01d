"""trainer.residual_dtype: the stream the blocks add into is bf16 under autocast when asked (half the
traffic of the residual adds and norms between blocks), the embedding's dtype otherwise, and a
precision without bf16 refuses it by name."""

from __future__ import annotations

import pytest
import torch

from retnet_train.model import build_model
from retnet_train.train.build import residual_dtype


def test_the_key_resolves_against_the_precision():
    for precision in ("bf16", "bf16_autocast", "fp32"):
        assert residual_dtype("weights", precision) is None
    assert residual_dtype("bf16", "bf16_autocast") is torch.bfloat16
    assert residual_dtype("bf16", "bf16") is torch.bfloat16
    # `auto` on a CPU resolves to fp32, which the config check alone cannot see
    with pytest.raises(ValueError, match="trainer.residual_dtype=bf16 needs a bf16 precision; trainer.precision "
                                         "resolved to fp32"):
        residual_dtype("bf16", "fp32")


def _block_inputs(model, ids, cast):
    """Each block's input dtype (pre-hooks), the logits and the embedding's gradient, under CPU autocast."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for block in model.layers]
    model.set_residual_dtype(torch.bfloat16 if cast else None)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    for h in hooks:
        h.remove()
    return seen, logits.float(), model.embed.weight.grad.clone()


@pytest.mark.parametrize("name", ["retnet_tiny", "transformer_tiny"])
def test_a_bf16_stream_reaches_every_block_and_trains_like_the_fp32_one(name):
    torch.manual_seed(0)
    model = build_model(name, kernels="torch")
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    fp32_in, fp32_logits, fp32_grad = _block_inputs(model, ids, cast=False)
    bf16_in, bf16_logits, bf16_grad = _block_inputs(model, ids, cast=True)
    assert fp32_in == [torch.float32] * len(model.layers)  # fp32 weights: the embedding's dtype
    assert bf16_in == [torch.bfloat16] * len(model.layers)
    assert model.embed.weight.grad.dtype == torch.float32  # the weights keep their own dtype
    # the same network to bf16 rounding of the stream, not another one
    rel = ((bf16_logits - fp32_logits).norm() / fp32_logits.norm()).item()
    assert 0 < rel < 2e-2
    grad_rel = ((bf16_grad - fp32_grad).norm() / fp32_grad.norm()).item()
    assert 0 < grad_rel < 5e-2


def test_without_the_key_the_model_is_untouched():
    model = build_model("retnet_tiny", kernels="torch")
    assert model.residual_dtype is None
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        a = model(ids)
        model.set_residual_dtype(None)
        assert torch.equal(model(ids), a)


def test_a_run_records_the_stream_dtype_and_a_resume_that_changes_it_says_so(tmp_path):
    """Through the trainer (CPU, bf16 autocast): the start-up log names the bf16 stream, the run
    learns, the checkpoint's meta records the choice, and a resume with the fp32 stream warns."""
    import json

    from test_train_utils import losses, run_train

    common = ["deepspeed=zero0", "trainer.precision=bf16_autocast", "trainer.eval_at_end=false",
              "optim.decay_steps=4"]
    run_train(tmp_path, "trainer.max_steps=3", "trainer.residual_dtype=bf16", *common)
    log = (tmp_path / "logs" / "rank00000.log").read_text()
    assert "residual stream bf16" in log
    got = losses(tmp_path)
    assert got[3] < got[1] - 0.3  # it learns
    meta = json.loads(next((tmp_path / "checkpoints").glob("step_*/meta.json")).read_text())
    assert (meta["residual_dtype"], meta["float8"], meta["float8_fast_accum"]) == ("bf16", "none", "output")
    run_train(tmp_path, "trainer.max_steps=4", *common)
    log = (tmp_path / "logs" / "rank00000.log").read_text()
    assert "resumed from" in log and "residual stream as the weights" in log
    assert ("trainer.residual_dtype=weights from here on; the checkpoint's steps ran with "
            "trainer.residual_dtype=bf16") in log
