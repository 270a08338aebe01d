"""trainer.float8: which linear layers compute in fp8, what stays as it was (the parameters, their
names, checkpoints), the loss it trains to (torchao's emulation on CPU: fp8 rounding, fp32
matmuls), and the errors for the setups and devices that cannot run it."""

from __future__ import annotations

import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retnet_train.config import ConfigError, load_config
from retnet_train.model import build_model
from retnet_train.train.evaluate import lm_loss
from retnet_train.train.float8 import convert_to_float8, float8_problem
from test_train_utils import losses, reference_losses, run_train

SYN = ["trainer.data_source=synthetic", "logging.wandb.mode=disabled"]


def _tiny():
    torch.manual_seed(0)
    return build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256, kernels="torch")


def test_the_blocks_linears_become_fp8_and_keep_their_parameters():
    model = _tiny()
    params = {name: p for name, p in model.named_parameters()}
    names = convert_to_float8(model, "tensorwise", torch.device("cpu"))
    linears = {n for n, m in _tiny().named_modules() if type(m) is nn.Linear and n.startswith("layers.")}
    assert set(names) == linears and len(names) == 2 * 7  # q, k, v, g, out; fc1, fc2 per block
    for name in names:
        assert type(model.get_submodule(name)).__name__ == "Float8Linear"
    assert type(model.lm_head) is nn.Linear  # the head is left in the precision's own matmul
    # the same Parameter objects under the same names: optimizer state and checkpoints carry over
    assert {n: p for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == list(_tiny().state_dict())


def test_fp8_loss_and_gradients_are_close_to_fp32_and_not_equal():
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    ref, fp8 = _tiny(), _tiny()
    convert_to_float8(fp8, "tensorwise", torch.device("cpu"))
    got = []
    for model in (ref, fp8):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        got.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l_ref, g_ref), (l_fp8, g_fp8) = got
    assert l_fp8 != l_ref  # the matmuls did run on fp8-rounded operands
    assert l_fp8 == pytest.approx(l_ref, rel=1e-2)
    assert F.cosine_similarity(g_ref, g_fp8, dim=0) > 0.95  # seen: 0.984 (e5m2 output gradients)


def test_rowwise_recipe_converts_and_an_unknown_recipe_is_named():
    model = _tiny()
    assert len(convert_to_float8(model, "rowwise", torch.device("cpu"))) == 14
    with pytest.raises(ValueError, match=re.escape("trainer.float8='fp8': one of none, tensorwise, rowwise")):
        convert_to_float8(_tiny(), "fp8", torch.device("cpu"))


@pytest.mark.parametrize("fast_accum, fast", [("output", (True, False, False)),
                                              ("output_grad_input", (True, True, False)),
                                              ("all", (True, True, True))])
def test_fast_accumulation_reaches_the_chosen_matmuls_of_every_layer(fast_accum, fast):
    model = _tiny()
    names = convert_to_float8(model, "tensorwise", torch.device("cpu"), fast_accum)
    for name in names:
        config = model.get_submodule(name).config
        got = tuple(getattr(config, f"gemm_config_{gemm}").use_fast_accum
                    for gemm in ("output", "grad_input", "grad_weight"))
        assert got == fast, name
    with pytest.raises(ValueError, match=re.escape("trainer.float8_fast_accum='grad_weight': one of output, "
                                                   "output_grad_input, all")):
        convert_to_float8(_tiny(), "tensorwise", torch.device("cpu"), "grad_weight")


def test_the_config_key_and_the_conversion_know_the_same_choices():
    from retnet_train.config import Float8FastAccum
    from retnet_train.train.float8 import FAST_ACCUM

    assert list(FAST_ACCUM) == list(Float8FastAccum.values())


def test_a_model_with_no_aligned_linear_is_refused():
    model = build_model("retnet_tiny", d_model=40, n_layers=1, n_heads=2, vocab_size=64, kernels="torch")
    with pytest.raises(ValueError, match="no linear layer of the blocks has sizes that are multiples of 16"):
        convert_to_float8(model, "tensorwise", torch.device("cpu"))


