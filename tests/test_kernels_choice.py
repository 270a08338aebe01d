"""model.kernels: resolved once at build, stored on the model, shown by the summary, obeyed by the
retention dispatch; impossible choices fail at build naming the key; torch.compile trains alike."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from retnet_train.model import ModelConfigError, build_model
from retnet_train.model import kernels as K
from retnet_train.model.retention import chunkwise_retention

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, chunk_size=8)


@pytest.fixture(autouse=True)
def fresh_import_cache():
    K._import_error.cache_clear()
    yield
    K._import_error.cache_clear()


def test_torch_and_auto_on_cpu():
    assert build_model("retnet_tiny", kernels="torch", **TINY).kernels == "torch"
    assert build_model("retnet_tiny", **TINY).kernels == "torch"  # auto: the torch forms on CPU
    assert build_model("transformer_tiny", vocab_size=97, d_model=32, n_layers=1, n_heads=2).kernels == "torch"


def test_fla_on_cpu_is_a_build_error():
    with pytest.raises(ModelConfigError, match=r"model.kernels='fla': fla needs CUDA"):
        build_model("retnet_tiny", kernels="fla", **TINY)


def test_unknown_choice_names_the_key():
    with pytest.raises(ModelConfigError, match=r"model.kernels='cuda' is not one of \['auto', 'torch', 'fla', 'triton'\]"):
        build_model("retnet_tiny", kernels="cuda", **TINY)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ModelConfigError, match=r"model.kernels='triton': triton kernels need a GPU"):
        build_model("retnet_tiny", kernels="triton", **TINY)


def test_triton_without_its_module_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "retnet_train.model.kernels.retention_triton", None)  # import fails
    with pytest.raises(ModelConfigError, match=r"model.kernels='triton': our Triton retention kernels are not importable"):
        build_model("retnet_tiny", kernels="triton", **TINY)


_INTERPRETED_MODEL = """
import torch
from retnet_train.model import build_model
torch.manual_seed(0)
kw = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=2, chunk_size=8)
model = build_model("retnet_tiny", kernels="triton", **kw)
ref = build_model("retnet_tiny", kernels="torch", **kw)
ref.load_state_dict(model.state_dict())
ids = torch.randint(0, 97, (1, 70))
out = model(ids, mode="chunkwise")
out.sum().backward()
err = ((out - ref(ids, mode="parallel")).abs().max() / out.abs().max()).item()
print(model.kernels, err)
assert model.kernels == "triton" and err < 1e-5, err
# model.retention_keep=both: the forward's states and scores reach the backward, same gradients
kept = build_model("retnet_tiny", kernels="triton", retention_keep="both", **kw)
kept.load_state_dict(model.state_dict())
kept(ids, mode="chunkwise").sum().backward()
for (name, a), b in zip(model.named_parameters(), kept.parameters()):
    assert torch.equal(a.grad, b.grad), name
# the head norm + output projection recompute the gated output in backward (norm_gate.py): the
# gradients of keeping it instead
import retnet_train.model.retnet as R
calls = []
R.gated_norm_projection = lambda *a, f=R.gated_norm_projection: calls.append(1) or f(*a)
model.zero_grad()
model(ids, mode="chunkwise").sum().backward()
assert len(calls) == 1, calls  # one layer
R.MultiScaleRetention._projects_with_recompute = lambda self, o, ctx: False
keeping = build_model("retnet_tiny", kernels="triton", **kw)
keeping.load_state_dict(model.state_dict())
keeping(ids, mode="chunkwise").sum().backward()
assert len(calls) == 1
for (name, a), b in zip(model.named_parameters(), keeping.parameters()):
    assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7), name
"""


def test_triton_choice_trains_under_the_interpreter():
    """kernels=triton on CPU with TRITON_INTERPRET=1 set before triton loads (a fresh process): our
    retention and norm-gate kernels run, forward and backward, and agree with the torch forms."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_MODEL], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("triton ")


