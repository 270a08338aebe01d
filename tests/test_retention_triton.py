"""Our Triton retention kernels equal the torch forms: forward, backward, varlen, decoding, AOT.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
here before triton is first imported); with CUDA the same small-shape tests run natively, and the
gpu-marked ones check the real head shapes in bf16.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from retnet_train.model.kernels import retention_triton as RT  # noqa: E402
from retnet_train.model.kernels.retention_launch import Tuning  # noqa: E402
from retnet_train.model.retention import (chunkwise_retention, head_log_decays, parallel_retention,  # noqa: E402
                                          recurrent_retention)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
# fp32 kernels (exact fp32 products) against a float64 reference
TOL = 2e-5
# the last one: four state steps per segment (states_bt < chunk) and score tiles twice the chunk
TUNINGS = [Tuning(chunk=16, segment_chunks=1), Tuning(chunk=16, segment_chunks=2), Tuning(chunk=32),
           Tuning(chunk=32, segment_chunks=2, states_bt=16, score_block=64)]
TUNING_IDS = ["seg1", "seg2", "c32", "bt16-sb64"]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def inputs(B, T, H, K, V, seed=0, n_states=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64) * K ** -0.5
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    s0 = torch.randn(n_states or B, H, K, V, generator=g, dtype=torch.float64) * 0.1
    return q, k, v, s0


def ours(q, k, v, lg, s0, need_state, tuning, cu_seqlens=None):
    """Our kernels in fp32 on DEV, leaves that require grad; returns (o, final, leaves)."""
    leaves = [None if x is None else x.detach().float().to(DEV).requires_grad_() for x in (q, k, v, s0)]
    cu = None if cu_seqlens is None else cu_seqlens.to(DEV)
    o, f = RT.chunk_retention(*leaves[:3], lg, leaves[3], need_state, cu, chunk_size=tuning.chunk, tuning=tuning)
    return o, f, leaves


@pytest.mark.parametrize("tuning", TUNINGS, ids=TUNING_IDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_torch(tuning, with_state):
    # T = 50: not a multiple of the chunk; d_v = 48: not a power of two (masked columns)
    lg = head_log_decays(3)
    q, k, v, s0 = inputs(2, 50, 3, 32, 48)
    s0 = s0 if with_state else None
    o, f, _ = ours(q, k, v, lg, s0, True, tuning)
    o_ref, f_ref = parallel_retention(q, k, v, lg, s0, need_state=True)
    o_chunk, _ = chunkwise_retention(q, k, v, lg, s0, chunk_size=16)
    assert rel(o, o_ref) < TOL and rel(f, f_ref) < TOL and rel(o, o_chunk) < TOL
    assert o.dtype == torch.float32 and f.dtype == torch.float32


@pytest.mark.parametrize("tuning", TUNINGS, ids=TUNING_IDS)
def test_backward_matches_autograd(tuning):
    # the loss reads o and the final state, so d(final state) flows back into every gradient
    lg = head_log_decays(2, schedule="linspace")
    q, k, v, s0 = inputs(2, 45, 2, 32, 16, seed=1)
    w_o, w_f = torch.randn(2, 45, 2, 16, dtype=torch.float64), torch.randn(2, 2, 32, 16, dtype=torch.float64)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o_ref, f_ref = parallel_retention(*ref_leaves[:3], lg, ref_leaves[3], need_state=True)
    ((o_ref * w_o).sum() + (f_ref * w_f).sum()).backward()
    o, f, leaves = ours(q, k, v, lg, s0, True, tuning)
    ((o * w_o.to(o)).sum() + (f * w_f.to(f)).sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), leaves, ref_leaves):
        assert rel(a.grad, b.grad) < TOL, name


@pytest.mark.parametrize("keep", ["states", "scores"])
def test_kept_forward_results_give_the_recomputing_backward_s_gradients_exactly(monkeypatch, keep):
    # Tuning.keep_states / keep_scores hand the forward's segment states / in-segment scores to the
    # backward instead of recomputing them: one pass less, the same numbers, so every gradient is
    # bit-identical
    passes = []
    for name in ("segment_states", "intra_scores"):
        real = getattr(RT.L, name)
        monkeypatch.setattr(RT.L, name, lambda *a, real=real, name=name, **kw: passes.append(name) or real(*a, **kw))
    lg = head_log_decays(2, schedule="linspace")
    q, k, v, s0 = inputs(1, 100, 2, 32, 16, seed=3, n_states=2)
    cu = torch.tensor([0, 37, 100], dtype=torch.int32)  # two documents: a state each
    w = torch.randn(1, 100, 2, 16, dtype=torch.float64)
    grads, counts = [], []
    for kept in (False, True):
        passes.clear()
        tuning = Tuning(chunk=16, segment_chunks=1, **{f"keep_{keep}": kept})
        o, f, leaves = ours(q.reshape(1, 100, 2, 32), k, v, lg, s0, True, tuning, cu_seqlens=cu)
        ((o * w.to(o)).sum() + f.sum()).backward()
        grads.append([x.grad for x in leaves])
        counts.append({n: passes.count(n) for n in ("segment_states", "intra_scores")})
    # recomputing: forward states + scores, backward states (recomputed) + reverse walk, scores
    # (recomputed) + their gradient's scores
    assert counts[0] == {"segment_states": 3, "intra_scores": 3}
    kept_pass = {"states": "segment_states", "scores": "intra_scores"}[keep]
    assert counts[1] == {**counts[0], kept_pass: 2}
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), *grads):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", ["plain", "state-keep-both", "varlen-keep-states", "bf16-state-nograd",
                                  "permuted"])
def test_chunk_op_passes_torch_library_opcheck(case):
    """The custom op's registration (schema, fake shapes, strides and dtypes, autograd, and its
    backward op's under AOTAutograd) agrees with its kernels, as torch.compile relies on:
    torch.library.opcheck, each kept tensor, the varlen layout, bf16, an incoming state without
    gradient and inputs of other strides."""
    lg2 = RT.log2_decays(head_log_decays(2), DEV)
    g = torch.Generator().manual_seed(5)
    B, T = (1, 50) if case.startswith("varlen") else (2, 40)
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    if case == "permuted":  # [B, H, T, D] transposed: dense, not contiguous
        q, k, v = (torch.randn(B, 2, T, d, generator=g).to(DEV).transpose(1, 2).requires_grad_() for d in (16, 16, 32))
    else:
        q, k, v = (torch.randn(B, T, 2, d, generator=g).to(DEV, dtype).requires_grad_() for d in (16, 16, 32))
    init = None
    if "state" in case:
        init = torch.randn(B, 2, 16, 32, generator=g).to(DEV).requires_grad_(not case.endswith("nograd"))
    cu = torch.tensor([0, 13, 50], dtype=torch.int32, device=DEV) if case.startswith("varlen") else None
    keep = {"state-keep-both": dict(keep_states=True, keep_scores=True),
            "varlen-keep-states": dict(keep_states=True)}.get(case, {})
    tuning = RT._tuning_ints(Tuning(chunk=16, segment_chunks=1, **keep))
    # the AOT check runs the op twice and compares every output: varlen's kept states have padding
    # entries the kernels never write (and it randomises cu_seqlens), so it runs on fixed-length rows
    aot = ("test_aot_dispatch_dynamic",) if cu is None else ()
    torch.library.opcheck(torch.ops.retnet.retention_chunk.default, (q, k, v, lg2, init, cu, True, tuning),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration", *aot))


def test_flop_counter_counts_the_op_as_the_model_does():
    """The compiler's cost estimates (the activation memory budget's choice) see the op's FLOPs:
    model/flops.py's chunk count forward, twice that backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from retnet_train.model.config import ModelConfig
    from retnet_train.model.flops import retention_flops

    B, T, H, K, V = 2, 48, 2, 16, 32
    q, k, v = (torch.randn(B, T, H, d, device=DEV, requires_grad=True) for d in (K, K, V))
    with FlopCounterMode(display=False) as counter:
        o, _ = RT.chunk_retention(q, k, v, head_log_decays(H), chunk_size=16)
        o.sum().backward()
    cfg = ModelConfig(n_heads=H, d_model=H * K, value_dim=H * V, chunk_size=16)
    forward, backward = (B * f for f in retention_flops(cfg, T))
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.retnet.retention_chunk] == forward
    assert counts[torch.ops.retnet.retention_chunk_backward] == backward


