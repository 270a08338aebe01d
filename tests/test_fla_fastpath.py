"""On CUDA, fla's kernels (chunkwise and recurrent) equal the torch forms, forward and backward."""

import pytest
import torch

from retnet_train.model.kernels import fla_retention
from retnet_train.model.retention import chunkwise_retention, head_log_decays, recurrent_retention

pytestmark = pytest.mark.gpu


def _inputs(B, T, H, K, V, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, K, device="cuda", generator=g).to(dtype)
    k = (torch.randn(B, T, H, K, device="cuda", generator=g) * K ** -0.5).to(dtype)
    v = torch.randn(B, T, H, V, device="cuda", generator=g).to(dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("T", [256, 1000])
def test_chunk_kernel_matches_torch_forward_and_backward(T):
    assert fla_retention.usable(torch.zeros(1, device="cuda")), "fla-core must import on the GPU machine"
    # 8 heads of a 16-head model: the shard of tensor-parallel rank 1 at tp=2
    lg = head_log_decays(16, head_start=8, head_count=8)
    q, k, v = _inputs(2, T, 8, 128, 256, torch.bfloat16)
    state = torch.randn(2, 8, 128, 256, device="cuda") * 0.1
    o_fast, s_fast = fla_retention.retention(q, k, v, lg, "chunkwise", state, need_state=True)
    grads_fast = torch.autograd.grad(o_fast.float().square().sum(), (q, k, v))
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref, s_ref = chunkwise_retention(qf, kf, vf, lg, state, need_state=True, chunk_size=64)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), (qf, kf, vf))
    errs = [rel_err(o_fast, o_ref), rel_err(s_fast, s_ref)] + [rel_err(a, b) for a, b in zip(grads_fast, grads_ref)]
    print(f"T={T} relative L2 errors (o, state, dq, dk, dv): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 2e-2  # bf16 inputs against an fp32 reference


def test_recurrent_kernel_matches_torch():
    lg = head_log_decays(8)
    q, k, v = _inputs(3, 7, 8, 128, 256, torch.bfloat16)
    o_fast, s_fast = fla_retention.retention(q, k, v, lg, "recurrent", None, need_state=True)
    o_ref, s_ref = recurrent_retention(q.float(), k.float(), v.float(), lg)
    errs = [rel_err(o_fast, o_ref), rel_err(s_fast, s_ref)]
    print("recurrent relative L2 errors (o, state): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 2e-2


def test_model_uses_fast_path_and_agrees_with_torch_path(monkeypatch):
    from retnet_train.model import build_model

    model = build_model("retnet_tiny", n_layers=2).cuda()
    ids = torch.randint(0, 8192, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(ids, mode="chunkwise")
    ref = model(ids, mode="parallel")  # always the torch path, fp32
    err = rel_err(fast, ref)
    print(f"model logits, fast chunkwise bf16 vs torch parallel fp32: {err:.2e}")
    assert err < 2e-2
