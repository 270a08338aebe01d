"""What one block keeps for its backward, in bytes per token: our RetNet against our Transformer,
eager or compiled, by checkpointing mode and activation memory budget. Runs on CPU (our Triton
kernels under Triton's interpreter) as on a GPU, so the memory side of issue 10 can be studied
without one.

    python bench/saved_activations.py                        # retnet_1.3b and transformer_1.3b
    python bench/saved_activations.py --modes none full --budgets 0.3 --keep none both

Every tensor autograd saves during one forward (a saved_tensors_hooks pack hook; a compiled block
saves what its partitioner chose) is counted once per storage, at two sequence lengths; the
difference per token is what grows with the sequence (weights and their casts do not). The model
has one block at the preset's widths, so the figure is per block and token (it includes the token
ids the embedding keeps, 8 bytes). The projection multiplies it by the preset's blocks and the
tokens of a step: activations only, not weights, gradients, optimizer state or temporaries, which a
GPU's peak adds (bench/memory_snapshot.py shows those). The largest kinds of saved tensor are
named by dtype and shape (T: the sequence's dimension). Eager `selective` checkpointing is left
out: its kept tensors sit in the checkpoint's own cache, out of the hook's sight (compiled, the
graph saves them itself and they are counted).

A budget is a share of everything the block saves, weight casts included. At the default lengths
(a few hundred tokens) the per-token figure hardly moves under one (74 against 78 KiB at 0.3 for
retnet_1.3b), presumably because the casts make up most of what the block saves there and
recomputing them meets the budget. Budget rows need lengths
like the training's: at --lengths 2048 4096 (--kernels torch) 0.3 took retnet_1.3b from 159 to 53
KiB, and on an H100 at 2 x 8192 tokens its peak from 43.4 to 24.4 GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: our kernels on CPU


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["retnet_1.3b", "transformer_1.3b"])
    p.add_argument("--kernels", default="triton", help="our RetNet's model.kernels")
    p.add_argument("--keep", nargs="+", default=["none"], help="our RetNet's model.retention_keep values")
    p.add_argument("--modes", nargs="+", default=["none", "selective", "full"], help="activation checkpointing modes")
    p.add_argument("--budgets", nargs="*", type=float, default=[],
                   help="also compiled, no checkpointing, at these activation memory budgets")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    # both past our kernels' 256-token segments (shorter sequences get shorter segments, and the kept
    # scores and states of retention_keep change size with them), neither equal to a model width
    # (which would read as T)
    p.add_argument("--lengths", nargs=2, type=int, default=[288, 416], help="the two sequence lengths (tokens)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step of the projection")
    p.add_argument("--top", type=int, default=4, help="kinds of saved tensor named per row")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def saved_storages(model, length: int, device: torch.device) -> dict[tuple, int]:
    """{(storage, kind): bytes} of what autograd keeps from one forward of `length` tokens; kind is
    the dtype and shape, the sequence's dimension written T (e.g. "bfloat16 [1, T, 8, 512]")."""
    kept: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        dims = ", ".join("T" if n == length else str(n) for n in t.shape)
        kept[(s.data_ptr(), f"{str(t.dtype).replace('torch.', '')} [{dims}]")] = s.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model(ids, mode="chunkwise", return_hidden=True)
    hidden.float().square().mean().backward()  # the compiled backward runs too (its graph is checked)
    model.zero_grad(set_to_none=True)
    # one entry per storage: the same storage saved under two views counts once
    by_storage: dict[int, tuple] = {}
    for key, size in kept.items():
        if key[0] not in by_storage or size > kept[by_storage[key[0]]]:
            by_storage[key[0]] = key
    return {key: kept[key] for key in by_storage.values()}


def per_token(model, lengths: list[int], device: torch.device) -> tuple[float, dict[str, float]]:
    """Bytes per token (the slope between the two lengths), in all and by kind (dtype and shape)."""
    kinds = []
    for length in lengths:
        grouped: dict[str, int] = defaultdict(int)
        for (_, kind), size in saved_storages(model, length, device).items():
            grouped[kind] += size
        kinds.append(grouped)
    span = lengths[1] - lengths[0]
    slope = {k: (kinds[1].get(k, 0) - kinds[0].get(k, 0)) / span for k in set(kinds[0]) | set(kinds[1])}
    return sum(slope.values()), {k: v for k, v in slope.items() if v > 0}


def build(preset: str, args, keep: str, mode: str, compiled: bool, budget: float | None, device: torch.device):
    from retnet_train.model import build_model

    torch.manual_seed(0)
    overrides = {"kernels": args.kernels, "retention_keep": keep} if preset.startswith("retnet") else {}
    with device:
        model = build_model(preset, n_layers=1, **overrides).train()
    model.set_activation_checkpointing(mode)
    if compiled:
        model.compile_blocks(memory_budget=budget)
    return model


def setups(args) -> list[tuple[str, bool, float | None]]:
    out = [(mode, False, None) for mode in args.modes if mode != "selective"]  # see the docstring
    if not args.no_compile:
        out += [(mode, True, None) for mode in args.modes]
        out += [("none", True, b) for b in args.budgets]
    return out


def main(argv=None) -> None:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from retnet_train.model import resolve_config

    rows = []
    for preset in args.presets:
        cfg = resolve_config(preset)
        for keep in (args.keep if preset.startswith("retnet") else ["-"]):
            for mode, compiled, budget in setups(args):
                torch._dynamo.reset()
                model = build(preset, args, "none" if keep == "-" else keep, mode, compiled, budget, device)
                total, kinds = per_token(model, args.lengths, device)
                top = sorted(kinds.items(), key=lambda kv: -kv[1])[: args.top]
                gib = total * cfg.n_layers * args.tokens / 2**30
                rows.append([preset, keep, mode, "no" if not compiled else ("yes" if budget is None else f"budget {budget:g}"),
                             f"{total / 1024:.1f}", f"{gib:.1f}", ", ".join(f"{k}: {v / 1024:.1f}" for k, v in top)])
                print(rows[-1], flush=True)
    from bench.results import append

    append("Saved activations per block and token (bench/saved_activations.py)",
           ["preset", "retention_keep", "checkpointing", "compiled", "KiB per token and block",
            f"GiB at {args.tokens} tokens, all blocks", "largest kinds (KiB per token)"], rows,
           notes=(f"one block at the preset's widths, bf16 autocast, fp32 weights; slope between {args.lengths[0]} "
                  f"and {args.lengths[1]} tokens of what autograd saves (per storage); activations only; RetNet "
                  f"kernels={args.kernels}"), save=not args.no_save)


if __name__ == "__main__":
    main()
