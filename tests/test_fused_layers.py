"""Fused layers equal the plain PyTorch they replace, forward and backward: the head norm + swish gate
Triton kernel (under the Triton interpreter on CPU), the chunked linear cross-entropy (also
vocabulary-parallel, 2 gloo processes), and the FFN activations recomputed in backward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from retnet_train.model.layers import FeedForward, HeadNorm

# ---- head norm + swish gate (kernels/norm_gate.py) ----------------------------------------------------


@pytest.fixture
def interpreter(monkeypatch, request) -> bool:
    """Triton kernels on CPU tensors (TRITON_INTERPRET=1). Triton reads it when it is first imported
    (its own library functions are decorated then); if this process imported triton without it,
    the test runs again in a fresh process, and the fixture returns False (nothing left to do here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "triton" in sys.modules:
        import triton.language.standard

        if type(triton.language.standard.sigmoid).__name__ != "InterpretedFunction":
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                                  cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
            return False
    pytest.importorskip("triton")
    return True


@pytest.mark.parametrize("kind", ["groupnorm", "rmsnorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_gate_kernel_matches_head_norm_and_silu(interpreter, kind, affine):
    if not interpreter:
        return  # ran (and passed) in a fresh process
    from retnet_train.model.kernels.norm_gate import gated_head_norm

    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 24  # D not a power of two: masked lanes
    norm = HeadNorm(H, D, kind, 1e-6, affine)
    if affine:  # distinct per-head weights, so a wrong head index shows
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if norm.bias is not None:
                norm.bias.uniform_(-0.5, 0.5)
    o = (torch.randn(B, T, H, D) * 3 + 1).requires_grad_()
    g = torch.randn(B, T, H * D).requires_grad_()
    params = [o, g] + list(norm.parameters())

    y = gated_head_norm(o, g, norm, "swish", kernels="triton")
    ref = F.silu(g) * norm(o)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, params, dy)
    ref_grads = torch.autograd.grad(ref, params, dy)

    assert y.shape == ref.shape == (B, T, H * D)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["o", "g", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def _norm_gate_projection_inputs(B: int, T: int, H: int, D: int):
    """o [B, T, H, D], g [B, T, H * D] (leaves), a HeadNorm with distinct per-channel weights, an
    nn.Linear(H * D, 16), and every tensor whose gradient the tests compare."""
    torch.manual_seed(0)
    norm = HeadNorm(H, D, "groupnorm", 1e-6, True)
    proj = torch.nn.Linear(H * D, 16, bias=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    o = (torch.randn(B, T, H, D) * 3 + 1).requires_grad_()
    g = torch.randn(B, T, H * D).requires_grad_()
    return o, g, norm, proj, [o, g, *norm.parameters(), *proj.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
def test_norm_gate_with_projection_recomputes_y_equal_gradients_and_saves_less(interpreter, autocast):
    """gated_norm_projection (training: the gated output y is recomputed in backward for the output
    projection's weight gradient) gives the norm-gate + nn.Linear gradients and keeps exactly y less;
    under bf16 autocast (fp32 weights) the gradients keep their weights' dtypes."""
    if not interpreter:
        return  # ran (and passed) in a fresh process
    from retnet_train.model.kernels.norm_gate import gated_head_norm, gated_norm_projection

    B, T, H, D = 2, 5, 3, 24
    o, g, norm, proj, params = _norm_gate_projection_inputs(B, T, H, D)

    def ours():
        return gated_norm_projection(o, g, norm, proj)

    def plain():
        return proj(gated_head_norm(o, g, norm, "swish", kernels="triton"))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, ref = ours(), plain()
        assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(out, ref)
        saved, saved_plain = _saved_bytes(ours, params), _saved_bytes(plain, params)
    dy = torch.randn_like(out)
    grads, ref_grads = torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)
    for name, a, b in zip(["o", "g", "norm weight", "norm bias", "proj weight", "proj bias"], grads, ref_grads):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"d{name}: {m}")
    # y, and under autocast the projection weight's bf16 copy too (the backward casts it again)
    y_bytes = B * T * H * D * (2 if autocast else 4)
    assert saved_plain - saved == y_bytes + (proj.weight.numel() * 2 if autocast else 0), (saved, saved_plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_norm_gate_with_projection_compiled_keeps_only_its_inputs(interpreter, autocast):
    """Under torch.compile the gated-norm projection keeps o and g (and at most the norm's two
    statistics per token and head), not y: traced as the autograd Function it kept y, as the
    compiled norm-gate + nn.Linear does. Outputs and gradients (values and dtypes, also under bf16
    autocast) equal eager ones."""
    if not interpreter:
        return  # ran (and passed) in a fresh process
    from retnet_train.model.kernels.norm_gate import gated_head_norm, gated_norm_projection

    B, T, H, D = 2, 5, 3, 24
    o, g, norm, proj, params = _norm_gate_projection_inputs(B, T, H, D)
    ours = torch.compile(lambda: gated_norm_projection(o, g, norm, proj))
    plain = torch.compile(lambda: proj(gated_head_norm(o, g, norm, "swish", kernels="triton")))

    inputs_bytes, stats_bytes = (o.numel() + g.numel()) * 4, 2 * B * T * H * 4
    y_bytes = B * T * H * D * (2 if autocast else 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert inputs_bytes <= _saved_bytes(ours, params[2:]) <= inputs_bytes + stats_bytes
        assert _saved_bytes(plain, params[2:]) >= inputs_bytes + y_bytes
        out = ours()
        ref = gated_norm_projection(o, g, norm, proj)  # eager: the autograd Function
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(out)
    grads, ref_grads = torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)
    for name, a, b in zip(["o", "g", "norm weight", "norm bias", "proj weight", "proj bias"], grads, ref_grads):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def _residual_and_next_norm(proj):
    """The residual stream x [2, 5, d] the projection adds to, and the norm after it (a block's)."""
    return torch.randn(2, 5, proj.out_features, requires_grad=True), torch.nn.LayerNorm(proj.out_features)


def test_norm_gate_with_projection_compiled_in_a_residual_block_runs_the_projection_once(interpreter):
    """In a block the region's output feeds the residual and the next norm, whose backward needs
    x + out: the backward recomputes the gated output y only. Left to recompute all of the region,
    the compiler re-ran the projection in backward to rebuild x + out (a fourth matmul)."""
    if not interpreter:
        return  # ran (and passed) in a fresh process
    from torch.profiler import ProfilerActivity, profile

    from retnet_train.model.kernels.norm_gate import gated_norm_projection

    o, g, norm, proj, params = _norm_gate_projection_inputs(2, 5, 3, 24)
    x, after = _residual_and_next_norm(proj)
    block = torch.compile(lambda: after(x + gated_norm_projection(o, g, norm, proj)))
    block().sum().backward()  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block().sum().backward()
    matmuls = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::linear")]
    assert len(matmuls) == 3, matmuls  # forward, and the weight's and the input's gradients


def test_norm_gate_with_projection_compiled_in_a_checkpointed_block_keeps_nothing_of_its_own(interpreter):
    """Inside a fully checkpointed compiled block (only the block's input may stay) the region runs
    with keep_output=False: it adds nothing to what the block keeps. Kept, its output would stay too."""
    if not interpreter:
        return  # ran (and passed) in a fresh process
    from torch.utils.checkpoint import checkpoint

    from retnet_train.model.kernels.norm_gate import gated_norm_projection

    o, g, norm, proj, params = _norm_gate_projection_inputs(2, 5, 3, 24)
    x, after = _residual_and_next_norm(proj)
    weights = {p.data_ptr() for p in [*params, *after.parameters()]}  # o, g and the parameters

    def kept(keep_output: bool) -> list:
        def block(x, o, g):
            return after(x + gated_norm_projection(o, g, norm, proj, keep_output))

        compiled = torch.compile(lambda: checkpoint(block, x, o, g, use_reentrant=False))
        compiled().sum().backward()
        shapes = []

        def pack(t):
            if t.data_ptr() not in weights:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compiled()
        torch._dynamo.reset()
        return sorted(shapes)

    assert kept(False) == [tuple(x.shape)]  # the block's input only (o, g and the weights are leaves: not counted)
    assert (x.shape[0] * x.shape[1], proj.out_features) in kept(True)  # what the region kept of its own


def test_norm_gate_torch_choice_is_plain_pytorch():
    """kernels=torch never reaches Triton: the same expression as the model always had."""
    from retnet_train.model.kernels.norm_gate import gated_head_norm

    torch.manual_seed(0)
    norm = HeadNorm(2, 8, "groupnorm", 1e-6, True)
    o, g = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 16)
    assert torch.equal(gated_head_norm(o, g, norm, "swish", "torch"), F.silu(g) * norm(o))
    assert torch.equal(gated_head_norm(o, g, norm, "gelu", "fla"), F.gelu(g) * norm(o))  # no fused GELU gate


# ---- linear cross-entropy (kernels/linear_ce.py) --------------------------------------------------------


def _loss_inputs(N=30, d=16, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 7, 8, 9, 29]] = -100  # ignored, also a whole chunk of them (chunk 7: tokens 7..13 partly)
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_linear_cross_entropy_equals_full_logits(reduction, chunk):
    from retnet_train.model.kernels.linear_ce import linear_cross_entropy

    hidden, weight, labels = _loss_inputs()
    loss = linear_cross_entropy(hidden, weight, labels, reduction, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))  # a non-unit incoming gradient
    ref = F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100, reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 1.7, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _autograd_node_names(root) -> "collections.Counter":
    import collections

    seen, stack, names = set(), [root], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_chunked_head_cross_entropy_equals_full_logits():
    """The module-call variant (ZeRO-3 / tensor parallelism): each chunk checkpointed."""
    from retnet_train.model.kernels.linear_ce import chunked_head_cross_entropy

    hidden, weight, labels = _loss_inputs()
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    loss = chunked_head_cross_entropy(hidden[None], head, labels[None], chunk_tokens=7)
    # the chunks' gradients join in one cat (split's backward), not in per-chunk whole-size adds
    nodes = _autograd_node_names(loss.grad_fn)
    assert nodes["SplitBackward0"] == 1 and nodes["SliceBackward0"] == 0, nodes
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        ref_head.weight.copy_(weight)
    ref = F.cross_entropy(ref_head(ref_hidden), labels, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, rtol=1e-5, atol=1e-5)


def test_chunked_linear_cross_entropy_bf16_weights():
    """bf16 hidden states and weight (DeepSpeed's bf16 mode): close to bf16 logits cast to fp32."""
    from retnet_train.model.kernels.linear_ce import linear_cross_entropy

    hidden, weight, labels = _loss_inputs(dtype=torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=7)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref = F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # the same bf16 matmul, then fp32
    for a, b in ((dh, rh), (dw, rw)):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


def test_trainer_loss_from_hidden_equals_lm_loss():
    """evaluate.lm_loss_from_hidden (trainer.fused_loss) against lm_loss of the model's logits."""
    from retnet_train.model import build_model
    from retnet_train.model.kernels import linear_ce
    from retnet_train.train.evaluate import lm_loss, lm_loss_from_hidden

    torch.manual_seed(0)
    model = build_model("retnet_tiny", vocab_size=97, d_model=32, n_layers=2, n_heads=2, kernels="torch")
    ids = torch.randint(0, 97, (2, 24))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    ref = lm_loss(model(ids), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    old, linear_ce.CHUNK_TOKENS = linear_ce.CHUNK_TOKENS, 10
    try:
        loss = lm_loss_from_hidden(model(ids, return_hidden=True), model.lm_head, labels, kernels=model.kernels)
    finally:
        linear_ce.CHUNK_TOKENS = old
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _vocab_parallel_worker(rank, init_file, result_dir):
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    from retnet_train.model import build_model
    from retnet_train.model.kernels import linear_ce
    from retnet_train.parallel.tensor_parallel import apply_tensor_parallel, shard_state_dict
    from retnet_train.train.evaluate import lm_loss_from_hidden

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    initialize_model_parallel(2)
    torch.manual_seed(0)
    model = build_model("retnet_tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, kernels="torch")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = -100
    labels[0, 5:20] = -100  # a whole chunk of 10 ignored
    ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    ref_grads = shard_state_dict({n: p.grad for n, p in model.named_parameters()}, rank, 2)
    model.zero_grad()
    apply_tensor_parallel(model, rank, 2)
    linear_ce.CHUNK_TOKENS = 10  # 8 chunks of the 80 tokens
    loss = lm_loss_from_hidden(model(ids, return_hidden=True), model.lm_head, labels, vocab_parallel=True)
    loss.backward()
    errs = {n: ((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
            for n, p in model.named_parameters()}
    torch.save({"loss": loss.item(), "ref": ref.item(), "errs": errs}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_vocab_parallel_chunked_loss_equals_plain_loss(tmp_path):
    mp.spawn(_vocab_parallel_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert abs(r["loss"] - r["ref"]) < 1e-5, r
        worst = max(r["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-4, worst


# ---- FFN activations recomputed in backward (layers.py) ------------------------------------------------


def _plain_ffn(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """The FFN as autograd would store it: fc1, fp32 activation, (gate), fc2."""
    h = ffn.fc1(x)
    act = F.silu if ffn.act_name == "swish" else F.gelu
    h = act(h.float()).type_as(h)
    if ffn.gate is not None:
        h = h * ffn.gate(x)
    return ffn.fc2(h)


def _saved_bytes(fn, parameters=()) -> int:
    """Bytes of the tensors autograd keeps for fn's backward; `parameters` (kept anyway) not counted."""
    total = 0
    kept_anyway = {p.data_ptr() for p in parameters}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in kept_anyway:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("flavour", [dict(ffn_type="gelu"), dict(ffn_type="glu", glu_activation="swish"),
                                     dict(ffn_type="glu", glu_activation="gelu", bias=True)])
def test_ffn_activation_recomputed_gives_equal_gradients_and_saves_less(flavour):
    from retnet_train.model import load_preset

    torch.manual_seed(0)
    ffn = FeedForward(load_preset("retnet_tiny", d_model=16, **flavour))
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [x] + list(ffn.parameters())
    out, ref = ffn(x), _plain_ffn(ffn, x)
    assert torch.equal(out, ref)
    dy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # in bf16, per hidden unit: fc1's bf16 output (2 bytes) is kept instead of its fp32 copy (4) and
    # fc2's input (2); the GLU also drops the activation output (2)
    ffn, xb = ffn.to(torch.bfloat16), x.detach().to(torch.bfloat16).requires_grad_()
    ours, plain = _saved_bytes(lambda: ffn(xb)), _saved_bytes(lambda: _plain_ffn(ffn, xb))
    units = 2 * 5 * ffn.fc1.out_features
    assert plain - ours == units * (4 if ffn.gate is None else 6), (ours, plain)


def test_ffn_under_autocast_matches_plain():
    """fp32 weights, bf16 matmuls (trainer.precision=bf16_autocast): the backward runs fc2 in the
    dtype autocast chose in forward and hands fp32 gradients to the fp32 weights."""
    from retnet_train.model import load_preset

    torch.manual_seed(0)
    ffn = FeedForward(load_preset("retnet_tiny", d_model=16, ffn_type="glu", bias=True))
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [x] + list(ffn.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ffn(x), _plain_ffn(ffn, x)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    dy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)


def test_chunked_linear_cross_entropy_without_grad_computes_no_gradient(monkeypatch):
    """Under no_grad (evaluation) the chunked loss does only the forward matmul per chunk."""
    from retnet_train.model.kernels import linear_ce

    hidden, weight, labels = _loss_inputs()
    calls = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or real_matmul(a, b))
    with torch.no_grad():
        loss = linear_ce.linear_cross_entropy(hidden, weight, labels, "sum", chunk_tokens=7)
    assert len(calls) == 5  # 30 tokens in chunks of 7: one logits matmul each
    ref = F.cross_entropy(real_matmul(hidden, weight.t()), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, extra", [("retnet_tiny", {}), ("transformer_tiny", {}),
                                         ("retnet_tiny", {"ffn_type": "glu"})])
def test_projections_of_one_input_keep_one_bf16_copy_under_autocast(arch, extra):
    """Eager autocast casts each linear's input anew and autograd keeps every cast: q, k, v (and g),
    and the GLU's fc1 and gate, must keep one shared bf16 copy of their input (layers.py
    cast_once_for_autocast), with the same outputs and the same gradients: the readers' input
    gradients are added in fp32, as with a cast per linear (adding them in bf16 moved gradients by
    up to 0.9%)."""
    from retnet_train.model import build_model
    from retnet_train.model.layers import cast_once_for_autocast

    torch.manual_seed(0)
    model = build_model(arch, kernels="torch", vocab_size=97, d_model=32, n_layers=1, n_heads=2, **extra).train()
    B, T = 2, 24
    ids = torch.randint(0, 97, (B, T))
    params = {p.data_ptr() for p in model.parameters()}

    def run():
        """(distinct bf16 tensors of B x T x d_model values kept for backward: the norms' outputs
        cast, and q and k, the same in both runs; a linear keeps its input as a 2-D view), the
        output, the gradients."""
        seen = set()

        def pack(t):
            if t.dtype == torch.bfloat16 and t.numel() == B * T * 32 and t.data_ptr() not in params:
                seen.add(t.data_ptr())
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, mode="chunkwise")
        out.float().pow(2).mean().backward()
        return len(seen), out, {n: p.grad.clone() for n, p in model.named_parameters()}

    import retnet_train.model.layers as layers_module
    import retnet_train.model.retnet as retnet_module
    import retnet_train.model.transformer as transformer_module

    ours, out, grads = run()
    modules = (layers_module, retnet_module, transformer_module)
    try:  # the same model casting per linear, as autocast alone does
        for m in modules:
            m.cast_once_for_autocast = lambda x, linears: (x,) * len(linears)
        per_linear, ref, ref_grads = run()
    finally:
        for m in modules:
            m.cast_once_for_autocast = cast_once_for_autocast
    assert torch.equal(out, ref)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # one copy per norm output (the mixing's, the FFN's; the final norm's feeds the head in fp32 here)
    shared_inputs = 2 if extra.get("ffn_type") == "glu" else 1  # the FFN's input is shared only by the GLU
    assert per_linear - ours == (3 if arch == "retnet_tiny" else 2) + (shared_inputs - 1), (ours, per_linear)


def test_cast_once_leaves_other_linears_and_no_autocast_alone():
    """A tensor-parallel (or any non-nn.Linear) reader all-reduces its input's gradient: x stays as
    it is there, and without autocast, so the gradients stay fp32."""
    from retnet_train.model.layers import cast_once_for_autocast

    class Sharded(torch.nn.Linear):
        pass

    x = torch.randn(3, 8, requires_grad=True)
    plain = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = cast_once_for_autocast(x, plain)
        assert all(t.dtype == torch.bfloat16 for t in shared) and shared[0].data_ptr() == shared[1].data_ptr()
        assert all(t is x for t in cast_once_for_autocast(x, [plain[0], Sharded(8, 4)]))
    assert all(t is x for t in cast_once_for_autocast(x, plain))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_norm_gate_projection_real_shapes_bf16_autocast(compiled):
    """retnet_1.3b's heads (8 x d_v 512 into d_model 2048), fp32 weights under bf16 autocast, 2 x 2048
    tokens: gated_norm_projection's output and gradients equal the norm-gate kernel + nn.Linear's,
    eager (the autograd Function) and compiled (the checkpointed region keeping the matmul's output)."""
    from retnet_train.model.kernels.norm_gate import gated_head_norm, gated_norm_projection

    torch.manual_seed(0)
    B, T, H, D = 2, 2048, 8, 512
    norm = HeadNorm(H, D, "groupnorm", 1e-6, True).cuda()
    proj = torch.nn.Linear(H * D, 2048, bias=False).cuda()
    o = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [o, g, *norm.parameters(), proj.weight]
    ours = torch.compile(gated_norm_projection) if compiled else gated_norm_projection
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ours(o, g, norm, proj)
        ref = proj(gated_head_norm(o, g, norm, "swish", kernels="triton"))
    if compiled:  # inductor may pick another matmul kernel: equal to bf16 rounding
        assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-3
    else:
        assert torch.equal(out, ref)
    dy = torch.randn_like(out)
    for name, a, b in zip(["o", "g", "norm weight", "norm bias", "proj weight"],
                          torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)):
        assert a.dtype == b.dtype, name
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-3, name
