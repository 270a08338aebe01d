"""tp=2 (two gloo processes) computes what tp=1 computes with the same weights: logits, loss and
gradients, for RetNet and the Transformer, in the parallel and chunkwise forms. The same processes
build sharded models (tests/test_sharded_init.py's cases): tp=2 slices and ZeRO-3 partitions equal
the unsharded build."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import test_sharded_init
from retnet_train.model import build_model, resolve_config
from retnet_train.parallel.tensor_parallel import (
    apply_tensor_parallel,
    check_divisible,
    merge_state_dicts,
    parallel_cross_entropy,
    shard_state_dict,
    split_dim,
)

TP = 2
CASES = {
    "retnet": dict(spec="retnet_tiny", overrides=dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                                     ffn_type="glu", bias=True)),
    "retnet_tied": dict(spec="retnet_tiny", overrides=dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                                          tie_embeddings=True, score_norm="torchscale")),
    "transformer": dict(spec="transformer_tiny", overrides=dict(vocab_size=256, d_model=64, n_layers=2,
                                                               n_heads=4, bias=True)),
}
CASE_MODES = [("retnet", "parallel"), ("retnet", "chunkwise"), ("retnet_tied", "chunkwise"),
              ("transformer", "parallel")]


def _reference(case, mode):
    torch.manual_seed(0)
    model = build_model(CASES[case]["spec"], **CASES[case]["overrides"])
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = -100  # ignored positions must stay ignored under vocabulary parallelism
    logits = model(ids, mode=mode, chunk_size=16)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return model, ids, labels, logits.detach(), loss.detach(), grads


def _worker(rank, init_file, result_dir):
    """Every case in one pair of processes (a spawned process takes seconds to import torch)."""
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    initialize_model_parallel(TP)
    for case, mode in CASE_MODES:
        _compare(rank, case, mode, result_dir)
    os.makedirs(os.path.join(result_dir, "sharded"), exist_ok=True)
    test_sharded_init.sharded_cases(rank, os.path.join(result_dir, "sharded"))
    dist.destroy_process_group()


def _compare(rank, case, mode, result_dir):
    model, ids, labels, ref_logits, ref_loss, ref_grads = _reference(case, mode)
    model.zero_grad()
    apply_tensor_parallel(model, rank, TP)
    logits = model(ids, mode=mode, chunk_size=16)
    loss = parallel_cross_entropy(logits, labels)
    loss.backward()
    vocab_slice = ref_logits.chunk(TP, dim=-1)[rank]
    ref_grad_shards = shard_state_dict(ref_grads, rank, TP)
    grad_errs = {}
    for name, p in model.named_parameters():
        ref = ref_grad_shards[name]
        grad_errs[name] = ((p.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
    torch.save(dict(
        logits=((logits.detach() - vocab_slice).abs().max() / vocab_slice.abs().max()).item(),
        loss=abs(loss.item() - ref_loss.item()) / ref_loss.item(),
        grads=grad_errs,
        shard=model.state_dict(),
    ), os.path.join(result_dir, f"{case}-{mode}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=TP, join=True)
    return out


@pytest.mark.parametrize("case,mode", CASE_MODES)
def test_tp2_equals_tp1(case, mode, tp2_results):
    results = [torch.load(tp2_results / f"{case}-{mode}-rank{r}.pt") for r in range(TP)]
    for r in results:
        assert r["logits"] < 1e-5 and r["loss"] < 1e-5
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, worst
    # the shards merge back into the unsharded weights
    model = _reference(case, mode)[0]
    full = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        full.pop("lm_head.weight")
    merged = merge_state_dicts([r["shard"] for r in results])
    assert merged.keys() == full.keys()
    for k in full:
        assert torch.equal(merged[k], full[k]), k


def test_split_dims_of_every_parameter():
    model = build_model("retnet_tiny", n_layers=1, ffn_type="glu", bias=True)
    dims = {name: split_dim(name) for name, _ in model.named_parameters()}
    assert dims["embed.weight"] == 0 and dims["lm_head.weight"] == 0
    assert dims["layers.0.retention.q_proj.weight"] == 0 and dims["layers.0.retention.g_proj.bias"] == 0
    assert dims["layers.0.retention.out_proj.weight"] == 1 and dims["layers.0.retention.out_proj.bias"] is None
    assert dims["layers.0.retention.head_norm.weight"] == 0
    assert dims["layers.0.ffn.gate.weight"] == 0 and dims["layers.0.ffn.fc2.weight"] == 1
    assert dims["layers.0.retention_norm.weight"] is None and dims["norm.weight"] is None


@pytest.mark.parametrize("overrides,message", [
    (dict(n_heads=2, d_model=64), r"parallel.tp=4 does not divide model.n_heads=2"),
    (dict(ffn_dim=102), r"parallel.tp=4 does not divide model.ffn_dim=102"),
    (dict(vocab_size=250), r"parallel.tp=4 does not divide model.vocab_size=250"),
])
def test_indivisible_sizes_are_refused(overrides, message):
    cfg = resolve_config("retnet_tiny", **overrides)  # the config alone: no weights to draw
    with pytest.raises(ValueError, match=message):
        check_divisible(cfg, 4)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_divisible(resolve_config("retnet_tiny"), 4, world_size=6)


@pytest.fixture(scope="module")
def sharded_ranks(tp2_results):
    return [torch.load(tp2_results / "sharded" / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("case", list(test_sharded_init.CASES))
def test_sharded_build_tp2_slices_equal_the_unsharded_build(sharded_ranks, case):
    test_sharded_init.check_tp2_slices(sharded_ranks, case)


def test_sharded_build_tp2_slices_read_from_an_export(sharded_ranks):
    test_sharded_init.check_tp2_export(sharded_ranks)


@pytest.mark.parametrize("case", ["retnet", "retnet_tied"])
def test_sharded_build_zero3_partitions_at_construction_equal_the_unsharded_build(sharded_ranks, case):
    test_sharded_init.check_zero3(sharded_ranks, case)
