"""On CUDA: fla's kernels (chunkwise and recurrent) equal the torch forms, forward and backward; a
model built with kernels=fla uses them, agrees with kernels=torch, compiles into one graph and
checkpoints selectively; the fused head norm + gate and liger's linear cross-entropy agree in bf16."""

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
    assert fla_retention.usable(torch.zeros(1, device="cuda"))
    lg = head_log_decays(8)
    q, k, v = _inputs(3, 7, 8, 128, 256, torch.bfloat16)
    o_fast, s_fast = fla_retention.retention(q, k, v, lg, "recurrent", None, need_state=True)
    o_ref, s_ref = recurrent_retention(q.float(), k.float(), v.float(), lg)
    errs = [rel_err(o_fast, o_ref), rel_err(s_fast, s_ref)]
    print("recurrent relative L2 errors (o, state): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 2e-2


def _twin_models(**overrides):
    """The same weights built with kernels=fla and kernels=torch, on the GPU."""
    from retnet_train.model import build_model

    with torch.device("cuda"):
        torch.manual_seed(0)
        fast = build_model("retnet_tiny", n_layers=2, kernels="fla", **overrides)
        ref = build_model("retnet_tiny", n_layers=2, kernels="torch", **overrides)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def test_model_uses_fast_path_and_agrees_with_torch_path():
    fast, ref = _twin_models()
    assert fast.kernels == "fla" and ref.kernels == "torch"
    ids = torch.randint(0, 8192, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(ids, mode="chunkwise")
    want = ref(ids, mode="parallel")  # the torch path, fp32
    err = rel_err(out, want)
    print(f"model logits, fla chunkwise + fused norm-gate bf16 vs torch parallel fp32: {err:.2e}")
    assert err < 2e-2


def test_compiled_fla_model_has_no_graph_break():
    fast, _ = _twin_models()
    ids = torch.randint(0, 8192, (2, 256), device="cuda")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(ids, mode="chunkwise", return_hidden=True)
    print(f"graphs {explained.graph_count}, breaks {explained.graph_break_count}: {explained.break_reasons}")
    assert explained.graph_break_count == 0, explained.break_reasons
    # forward and backward through the compiled graph (the backward ops are traced with fake tensors)
    grads = []
    for fn in (fast, torch.compile(fast)):
        fast.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn(ids, mode="chunkwise").float().logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in fast.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-2


def test_selective_checkpointing_with_fla_kernels():
    fast, _ = _twin_models()
    ids = torch.randint(0, 8192, (2, 256), device="cuda")
    grads = {}
    for mode in ("none", "selective", "full"):
        fast.set_activation_checkpointing(mode)
        fast.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fast(ids, mode="chunkwise").float().logsumexp(-1).mean()
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in fast.parameters()])
    for mode in ("selective", "full"):
        assert rel_err(grads[mode], grads["none"]) < 1e-3, mode


@pytest.mark.parametrize("kind", ["groupnorm", "rmsnorm"])
def test_norm_gate_kernel_bf16_on_gpu(kind):
    import torch.nn.functional as F

    from retnet_train.model.kernels.norm_gate import gated_head_norm
    from retnet_train.model.layers import HeadNorm

    torch.manual_seed(0)
    norm = HeadNorm(8, 512, kind, 1e-6, True).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    o = torch.randn(2, 1000, 8, 512, device="cuda").bfloat16().requires_grad_()
    g = torch.randn(2, 1000, 8 * 512, device="cuda").bfloat16().requires_grad_()
    y = gated_head_norm(o, g, norm, "swish", "fla")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (o, g, norm.weight), dy)
    of, gf = o.detach().float().requires_grad_(), g.detach().float().requires_grad_()
    ref = F.silu(gf) * norm(of)
    ref_grads = torch.autograd.grad(ref, (of, gf, norm.weight), dy.float())
    errs = [rel_err(y, ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
    print(f"norm-gate {kind} bf16 vs fp32 torch (y, do, dg, dweight): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-2


@pytest.mark.parametrize("impl", ["torch", "liger"])
def test_linear_cross_entropy_bf16_on_gpu(impl):
    import torch.nn.functional as F

    from retnet_train.model.kernels.linear_ce import linear_cross_entropy

    torch.manual_seed(0)
    hidden = (torch.randn(4096, 2048, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(32000, 2048, device="cuda") * 2048 ** -0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (4096,), device="cuda")
    labels[::7] = -100
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    errs = [abs(loss.item() - ref.item()), rel_err(dh, rh), rel_err(dw, rw)]
    print(f"linear CE {impl} bf16 vs full logits (|loss diff|, dhidden, dweight): " + ", ".join(f"{e:.2e}" for e in errs))
    assert errs[0] < 1e-4 and max(errs[1:]) < 1e-2