def test_tuning_travels_through_the_op_unchanged():
    assert {f.name for f in dataclasses.fields(Tuning)} == {*RT._TUNING_FIELDS, "state_block"}
    for tuning in [*TUNINGS, Tuning(state_block=(64, 32), block_z=64, num_warps=8, keep_scores=True),
                   Tuning(chunk=32, segment_chunks=2, block_k=32, num_stages=1, states_stages=1, states_bt=16,
                          score_block=64, keep_states=True)]:
        assert RT._tuning_of(RT._tuning_ints(tuning)) == tuning


def test_backward_without_state():
    lg = head_log_decays(2)
    q, k, v, _ = inputs(1, 40, 2, 16, 32, seed=2)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    parallel_retention(*ref_leaves, lg)[0].square().sum().backward()
    o, f, leaves = ours(q, k, v, lg, None, False, Tuning(chunk=16, segment_chunks=2))
    assert f is None
    o.square().sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert rel(a.grad, b.grad) < TOL, name


@pytest.mark.parametrize("tuning", [Tuning(chunk=16, segment_chunks=1), Tuning(chunk=16), TUNINGS[-1]],
                         ids=["seg1", "auto", TUNING_IDS[-1]])
def test_varlen_equals_each_sequence_alone(tuning):
    # an empty sequence, one shorter than a chunk, ones that end mid-chunk and mid-segment
    cu = torch.tensor([0, 7, 7, 40, 90], dtype=torch.int32)
    N, H, K, V = 4, 2, 16, 32
    lg = head_log_decays(H)
    q, k, v, s0 = inputs(1, 90, H, K, V, seed=3, n_states=N)
    w_o = torch.randn(1, 90, H, V, dtype=torch.float64)
    w_f = torch.randn(N, H, K, V, dtype=torch.float64)
    o, f, leaves = ours(q, k, v, lg, s0, True, tuning, cu_seqlens=cu)
    ((o * w_o.to(o)).sum() + (f * w_f.to(f)).sum()).backward()
    for n in range(N):
        a, b = cu[n].item(), cu[n + 1].item()
        ref_leaves = [x[:, a:b].clone().requires_grad_() for x in (q, k, v)] + [s0[n:n + 1].clone().requires_grad_()]
        o_r, f_r = parallel_retention(*ref_leaves[:3], lg, ref_leaves[3], need_state=True)
        ((o_r * w_o[:, a:b]).sum() + (f_r * w_f[n:n + 1]).sum()).backward()
        assert rel(f[n:n + 1], f_r) < TOL and rel(leaves[3].grad[n:n + 1], ref_leaves[3].grad) < TOL
        if b > a:
            assert rel(o[:, a:b], o_r) < TOL
            for name, ours_leaf, ref in zip(("dq", "dk", "dv"), leaves, ref_leaves):
                assert rel(ours_leaf.grad[:, a:b], ref.grad) < TOL, (n, name)
        else:  # nothing in it: the state passes through, and so does its gradient
            assert torch.equal(f[n].cpu(), s0[n].float()) and torch.equal(leaves[3].grad[n].cpu(), w_f[n].float())