def _gpu(monkeypatch, name, major, minor, hip=None, arch=""):
    props = types.SimpleNamespace(name=name, major=major, minor=minor, gcnArchName=arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.version, "hip", hip)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("name, cc, hip, arch, problem", [
    ("NVIDIA H100 80GB HBM3", (9, 0), None, "", None),
    ("NVIDIA L40S", (8, 9), None, "", None),
    ("NVIDIA A100-SXM4-80GB", (8, 0), None, "", "NVIDIA A100-SXM4-80GB (compute capability 8.0) has no fp8 tensor "
                                                "cores (needs 8.9 or later: Ada, Hopper, Blackwell)"),
    ("AMD Instinct MI250X", (9, 0), "6.2", "gfx90a:sramecc+:xnack-",
     "AMD Instinct MI250X (gfx90a:sramecc+:xnack-) has no fp8 matrix cores (ROCm needs MI300, gfx94x, or later)"),
    ("AMD Instinct MI300X", (9, 4), "6.2", "gfx942:sramecc+:xnack-", None),
])
def test_which_gpus_run_fp8(monkeypatch, name, cc, hip, arch, problem):
    device = _gpu(monkeypatch, name, *cc, hip=hip, arch=arch)
    assert float8_problem(device) == problem
    if problem:
        with pytest.raises(RuntimeError, match=f"^{re.escape(f'trainer.float8=tensorwise: {problem}')}"):
            convert_to_float8(_tiny(), "tensorwise", device)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=2"], "trainer.float8='tensorwise': needs parallel.tp=1 (is 2): the tensor-parallel linear "
                        "layers have no fp8 path"),
    (["deepspeed=zero3"], "trainer.float8='tensorwise': needs deepspeed.stage 0-2 (is 3)"),
])
def test_setups_without_an_fp8_path_are_refused_by_key(monkeypatch, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config([*SYN, "trainer.float8=tensorwise", *overrides])


def test_a_zero_stage_set_through_deepspeed_extra_is_refused():
    """The trainer plans ZeRO from deepspeed.stage; another stage in the raw JSON would run ZeRO-3
    past the float8 check while logs and checkpoints said ZeRO-2."""
    message = ("deepspeed.extra.zero_optimization.stage=3: differs from deepspeed.stage=2; set the stage with "
               "deepspeed.stage (or deepspeed=zero<N>), which the trainer plans by")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config([*SYN, "trainer.float8=tensorwise", "+deepspeed.extra={zero_optimization:{stage:3}}"])
    cfg = load_config([*SYN, "+deepspeed.extra={zero_optimization:{stage:2}}"])  # the same stage is fine
    assert cfg.deepspeed.stage == 2


def test_selective_checkpointing_keeps_fp8_matmul_outputs():
    """aten._scaled_mm (a fp8 projection on the GPU; CPU emulation runs mm instead) is among the ops
    whose outputs selective checkpointing keeps."""
    from retnet_train.model.checkpointing import _saved_ops

    assert torch.ops.aten._scaled_mm.default in _saved_ops() and torch.ops.aten.mm.default in _saved_ops()


def test_an_unknown_float8_word_is_named():
    with pytest.raises(ConfigError, match=re.escape("trainer.float8='fp8': must be one of ['none', 'tensorwise', "
                                                    "'rowwise']")):
        load_config([*SYN, "trainer.float8=fp8"])


def test_a_float8_run_trains_near_the_reference_and_resumes_without_it(tmp_path):
    """Three emulated fp8 steps stay within fp8 rounding of the fp32 reference and learn; the
    checkpoint they leave resumes in a run without float8 (same parameter names)."""
    reference = reference_losses(4)
    common = ["deepspeed=zero0", "trainer.eval_at_end=false", "optim.decay_steps=4"]
    run_train(tmp_path, "trainer.max_steps=3", "trainer.float8=tensorwise", *common)
    log = (tmp_path / "logs" / "rank00000.log").read_text()
    assert "trainer.float8=tensorwise: 14 linear layers compute in fp8 (emulated on CPU)" in log
    assert "float8 tensorwise" in log
    assert "without trainer.compile" in log  # the warning: eager casts cost more than fp8 saves
    got = losses(tmp_path)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(reference[step], abs=0.05), (step, got[step], reference[step])
        assert got[step] != reference[step]
    assert got[3] < got[1] - 0.3  # it learns
    run_train(tmp_path, "trainer.max_steps=4", *common)
    log = (tmp_path / "logs" / "rank00000.log").read_text()
    assert "resumed from" in log
    assert "trainer.float8=none from here on; the checkpoint's steps ran with trainer.float8=tensorwise" in log
    after = losses(tmp_path)
    assert after[4] == pytest.approx(reference[4], abs=0.05)


def test_a_bf16_zero1_float8_run_resumes_exactly(tmp_path):
    """DeepSpeed's bf16 optimizer (ZeRO-1, bf16 weights, fp32 masters) under fp8 linear layers:
    two steps, a resume, a third, give the uninterrupted run's losses exactly."""
    common = ["deepspeed=zero1", "trainer.precision=bf16", "trainer.float8=tensorwise", "trainer.eval_at_end=false",
              "optim.decay_steps=3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_train(whole, "trainer.max_steps=3", *common, "checkpoint.save_at_end=false")
    run_train(split, "trainer.max_steps=2", *common)
    run_train(split, "trainer.max_steps=3", *common)
    assert "resumed from" in (split / "logs" / "rank00000.log").read_text()
    assert losses(split) == losses(whole) and len(losses(whole)) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or float8_problem(torch.device("cuda")) is not None,
                    reason="needs a GPU with fp8 tensor cores")
@pytest.mark.parametrize("recipe, fast_accum", [("tensorwise", "output"), ("rowwise", "output"),
                                                ("tensorwise", "output_grad_input"), ("tensorwise", "all")])
def test_gpu_compiled_fp8_blocks_match_bf16(recipe, fast_accum):
    """On fp8 tensor cores (torch._scaled_mm), compiled blocks: a small RetNet's loss and gradients
    under bf16 autocast with and without float8 agree to fp8 rounding, with fast accumulation in
    the forward only (torchao's default) or in the backward's matmuls too."""
    ids = torch.randint(0, 1024, (4, 257), generator=torch.Generator().manual_seed(1)).cuda()
    got = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = build_model("retnet_tiny", d_model=256, n_layers=2, n_heads=2, vocab_size=1024).cuda()
        if fp8:
            assert len(convert_to_float8(model, recipe, ids.device, fast_accum)) == 14
        model.compile_blocks()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(ids[:, :-1], mode="chunkwise"), ids[:, 1:])
        loss.backward()
        got.append((loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
    (l_ref, g_ref), (l_fp8, g_fp8) = got
    assert l_fp8 != l_ref and l_fp8 == pytest.approx(l_ref, rel=2e-2)
    assert F.cosine_similarity(g_ref, g_fp8, dim=0) > 0.95


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Matmuls as a dispatch mode sees them: torchao's linear calls aten.mm on its fp8 tensor
    subclass (which becomes _scaled_mm below the mode on a GPU, an emulated mm on CPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("mm", "addmm", "_scaled_mm")
        return func(*args, **(kwargs or {}))


def _backward_matmuls(device: torch.device) -> dict[str, int]:
    ids = torch.randint(0, 1024, (2, 129), generator=torch.Generator().manual_seed(1)).to(device)
    counts = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=1024,
                            kernels="torch" if device.type == "cpu" else "auto").to(device)
        convert_to_float8(model, "tensorwise", device)
        model.set_activation_checkpointing(mode)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = lm_loss(model(ids[:, :-1], mode="chunkwise"), ids[:, 1:])
        with _CountMatmuls() as ops:
            loss.backward()
        counts[mode] = ops.count
    return counts


def test_selective_checkpointing_recomputes_no_fp8_matmul():
    """Selective checkpointing keeps the fp8 projections' outputs as it keeps bf16 ones: its backward
    runs no more matmuls than an uncheckpointed one; full recomputes the 14 fp8 forward matmuls."""
    counts = _backward_matmuls(torch.device("cpu"))
    assert counts["selective"] == counts["none"] and counts["full"] == counts["none"] + 14


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or float8_problem(torch.device("cuda")) is not None,
                    reason="needs a GPU with fp8 tensor cores")
def test_gpu_selective_checkpointing_recomputes_no_fp8_matmul():
    counts = _backward_matmuls(torch.device("cuda"))
    assert counts["selective"] == counts["none"] and counts["full"] == counts["none"] + 14
