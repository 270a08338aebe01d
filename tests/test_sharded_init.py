"""Sharded initialisation (parallel/sharded_init.py): a rank builds only its shard, on the meta
device first, and each slice or ZeRO-3 partition it materialises holds exactly the unsharded build's
values; nothing it allocates on the way is as large as a full sharded parameter.

The two-process cases run inside test_tensor_parallel.py's pair of gloo processes (`sharded_cases`
below; a spawned process takes seconds to start) and are checked there."""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retnet_train.model import build_model, resolve_config
from retnet_train.model.init import (collect_rules, draw_, linear_default, normal, parameter_key, uniform,
                                     xavier_uniform)
from retnet_train.parallel.tensor_parallel import merge_state_dicts, split_dim

SEED = 7
WORLD = 2
CASES = {
    "retnet": dict(spec="retnet_tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_type="glu", bias=True),
    "retnet_tied": dict(spec="retnet_tiny", vocab_size=256, d_model=64, n_layers=1, n_heads=4, tie_embeddings=True),
    "transformer": dict(spec="transformer_tiny", vocab_size=256, d_model=64, n_layers=1, n_heads=4, bias=True),
}


def _config(case):
    kw = dict(CASES[case])
    return resolve_config(kw.pop("spec"), **kw)


def _unsharded(case):
    torch.manual_seed(SEED)  # the default seed of reset_parameters: torch.initial_seed()
    return build_model(_config(case))


class _Allocations(TorchDispatchMode):
    """The size in elements of the memory under every non-meta tensor an op returns (a view counts
    its storage: an expanded scalar is one element)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.numels.append(t.untyped_storage().nbytes() // t.element_size())
        return out


class _CheckedValues:
    """Values whose every fill may allocate nothing larger than the piece it fills."""

    def __init__(self, inner):
        self.inner, self.worst = inner, 0.0

    def plan(self, model):
        self.inner.plan(model)

    def fill(self, name, out, *args):
        with _Allocations() as seen:
            self.inner.fill(name, out, *args)
        self.worst = max(self.worst, max(seen.numels, default=0) / out.numel())


def _build(cfg, values, rank, tp, partition=None):
    from retnet_train.parallel.sharded_init import build_sharded_model

    checked = _CheckedValues(values)
    with _Allocations() as seen:
        model = build_sharded_model(cfg, checked, torch.device("cpu"), rank, tp, partition=partition)
    return model, checked.worst, max(seen.numels)


def sharded_cases(rank, out_dir):
    """In each of two gloo processes whose fairscale groups are tp=2 (test_tensor_parallel.py's):
    every case's tp=2 slices drawn from the seed, tp=2 slices read from an export, and (the fairscale
    groups destroyed) ZeRO-3 over both processes. Saves rank{rank}.pt in out_dir; the fairscale
    groups are gone afterwards."""
    from fairscale.nn.model_parallel.initialize import destroy_model_parallel
    from safetensors.torch import save_file

    from retnet_train.parallel.sharded_init import ExportValues, InitValues
    from retnet_train.parallel.zero3_init import Zero3Partitioner

    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    results = {}
    for case in CASES:  # tp=2: this rank's slices, drawn from the seed
        model, fill_worst, biggest = _build(_config(case), InitValues(SEED), rank, WORLD)
        results[case] = dict(shard=model.state_dict(), fill_worst=fill_worst, biggest=biggest,
                             sizes={n: p.numel() for n, p in model.named_parameters()},
                             flags={n: p.model_parallel for n, p in model.named_parameters()})
    # tp=2 from an export: each rank reads its slices of the file
    export = os.path.join(out_dir, f"export-rank{rank}.safetensors")
    save_file({k: v.contiguous() for k, v in _unsharded("retnet").state_dict().items()}, export)
    model, _, _ = _build(_config("retnet"), ExportValues(export), rank, WORLD)
    results["export"] = dict(shard=model.state_dict())
    destroy_model_parallel()

    import deepspeed

    from retnet_train.parallel.groups import _no_shared_memory_comm_build

    _no_shared_memory_comm_build()  # DeepSpeed would compile a C++ op for a minute or more
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group already there
    for case in ("retnet", "retnet_tied"):  # ZeRO-3 over both ranks (tp=1)
        partition = Zero3Partitioner({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
        model, fill_worst, biggest = _build(_config(case), InitValues(SEED), 0, 1, partition)
        kept = {n: p.ds_tensor.numel() for n, p in model.named_parameters()}
        empty = all(p.numel() == 0 for p in model.parameters())
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            gathered = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[f"zero3-{case}"] = dict(gathered=gathered, kept=kept, empty=empty, fill_worst=fill_worst,
                                        biggest=biggest)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _full(case):
    full = _unsharded(case).state_dict()
    if _config(case).tie_embeddings:
        full.pop("lm_head.weight")  # the embedding's tensor
    return full


def check_tp2_slices(ranks, case):
    full = _full(case)
    merged = merge_state_dicts([r[case]["shard"] for r in ranks])
    assert merged.keys() == full.keys()
    for name in full:
        assert torch.equal(merged[name], full[name]), name
    for r in ranks:
        # the fairscale layers of a meta model: flagged for the gradient norm like apply_tensor_parallel's
        assert r[case]["flags"] == {n: split_dim(n) is not None for n in r[case]["flags"]}
        # drawing a slice allocates at most the slice's size (the chunked int64/float64 temporaries)
        assert r[case]["fill_worst"] <= 1.0
        # nothing on the build path is as large as the biggest full parameter that is split
        assert r[case]["biggest"] <= max(r[case]["sizes"].values())
        assert r[case]["biggest"] < max(full[n].numel() for n in full if split_dim(n) is not None)


def check_tp2_export(ranks):
    """(safetensors maps the file and slices a view of it: the host pages of a slice are read.)"""
    full = _full("retnet")
    merged = merge_state_dicts([r["export"]["shard"] for r in ranks])
    assert all(torch.equal(merged[n], full[n]) for n in full)


def check_zero3(ranks, case):
    full = _full(case)
    for r in ranks:
        got = r[f"zero3-{case}"]
        assert got["gathered"].keys() == full.keys()
        for name in full:
            assert torch.equal(got["gathered"][name], full[name]), name
        assert got["empty"]  # the parameters' own storage holds nothing: the partitions hold the values
        for name, kept in got["kept"].items():
            assert kept == math.ceil(full[name].numel() / WORLD), name
        assert got["fill_worst"] <= 1.0
        assert got["biggest"] <= max(got["kept"].values())


def test_slices_and_flat_ranges_draw_the_values_of_the_whole():
    key = parameter_key(3, "layers.0.ffn.fc2.weight")
    for rule in (normal(0.02), uniform(0.1)):
        whole = draw_(torch.empty(10, 37), rule, key, (10, 37))
        cols = draw_(torch.empty(10, 12), rule, key, (10, 37), offsets=(0, 20), view_shape=(10, 12))
        assert torch.equal(cols, whole[:, 20:32])
        part = draw_(torch.empty(29), rule, key, (10, 37), offsets=(0, 20), view_shape=(10, 12), flat_start=50)
        assert torch.equal(part, whole[:, 20:32].reshape(-1)[50:79])
        assert torch.equal(draw_(torch.empty(10, 37, dtype=torch.bfloat16), rule, key, (10, 37)),
                           whole.to(torch.bfloat16))  # through float32, as a cast fp32 model rounds


def test_each_parameter_has_the_official_distribution():
    """The statistics of torch's initialisers the modules used before (xavier gains, N(0, d^-1/2),
    nn.Linear's default) on the full shapes, whatever tensor-parallel slice later draws them."""
    model = build_model("retnet_tiny", vocab_size=512, d_model=256, n_layers=1, n_heads=4, ffn_type="glu")
    rules = collect_rules(model)
    block = model.layers[0]
    d, hk, hv, f = 256, 256, block.retention.out_proj.in_features, block.ffn.fc2.in_features
    assert rules["embed.weight"] == normal(d ** -0.5)
    assert rules["layers.0.retention.q_proj.weight"] == xavier_uniform(hk, d, 2 ** -2.5)
    assert rules["layers.0.retention.out_proj.weight"] == xavier_uniform(d, hv)
    assert rules["layers.0.ffn.fc2.weight"] == linear_default(f)
    # the bounds written out, not through init.py's formulas: xavier gain * sqrt(6 / (fan_in + fan_out))
    # (q: gain 2^-2.5, 256 -> 256; out_proj: gain 1, 512 -> 256) and nn.Linear's 1 / sqrt(fan_in = 512)
    for name, bound in (("layers.0.retention.q_proj.weight", 0.0191366386155),
                        ("layers.0.retention.out_proj.weight", 0.0883883476483),
                        ("layers.0.ffn.fc2.weight", 0.0441941738242)):
        assert rules[name].scale == pytest.approx(bound, rel=1e-9), name
        p = model.get_parameter(name)  # 65k-131k draws of U(-b, b) come within 0.1% of b
        assert 0.999 * bound < p.abs().max().item() <= bound, (name, p.abs().max().item())
    for name, p in model.named_parameters():
        rule = rules[name]
        if rule.kind == "constant":
            assert torch.all(p == rule.scale), name
            continue
        want = rule.scale if rule.kind == "normal" else rule.scale / math.sqrt(3)
        if rule.kind == "uniform":
            assert p.abs().max() <= rule.scale
        assert abs(p.std().item() - want) <= 0.03 * want + 1e-12, (name, p.std().item(), want)
    # norms start as the identity (weights 1, biases 0); retention's projection biases are 0 (official)
    biased = build_model("retnet_tiny", vocab_size=256, d_model=64, n_layers=1, n_heads=2, bias=True)
    consts = {n: p for n, p in biased.named_parameters() if "norm" in n or "retention." in n and n.endswith(".bias")}
    assert {"layers.0.retention_norm.bias", "layers.0.retention.head_norm.bias", "layers.0.retention.q_proj.bias",
            "norm.weight"} <= set(consts)
    for name, p in consts.items():
        assert torch.all(p == (1.0 if name.endswith(".weight") else 0.0)), name
    torch.manual_seed(0)
    a = build_model("retnet_tiny", vocab_size=512, d_model=64, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    b = build_model("retnet_tiny", vocab_size=512, d_model=64, n_layers=1, n_heads=2)
    torch.manual_seed(1)
    c = build_model("retnet_tiny", vocab_size=512, d_model=64, n_layers=1, n_heads=2)
    assert torch.equal(a.embed.weight, b.embed.weight) and not torch.equal(a.embed.weight, c.embed.weight)


def test_an_export_of_another_model_or_without_a_tensor_is_refused_by_name(tmp_path):
    import dataclasses
    import json

    from safetensors.torch import save_file

    from retnet_train.model import EXPORT_CONFIG, EXPORT_WEIGHTS
    from retnet_train.parallel.sharded_init import ExportValues
    from retnet_train.train.build import check_export_config

    cfg = _config("retnet_tied")
    (tmp_path / EXPORT_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg)))
    check_export_config(cfg, tmp_path)  # the same network
    with pytest.raises(ValueError, match=r"checkpoint.init_from=.*'d_model': \(64, 128\)"):
        check_export_config(dataclasses.replace(cfg, d_model=128), tmp_path)
    weights = _unsharded("retnet_tied").state_dict()
    weights.pop("lm_head.weight")
    weights.pop("norm.weight")
    save_file(weights, tmp_path / EXPORT_WEIGHTS)
    values = ExportValues(tmp_path / EXPORT_WEIGHTS)
    with torch.device("meta"):
        model = build_model(cfg)
    with pytest.raises(ValueError, match=rf"{EXPORT_WEIGHTS}: no tensor for the model's parameters \['norm.weight'\]"):
        values.plan(model)


@pytest.mark.gpu
def test_a_gpu_draws_the_cpus_values():
    """The draw uses only exact or correctly rounded operations, so CUDA gives the CPU's values, and
    a model built on the GPU (unsharded or through the sharded path) equals the CPU's."""
    from retnet_train.parallel.sharded_init import InitValues, build_sharded_model

    key = parameter_key(5, "embed.weight")
    for rule in (normal(0.02), uniform(0.1)):
        cpu = draw_(torch.empty(300, 77), rule, key, (300, 77))
        gpu = draw_(torch.empty(300, 77, device="cuda"), rule, key, (300, 77))
        assert torch.equal(gpu.cpu(), cpu)
    want = _unsharded("retnet").state_dict()
    got = build_sharded_model(_config("retnet"), InitValues(SEED), torch.device("cuda")).state_dict()
    assert all(torch.equal(got[n].cpu(), want[n]) for n in want)