def test_wide_heads_are_split(monkeypatch):
    # shrink the per-call limits so d_k 32 / d_v 48 take the split path (2 key x 3 value slices)
    monkeypatch.setattr(RT, "MAX_DK", 16)
    monkeypatch.setattr(RT, "MAX_DV", 16)
    lg = head_log_decays(2)
    q, k, v, s0 = inputs(1, 30, 2, 32, 48, seed=4)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o_ref, f_ref = parallel_retention(*ref_leaves[:3], lg, ref_leaves[3], need_state=True)
    (o_ref.sum() + f_ref.square().sum()).backward()
    o, f, leaves = ours(q, k, v, lg, s0, True, Tuning(chunk=16))
    (o.sum() + f.square().sum()).backward()
    assert rel(o, o_ref) < TOL and rel(f, f_ref) < TOL
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), leaves, ref_leaves):
        assert rel(a.grad, b.grad) < TOL, name


def test_preset_head_dims_with_default_tiles():
    # d_k 256 / d_v 512 as in the presets, default tuning (chunk 64; the column blocks the GPU uses)
    lg = head_log_decays(2)
    q, k, v, s0 = inputs(1, 150, 2, 256, 512, seed=7)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o_ref, f_ref = parallel_retention(*ref_leaves[:3], lg, ref_leaves[3], need_state=True)
    (o_ref.sum() + f_ref.square().sum()).backward()
    leaves = [x.detach().float().to(DEV).requires_grad_() for x in (q, k, v, s0)]
    o, f = RT.chunk_retention(*leaves[:3], lg, leaves[3], need_state=True)
    (o.sum() + f.square().sum()).backward()
    assert rel(o, o_ref) < TOL and rel(f, f_ref) < TOL
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), leaves, ref_leaves):
        assert rel(a.grad, b.grad) < TOL, name


