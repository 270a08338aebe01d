"""Start-up of a large model: each rank builds only its shard (parallel/sharded_init.py), as the
trainer's build_engine does. Per rank: seconds to build, the bytes of the shard it keeps, and its peak
device memory during the build (torch.cuda.max_memory_allocated, from zero), with their ratio.

    torchrun --nproc_per_node 2 bench/sharded_build.py                      # retnet_13b on 2 GPUs
    torchrun --nproc_per_node 2 bench/sharded_build.py --preset retnet_tiny --device cpu --no-save

Layouts (`--layouts`, in order, in the same processes):
  zero3     ZeRO-3 over every rank, no tensor parallelism: each rank allocates and draws only its
            partitions (bf16 on GPU, DeepSpeed's dtype with trainer.precision=bf16; fp32 on CPU)
  tp        tensor parallelism over every rank (--tp, default: all of them), ZeRO-0/1/2: each rank
            holds its fp32 slices (the engine casts them to bf16 later, as before)
  unsharded what every rank built before sharded initialisation: the whole fp32 model (on GPU it
            must fit one device: 52 GB at 13B)

The bar (issue 12): no rank allocates more than 1.2x its shard. Appends the table to bench/RESULTS.md
(rank 0).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYOUTS = ("zero3", "tp", "unsharded")
GIB = 2 ** 30


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="retnet_13b")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--layouts", nargs="+", default=["zero3", "tp"], choices=LAYOUTS)
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size of the tp layout (default: world)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args()


def ds_config(device: torch.device) -> dict:
    """The DeepSpeed JSON parts zero.Init reads: stage 3, bf16 on GPU (what trainer.precision=auto picks)."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": device.type == "cuda"}}


def shard_bytes(model) -> int:
    """The bytes this rank keeps: its ZeRO-3 partitions, or its parameters (a tied weight once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        kept = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += kept.numel() * kept.element_size()
    return total


def measure(layout: str, args, cfg, ps) -> dict:
    cuda = ps.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        model = build(layout, args, cfg, ps)
    except torch.cuda.OutOfMemoryError:  # the unsharded 13B on a small card: a row, not a lost table
        return {"layout": layout, "rank": ps.rank, "seconds": float("nan"), "shard": 0, "peak": None, "dtype": "OOM"}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"layout": layout, "rank": ps.rank, "seconds": seconds, "shard": shard_bytes(model),
           "peak": (torch.cuda.max_memory_allocated() - before) if cuda else None,
           "dtype": str(next(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model.parameters()).dtype)}
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def build(layout: str, args, cfg, ps):
    from retnet_train.model import build_model
    from retnet_train.parallel import mpu
    from retnet_train.parallel.sharded_init import InitValues, build_sharded_model
    from retnet_train.parallel.zero3_init import Zero3Partitioner

    if layout == "zero3":
        # ZeRO-3 over the data-parallel ranks: all of them when tp=1, each tp rank's peers otherwise
        partition = Zero3Partitioner(ds_config(ps.device), mpu() if ps.tp_size > 1 else None)
        model = build_sharded_model(cfg, InitValues(args.seed), ps.device, ps.tp_rank, ps.tp_size,
                                    partition=partition)
    elif layout == "tp":
        model = build_sharded_model(cfg, InitValues(args.seed), ps.device, ps.tp_rank, ps.tp_size)
    else:
        with torch.device(ps.device):
            model = build_model(cfg)
    return model


def main() -> None:
    args = parse()
    from retnet_train.model import resolve_config
    from retnet_train.parallel import groups
    from retnet_train.parallel.tensor_parallel import check_divisible

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or world
    cfg = resolve_config(args.preset)
    check_divisible(cfg, tp, world)
    ps = groups.init_distributed(device=args.device, tp_size=tp)
    rows = []
    for layout in args.layouts:
        if layout == "zero3" and ps.tp_size > 1 and ps.dp_size == 1:
            # ZeRO-3 over one rank partitions nothing: measure it over the world, without tensor parallelism
            ps_zero = groups.ParallelState(**{**vars(ps), "tp_size": 1, "tp_rank": 0})
            rows += groups.all_gather_objects(measure(layout, args, cfg, ps_zero))
        else:
            rows += groups.all_gather_objects(measure(layout, args, cfg, ps))
        groups.barrier()
    if ps.is_main:
        report(rows, args, cfg, ps, tp)
    groups.destroy()


def report(rows: list[dict], args, cfg, ps, tp: int) -> None:
    from bench.results import append

    n_params = sum(p.numel() for p in _meta_model(cfg).parameters())
    table, worst = [], {}
    for r in rows:
        ratio = r["peak"] / r["shard"] if r["peak"] is not None and r["shard"] else None
        if ratio is not None:
            worst[r["layout"]] = max(worst.get(r["layout"], 0.0), ratio)
        label = {"zero3": f"ZeRO-3 over {ps.world_size}", "tp": f"tp={tp}", "unsharded": "unsharded (before)"}
        table.append([label[r["layout"]], r["rank"], r["dtype"].replace("torch.", ""), f"{r['shard'] / GIB:.2f}",
                      f"{r['peak'] / GIB:.2f}" if r["peak"] is not None else "-",
                      f"{ratio:.3f}" if ratio is not None else "-", f"{r['seconds']:.1f}"])
    bar = "; ".join(f"{k}: worst rank {v:.3f}x its shard ({'meets' if v <= 1.2 else 'MISSES'} the 1.2x bar)"
                    for k, v in worst.items())
    notes = (f"{args.preset} ({n_params / 1e9:.2f}B parameters), seed {args.seed}; peak = device memory allocated "
             f"during the build; shard = the bytes the rank keeps" + (f". {bar}" if bar else ""))
    append(f"Sharded build of {args.preset} on {ps.world_size} ranks (bench/sharded_build.py)",
           ["layout", "rank", "dtype", "shard GiB", "peak GiB", "peak / shard", "build s"], table,
           notes=notes, save=not args.no_save)


def _meta_model(cfg):
    from retnet_train.model import build_model

    with torch.device("meta"):
        return build_model(cfg)


if __name__ == "__main__":
    main()