def test_dispatch_follows_the_resolved_choice(monkeypatch):
    """With kernels=triton (a stand-in module, interpreter on), chunkwise and recurrent calls go to it;
    the parallel form stays in torch; a kernels=torch model never calls it."""
    calls, keeps = [], []

    def fake_retention(q, k, v, log_gamma, mode, state=None, need_state=False, cu_seqlens=None, keep="none"):
        calls.append(mode)
        keeps.append(keep)
        return chunkwise_retention(q, k, v, log_gamma, state, need_state, chunk_size=8)

    fake = types.ModuleType("retention_triton")
    fake.retention, fake.usable = fake_retention, lambda x: x.dtype != torch.float64
    monkeypatch.setitem(sys.modules, "retnet_train.model.kernels.retention_triton", fake)
    monkeypatch.setattr(K, "retention_triton", fake, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    # a GELU gate keeps the fused head-norm kernel (its own tests) out of this one
    model = build_model("retnet_tiny", kernels="triton", gate_activation="gelu", **TINY)
    assert model.kernels == "triton"
    ids = torch.randint(0, 97, (2, 20))
    chunk = model(ids, mode="chunkwise")
    assert calls == ["chunkwise"] * 2  # one call per layer
    par = model(ids, mode="parallel")
    assert calls == ["chunkwise"] * 2
    torch.testing.assert_close(chunk, par, rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    plain = build_model("retnet_tiny", kernels="torch", gate_activation="gelu", **TINY)
    plain(ids, mode="chunkwise")
    assert calls == ["chunkwise"] * 2
    # model.retention_keep reaches the kernels' call
    assert keeps == ["none"] * 2
    build_model("retnet_tiny", kernels="triton", gate_activation="gelu", retention_keep="both", **TINY)(ids, mode="chunkwise")
    assert keeps == ["none"] * 2 + ["both"] * 2


@pytest.mark.parametrize("hip, usable, want", [
    (None, {"fla", "triton"}, "triton"),  # NVIDIA: ours first (AUTO_ORDER_CUDA, bench/RESULTS.md)
    (None, {"fla"}, "fla"),
    (None, {"triton"}, "triton"),
    (None, set(), "torch"),
    ("6.2", {"fla", "triton"}, "triton"),  # ROCm: never fla
    ("6.2", {"fla"}, "torch"),
])
def test_auto_order_on_a_gpu(monkeypatch, hip, usable, want):
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(K, "available", lambda c, d: None if c == "torch" or c in usable else "no")
    assert K.resolve_kernels("auto", torch.device("cuda")) == want


def test_summary_shows_the_choice():
    from retnet_train.model.summary import summarise

    text = summarise("retnet_tiny", kernels="torch")
    assert "kernels           torch (model.kernels=torch" in text
    assert "kernels           torch (model.kernels=auto" in summarise("retnet_tiny")


# ---- torch.compile ---------------------------------------------------------------------------------


def _train(model, steps: int) -> list[float]:
    from retnet_train.train.evaluate import lm_loss_from_hidden

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    out = []
    for _ in range(steps):  # the same batch: the loss must fall
        hidden = model(ids, mode="chunkwise", chunk_size=8, return_hidden=True)
        loss = lm_loss_from_hidden(hidden, model.lm_head, labels, kernels=model.kernels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("checkpointing, layers", [("selective", None), ("full", 1)])  # "none": the second block of (full, 1)
def test_compiled_blocks_train_like_eager_with_one_graph_for_all_layers(checkpointing, layers):
    """trainer.compile's regional compilation (kernels=torch, the one choice a CPU can compile):
    3 AdamW steps equal eager's, and the 2 blocks share one compiled graph per checkpointing mode
    (full checkpointing of the first block only: one graph for it, one for the other)."""
    from torch._dynamo.utils import counters

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("retnet_tiny", kernels="torch", ffn_type="glu", **{**TINY, "n_layers": 2})
        m.set_activation_checkpointing(checkpointing, layers)
        models.append(m)
    eager, compiled = models
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_blocks()
    want, got = _train(eager, 3), _train(compiled, 3)
    assert want[-1] < want[0]
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-5, (got, want)
    assert counters["stats"]["unique_graphs"] == (1 if layers is None else 2), dict(counters["stats"])


def _saved_bytes_of_forward(model, ids) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model(ids, mode="chunkwise", chunk_size=8, return_hidden=True)
    return sum(saved)


def test_compiled_blocks_under_a_memory_budget_keep_less_and_train_like_eager():
    """trainer.activation_memory_budget: the compiled blocks keep less for backward at a budget of 0
    than at the compiler's default, and 3 AdamW steps still equal eager's; a budget outside [0, 1] is
    refused by name."""
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(build_model("retnet_tiny", kernels="torch", **{**TINY, "n_layers": 2}))
    eager, default, lean = models
    half = build_model("retnet_tiny", kernels="torch", **{**TINY, "n_layers": 2})
    torch._dynamo.reset()
    default.compile_blocks()
    lean.compile_blocks(memory_budget=0.0)
    half.compile_blocks(memory_budget=0.5)  # 0 is a shortcut of the partitioner; a share takes its search
    assert lean.memory_budget == 0.0 and default.memory_budget is None
    assert lean.compile_summary() == ", compiled with activation memory budget 0"
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    kept = [_saved_bytes_of_forward(m, ids) for m in (default, half, lean)]
    assert kept[2] < kept[1] < 0.8 * kept[0], kept
    want, got = _train(eager, 3), _train(lean, 3)
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-5, (got, want)
    with pytest.raises(ValueError, match="memory_budget=1.5"):
        eager.compile_blocks(memory_budget=1.5)


def test_compile_tuning_reaches_the_forward_and_the_backward_graphs(monkeypatch):
    """compile_blocks(tuning="coordinate_descent", pdl=True) sets inductor's coordinate_descent_tuning
    and triton.enable_pdl while it generates code for the block's forward graph and for its backward
    graph (compiled later, at the first backward, outside compile_blocks' call), trains like eager,
    and leaves a block compiled by default with neither; an unknown tuning is refused by name. The
    trainer's key and the model's tunings name the same choices."""
    from retnet_train.config import CompileTuning
    from retnet_train.model.lm import COMPILE_TUNINGS
    from torch._inductor.graph import GraphLowering

    assert sorted(CompileTuning.values()) == sorted(COMPILE_TUNINGS)
    # a cached graph skips code generation, where the spy looks
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    seen = []
    codegen = GraphLowering.codegen

    def spy(self, *args, **kwargs):
        config = torch._inductor.config
        seen.append((bool(self.is_backward), bool(config.coordinate_descent_tuning), bool(config.triton.enable_pdl)))
        return codegen(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", spy)
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(build_model("retnet_tiny", kernels="torch", **{**TINY, "n_layers": 2}))
    eager, default, tuned = models
    torch._dynamo.reset()
    tuned.compile_blocks(tuning="coordinate_descent", pdl=True)
    assert tuned.compile_tuning == "coordinate_descent" and tuned.compile_pdl
    # the start-up log's words
    assert tuned.compile_summary() == ", kernel tiles tuned by coordinate_descent, dependent launches"
    want, got = _train(eager, 2), _train(tuned, 2)
    for a, b in zip(got, want):
        assert abs(a - b) < 1e-5, (got, want)
    assert sorted(set(seen)) == [(False, True, True), (True, True, True)], seen
    seen.clear()
    default.compile_blocks()
    _train(default, 1)
    assert sorted(set(seen)) == [(False, False, False), (True, False, False)], seen
    assert default.compile_summary() == ""
    with pytest.raises(ValueError, match="tuning='fastest'"):
        eager.compile_blocks(tuning="fastest")


def test_compile_pdl_warns_where_it_changes_nothing(monkeypatch):
    """trainer.compile_pdl acts on NVIDIA compute capability 9.0+ only (inductor skips it elsewhere):
    the build warns, naming the device, everywhere else and is silent there."""
    from retnet_train.train.build import dependent_launch_warning

    assert "trainer.compile_pdl on cpu: dependent launches need an NVIDIA GPU" in dependent_launch_warning(
        torch.device("cpu"))
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 8.0: dependent launches need 9.0+" in dependent_launch_warning(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dependent_launch_warning(cuda) is None
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "trainer.compile_pdl on ROCm" in dependent_launch_warning(cuda)


def test_blocks_learn_whether_their_projection_region_keeps_its_output():
    """The compiled gated-norm projection keeps its output only in blocks that are not fully
    checkpointed and compiled without a memory budget (RetNetBlock.plan_recompute)."""
    m = build_model("retnet_tiny", kernels="torch", **{**TINY, "n_layers": 2})

    def keeps():
        return [block.retention.projection_keeps_output for block in m.layers]

    assert keeps() == [True, True]
    m.set_activation_checkpointing("full")
    assert keeps() == [False, False]
    m.set_activation_checkpointing("full", layers=1)  # the second block keeps everything
    assert keeps() == [False, True]
    m.set_activation_checkpointing("selective")
    assert keeps() == [True, True]
    m.compile_blocks(memory_budget=0.5)
    assert keeps() == [False, False]


def test_no_graph_break_in_the_model_forward():
    """Dynamo traces the whole forward in one graph (the GPU test checks the same with fla)."""
    model = build_model("retnet_tiny", kernels="torch", **TINY)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randint(0, 97, (2, 16)), mode="chunkwise", return_hidden=True)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("keep", ["none", "both"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_gpu_compiled_triton_blocks_have_no_graph_break(checkpointing, keep, monkeypatch):
    """Our Triton kernels' compiled blocks trace as one graph in every checkpointing mode. A graph
    break inside a checkpointed block makes dynamo run the whole block eagerly: iterating the
    RetentionKeep enum in keep_tuning did that under torch 2.11 (a fully checkpointed step took 1.7x
    an uncheckpointed one on an H100), and torch 2.13 on CPU does not break there."""
    from torch._dynamo.utils import counters

    from retnet_train.model.kernels import retention_launch as L

    runs = []
    monkeypatch.setattr(L, "forward", lambda *a, f=L.forward, **kw: runs.append(1) or f(*a, **kw))
    torch._dynamo.reset()
    counters.clear()
    with torch.device("cuda"):
        model = build_model("retnet_tiny", kernels="triton", retention_keep=keep).train()
    model.set_activation_checkpointing(checkpointing)
    model.compile_blocks()
    ids = torch.randint(0, 100, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids, mode="chunkwise").float().logsumexp(-1).mean().backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the retention op runs again in backward only where the block is fully checkpointed: on the
    # GPU's torch, where the partitioner kept what an autograd.Function's Triton launches touched
    assert len(runs) == len(model.layers) * (2 if checkpointing == "full" else 1), (checkpointing, len(runs))


_COMPILED_NORM_GATE = """
import sys, types, torch
from retnet_train.model import build_model
from retnet_train.model import kernels as K
from retnet_train.model.retention import chunkwise_retention
# retention in torch (Triton's interpreter cannot be traced by torch.compile); the head norm + gate
# and the output projection after it are ours: a custom op inside an autograd.Function
fake = types.ModuleType("retention_triton")
fake.retention = lambda q, k, v, lg, mode, state=None, need_state=False, cu_seqlens=None, keep="none": (
    chunkwise_retention(q, k, v, lg, state, need_state, chunk_size=8))
fake.usable = lambda x: x.dtype != torch.float64
sys.modules["retnet_train.model.kernels.retention_triton"] = fake
K.retention_triton = fake
import retnet_train.model.retnet as R
calls = []
R.gated_norm_projection = lambda *a, f=R.gated_norm_projection: calls.append(1) or f(*a)
grads = {}
for compiled in (False, True):
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        m = build_model("retnet_tiny", kernels="triton", vocab_size=97, d_model=32, n_layers=2, n_heads=2).train()
        m.set_activation_checkpointing(mode)
        if compiled:
            m.compile_blocks()
        ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
        m(ids, mode="chunkwise", chunk_size=8).float().pow(2).mean().backward()
        grads[compiled, mode] = {n: p.grad for n, p in m.named_parameters()}
assert calls, "the fused projection did not run"
base = grads[False, "none"]
for key, g in grads.items():
    err = max(((g[n] - b).abs().max() / b.abs().max()).item() for n, b in base.items())
    assert err < 1e-5, (key, err)
print("ok")
"""


_COMPILED_RETENTION_OP = """
import torch
from torch._dynamo.utils import counters
from retnet_train.model import build_model
from retnet_train.model.kernels import retention_launch as L
runs = []
L.forward = lambda *a, f=L.forward, **kw: runs.append(1) or f(*a, **kw)
grads, counts = {}, {}
for compiled in (False, True):
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        m = build_model("retnet_tiny", kernels="triton", vocab_size=97, d_model=32, n_layers=2, n_heads=2,
                        chunk_size=16).train()
        m.set_activation_checkpointing(mode)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            m.compile_blocks()
        ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
        runs.clear()
        m(ids, mode="chunkwise").float().pow(2).mean().backward()
        counts[compiled, mode] = len(runs)
        grads[compiled, mode] = {n: p.grad for n, p in m.named_parameters()}
        if compiled:
            assert not counters["graph_break"], (mode, dict(counters["graph_break"]))
base = grads[False, "none"]
for key, g in grads.items():
    err = max(((g[n] - b).abs().max() / b.abs().max()).item() for n, b in base.items())
    assert err < 1e-5, (key, err)
# the retention forward runs once per block, and again in backward where the block is fully
# checkpointed: compiled too (the partitioner recomputes the op instead of keeping q, k, v and o)
assert counts == {(c, m): 4 if m == "full" else 2 for c in (False, True) for m in ("none", "selective", "full")}, counts
print("ok")
"""


def test_compiled_blocks_with_the_triton_retention_op_recompute_it_where_checkpointed():
    """Our Triton retention is a torch.library op (retnet::retention_chunk): compiled blocks trace it
    without a graph break in every checkpointing mode, train like eager, and a fully checkpointed
    compiled block runs it again in backward, as eager does, instead of keeping its inputs and output
    (an autograd.Function's Triton launches were kept: 128k tokens ran out of 80 GB compiled). Triton's
    interpreter, in a fresh process."""
    _run_interpreted(_COMPILED_RETENTION_OP)


def _run_interpreted(script: str) -> None:
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_compiled_blocks_with_the_norm_gate_kernel_train_like_eager():
    """The head norm + gate kernel and the output projection that recomputes its input in backward
    (kernels/norm_gate.py), in compiled blocks without, with selective and with full checkpointing
    (compiled, the projection is a checkpointed region of its own: nested in the block's): the
    gradients of eager (a fresh process with Triton's interpreter)."""
    _run_interpreted(_COMPILED_NORM_GATE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs CUDA compute capability 9.0+ (programmatic dependent launch)")
def test_gpu_dependent_launches_compute_what_plain_launches_compute(monkeypatch):
    """compile_blocks(pdl=True) (trainer.compile_pdl) puts the wait for the previous kernel into the
    compiled kernels (gdc_wait) instead of at their launch; they may then start while the one before
    them, ours, cuBLAS's or inductor's, still runs. What they compute must not change: three AdamW
    steps of our Triton-kernel blocks under bf16 autocast give bit-identical losses and gradients."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # codegen runs, so its code is seen
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    ids = torch.randint(0, 97, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for pdl in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build_model("retnet_tiny", kernels="triton", retention_keep="both",
                                **{**TINY, "d_model": 256, "n_heads": 2, "chunk_size": 64}).train()
        model.compile_blocks(pdl=pdl)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, mode="chunkwise").float().logsumexp(-1).mean()
            loss.backward()
            return loss

        losses, code = [], []
        for _ in range(3):
            loss, generated = run_and_get_code(step)
            code += generated
            losses.append(loss.item())
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            opt.zero_grad()
        results[pdl] = losses, grads, "gdc_wait" in "\n".join(code)
    assert results[True][2] and not results[False][2]  # the option reached the generated kernels
    assert results[True][0] == results[False][0]
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert torch.equal(a, b)