def test_recurrent_step_updates_state_in_place():
    B, H, K, V = 2, 3, 32, 48
    lg = head_log_decays(H)
    q, k, v, s0 = inputs(B, 5, H, K, V, seed=5)
    o_ref, s_ref = recurrent_retention(q, k, v, lg, s0)
    state = s0.float().to(DEV)
    ptr = state.data_ptr()
    outs = [RT.recurrent_step(q[:, t].float().to(DEV), k[:, t].float().to(DEV), v[:, t].float().to(DEV), lg, state)
            for t in range(5)]
    assert state.data_ptr() == ptr
    assert rel(torch.stack(outs, 1), o_ref) < TOL and rel(state, s_ref) < TOL


def test_recurrent_mode_matches_torch_and_keeps_the_passed_state():
    B, T, H, K, V = 2, 6, 2, 16, 32
    lg = head_log_decays(H)
    q, k, v, s0 = inputs(B, T, H, K, V, seed=6)
    state = s0.float().to(DEV)
    before = state.clone()
    o, f = RT.retention(*(x.float().to(DEV) for x in (q, k, v)), lg, "recurrent", state, need_state=True)
    o_ref, f_ref = recurrent_retention(q, k, v, lg, s0)
    assert rel(o, o_ref) < TOL and rel(f, f_ref) < TOL
    assert torch.equal(state, before)
    o2, f2 = RT.retention(*(x.float().to(DEV) for x in (q, k, v)), lg, "recurrent", None, need_state=False)
    assert f2 is None and rel(o2, recurrent_retention(q, k, v, lg)[0]) < TOL


def test_engine_decodes_the_same_with_the_triton_step():
    """The inference engine's in-place step through our decoding kernel (the retnet::retention_recurrent_step
    op) gives the torch model's greedy tokens, for a ragged batch."""
    from retnet_train.inference import Generator
    from retnet_train.model import build_model

    outs = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        with torch.device(DEV):
            model = build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256, kernels=kernels)
        assert model.kernels == kernels
        gen = Generator(model.eval(), max_batch=2, max_len=64, cuda_graphs=False)
        outs[kernels] = gen.generate([[1, 2, 3, 4, 5], [7, 8]], max_new_tokens=8)
    assert outs["triton"] == outs["torch"]


def test_documents_run_as_variable_length_sequences_in_the_kernels():
    """With doc_starts and kernels=triton, training's chunkwise forward and backward go through the
    variable-length kernels (cu_seqlens) and give the torch model's logits and gradients."""
    from retnet_train.model import build_model

    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4), device="cpu").to(DEV)
    starts = torch.zeros(2, 40, dtype=torch.bool, device=DEV)
    starts[0, [0, 17, 29]] = True
    starts[1, [5]] = True
    got = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        with torch.device(DEV):
            model = build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256, kernels=kernels)
        logits = model(ids, mode="chunkwise", doc_starts=starts)
        logits.float().square().mean().backward()
        got[kernels] = (logits.detach(), model.layers[0].retention.q_proj.weight.grad)
    assert rel(got["triton"][0], got["torch"][0]) < 1e-4
    assert rel(got["triton"][1], got["torch"][1]) < 1e-4


