"""Gradient clipping and the non-finite guard where the trainer owns them (train/clipping.py): with
torch's fused AdamW they ride on its kernel (grad_scale, found_inf), elsewhere the gradients are
scaled in place; both give the steps of clip_grad_norm_ + AdamW."""

from __future__ import annotations

import math

import pytest
import torch

from retnet_train.train.clipping import clip_and_guard


def _model_and_optimizer(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, fused=fused or None,
                            foreach=None if fused else False)
    return model, opt


def _backward(model, step: int, poison: bool = False) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g) * 4
    loss = model(x).pow(2).mean()
    (loss * float("nan") if poison else loss).backward()


@pytest.mark.parametrize("max_norm", [0.2, 100.0, 0.0])  # clipping at every step, never (the clamp), off
def test_fused_and_in_place_clipping_take_the_steps_of_clip_grad_norm(max_norm):
    """Four steps, the third with a NaN loss: our two paths and the plain reference (clip_grad_norm_,
    a skipped step) end with the same weights, moments and step counts; the norms agree."""
    runs = {}
    for name in ("fused", "in place", "reference"):
        model, opt = _model_and_optimizer(fused=name == "fused")
        norms = []
        for step in range(4):
            _backward(model, step, poison=step == 2)
            params = [p for p in model.parameters() if p.grad is not None]
            if name == "reference":
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                norms.append(float(norm))
                if math.isfinite(norm):
                    if max_norm > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
                    opt.step()
            else:
                norms.append(float(clip_and_guard(opt, params, max_norm)))
                opt.step()
            opt.zero_grad(set_to_none=True)
        runs[name] = (model, opt, norms)
    ref_model, ref_opt, ref_norms = runs["reference"]
    finite = [n for n in ref_norms if math.isfinite(n)]
    assert max_norm in (0, 100) or min(finite) > max_norm  # clipping acts at every step
    assert max_norm != 100 or max(finite) < max_norm  # the coefficient is clamped to 1
    assert math.isnan(ref_norms[2])
    for name in ("fused", "in place"):
        model, opt, norms = runs[name]
        assert math.isnan(norms[2]) and norms[:2] + norms[3:] == pytest.approx(ref_norms[:2] + ref_norms[3:])
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} weights: {m}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-6, atol=1e-9,
                                           msg=lambda m: f"{name} {key}: {m}")
        assert float(opt.state[next(model.parameters())]["step"]) == 3  # the NaN step counted nothing


def test_fused_clipping_leaves_the_gradients_and_tells_the_optimizer():
    """The fused path scales nothing itself: the gradients stay as computed and the optimizer holds
    1 / clip coefficient and the non-finite flag for its kernel."""
    model, opt = _model_and_optimizer(fused=True)
    _backward(model, 0)
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    norm = float(clip_and_guard(opt, params, 0.2))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert float(opt.grad_scale) == pytest.approx((norm + 1e-6) / 0.2) and float(opt.found_inf) == 0.0
    clip_and_guard(opt, params, 0.0)
    assert opt.grad_scale is None