def test_documents_with_incoming_and_final_states_in_the_kernels():
    """Documents through the variable-length kernels with a state coming in (context parallelism
    hands one to each slice) and going out: the incoming state reaches each row's first document
    only (not a row whose token 0 starts one), the final state is each row's last document's;
    forward and the gradients of q, k, v and the incoming state equal the torch chunkwise form."""
    from retnet_train.model.retention import retention

    B, T, H, K, V = 2, 40, 2, 16, 16
    q, k, v, s0 = inputs(B, T, H, K, V, seed=5)
    lg = head_log_decays(H)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [11, 30]] = True  # row 0 continues the incoming document up to token 11
    starts[1, [0, 23]] = True  # row 1 starts a new document at once: the incoming state is unused
    got = {}
    for kernels in ("torch", "triton"):
        leaves = [x.detach().float().to(DEV).requires_grad_() for x in (q, k, v, s0)]
        o, final = retention(*leaves[:3], lg, "chunkwise", leaves[3], True, 16, kernels,
                             doc_starts=starts.to(DEV))
        (o.square().sum() + final.square().sum()).backward()
        got[kernels] = [o, final] + [x.grad for x in leaves]
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0"], got["triton"], got["torch"]):
        assert rel(a, b) < TOL, name
    assert got["torch"][-1][1].abs().max() == 0  # row 1's incoming state reaches nothing


def test_bad_arguments_are_named():
    lg = head_log_decays(2)
    q = torch.zeros(1, 8, 2, 16, device=DEV)
    v = torch.zeros(1, 8, 2, 32, device=DEV)
    with pytest.raises(ValueError, match="log_gamma"):
        RT.chunk_retention(q, q, v, head_log_decays(3))
    with pytest.raises(ValueError, match=r"state must be \[1, 2, 16, 32\]"):
        RT.chunk_retention(q, q, v, lg, torch.zeros(1, 2, 32, 16, device=DEV))
    with pytest.raises(ValueError, match="float64"):
        RT.chunk_retention(q.double(), q.double(), v.double(), lg)
    with pytest.raises(ValueError, match="B = 1, got 2"):
        RT.chunk_retention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), lg,
                           cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="chunk size 24"):
        RT.chunk_retention(q, q, v, lg, chunk_size=24)
    with pytest.raises(ValueError, match="segment_chunks 3 must be a power of two"):
        Tuning(segment_chunks=3)
    with pytest.raises(ValueError, match="mode 'parallel'"):
        RT.retention(q, q, v, lg, "parallel")
    assert RT.usable(q) and not RT.usable(q.double())


def test_aot_compiles_every_kernel_for_sm90_and_gfx90a():
    # the compilers run on CPU; this is the slow test of the file (see the timing it prints)
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "retnet_train.model.kernels.aot", "sm_90", "gfx90a"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:], out.stderr[-3000:], f"aot took {time.time() - start:.0f} s")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok ")]
    compiled = {(line.split()[1], line.split()[2]) for line in lines}  # (target, kernel)
    # every @triton.jit function of the kernels package, so a new kernel cannot miss the AOT list
    kernels_dir = ROOT / "retnet_train" / "model" / "kernels"
    ours = set()
    for path in kernels_dir.glob("*.py"):
        if "@triton.jit" in path.read_text():
            module = importlib.import_module(f"retnet_train.model.kernels.{path.stem}")
            # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1: both are KernelInterfaces;
            # device functions that only kernels call (_segment_range) are private by name
            ours |= {name for name, obj in vars(module).items() if isinstance(obj, triton.runtime.jit.KernelInterface)
                     and getattr(obj, "fn", None) is not None and obj.fn.__module__ == module.__name__
                     and not name.startswith("_")}
    assert {"segment_states_kernel", "norm_gate_backward_kernel"} <= ours
    missing = {(t, k) for t in ("sm_90", "gfx90a") for k in ours} - compiled
    assert not missing, f"kernels the AOT list does not compile: {sorted(missing)}"


# ---- GPU, real head shapes -----------------------------------------------------------------------

def _gpu_inputs(B, T, H, K, V, n_states):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, K, device="cuda", generator=g).bfloat16()
    k = (torch.randn(B, T, H, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    v = torch.randn(B, T, H, V, device="cuda", generator=g).bfloat16()
    s0 = torch.randn(n_states, H, K, V, device="cuda", generator=g) * 0.1
    return q, k, v, s0


def _errors(q, k, v, s0, lg, cu_seqlens=None):
    """Relative L2 errors (o, state, dq, dk, dv, dstate): our bf16 kernels vs the torch form in fp32."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w_f = torch.randn(s0.shape, device="cuda", generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o, f = RT.chunk_retention(*leaves[:3], lg, leaves[3], True, cu_seqlens)
    w_o = torch.randn(o.shape, device="cuda", generator=g)
    ((o.float() * w_o).sum() + (f * w_f).sum()).backward()
    ref = [x.detach().float().requires_grad_() for x in (q, k, v, s0)]
    if cu_seqlens is None:
        o_r, f_r = chunkwise_retention(*ref[:3], lg, ref[3], need_state=True, chunk_size=64)
    else:  # each sequence alone
        cuts = cu_seqlens.tolist()
        pieces = [chunkwise_retention(*(x[:, a:b] for x in ref[:3]), lg, ref[3][n:n + 1], need_state=True)
                  for n, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        o_r, f_r = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 0)
    ((o_r * w_o).sum() + (f_r * w_f).sum()).backward()
    return [rel(o, o_r), rel(f, f_r)] + [rel(a.grad, b.grad) for a, b in zip(leaves, ref)]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [2048, 8192])
def test_gpu_real_shapes_bf16(T):
    lg = head_log_decays(16, head_start=8, head_count=8)  # a tensor-parallel shard's heads
    errs = _errors(*_gpu_inputs(2 if T == 2048 else 1, T, 8, 256, 512, 2 if T == 2048 else 1), lg)
    print(f"T={T} relative L2 errors (o, state, dq, dk, dv, dstate): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-2


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    cu = torch.tensor([0, 1000, 1064, 3000, 4096], dtype=torch.int32, device="cuda")
    lg = head_log_decays(8)
    errs = _errors(*_gpu_inputs(1, 4096, 8, 128, 256, 4), lg, cu)
    print("varlen relative L2 errors (o, state, dq, dk, dv, dstate): " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-2


def _keep_both_launches() -> dict:
    """The launches of one keep-both forward + backward at issue 10's shape (8 x 2048, 8 heads, d_k
    256, d_v 512), on meta tensors, by role (bench/retention_launches.py names them)."""
    from bench.retention_launches import recorded_launches
    from retnet_train.model.kernels import retention_launch as L

    tuning = L.with_tuning(RT.keep_tuning("both"), 64)
    return dict(recorded_launches(8, 2048, tuning, torch.device("meta")))

def test_aot_specialises_ints_as_the_jit_does():
    # a row stride of 256 is marked divisible by 16 and a stride of 1 becomes a constant, as the JIT
    # does at a launch: without them the AOT compile differs from what runs (unpipelined loads, less
    # shared memory reported)
    from retnet_train.model.kernels import aot

    launches = _keep_both_launches()
    for role, transposed in (("forward outputs", False), ("backward dq", True)):
        _, _, sig, constexprs, aligned, _, _ = aot.spec(launches[role])
        names = [name for name, _ in sig]
        constexprs = dict(constexprs)
        assert constexprs.get("STATE_SX" if transposed else "STATE_SZ") == 1, role
        assert names.index("S") in aligned and names.index("STATE_SZ" if transposed else "STATE_SX") in aligned
        assert dict(sig)["S"] == "i32"


_PIPELINE_REPORT = """
import json, torch
from bench.retention_launches import recorded_launches
from retnet_train.model.kernels import aot, retention_launch as L
from retnet_train.model.kernels.retention_triton import keep_tuning
report = {}
for role, launch in recorded_launches(8, 2048, L.with_tuning(keep_tuning("both"), 64), torch.device("meta")):
    ttgir = aot.compile_spec(aot.spec(launch), "sm_90").asm["ttgir"]
    plain = [line.strip()[:100] for line in ttgir.splitlines() if " tt.load " in line and "tensor<" in line]
    report[role] = {"plain": plain, "async": ttgir.count("async_copy_global_to_local")}
print(json.dumps(report))
"""


def test_every_tile_load_of_the_retention_kernels_is_pipelined_on_sm90():
    # compiled for sm_90 on this CPU as the JIT would (aot.spec), in a process of its own (this one
    # may run the interpreter): every tensor load in the kernels' loops is an async copy. dk and dv
    # read their scores transposed, which loaded element by element outside the pipeline until the
    # tile was loaded as stored and transposed in the dot
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PIPELINE_REPORT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert set(report) == {"forward scores", "forward walk", "forward outputs", "backward reverse walk",
                           "backward gradient scores", "backward dq", "backward dk", "backward dv"}
    for role, got in report.items():
        assert got["plain"] == [] and got["async"] >= 4, (role, got)
