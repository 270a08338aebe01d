"""GPU time of each launch of one forward + backward of our retention kernels, by role.

    python bench/retention_launches.py [--shapes 8x2048,2x8192] [--keep both] [--set block_z=64 ...]

bench/retention_kernels.py times the whole op; this splits it: the launches a real call makes
(retention_launch.forward and .backward, replayed with a recording executor) are timed one by one
with triton.testing.do_bench, which empties L2 before each run, so each figure is that kernel alone
from a cold cache. The roles name what a launch computes: "forward walk" (the segment states),
"reverse walk" (their gradients), "dq" ... Shapes of RetNet-1.3B: 8 heads, d_k 256, d_v 512, bf16.
--set overrides Tuning fields (ints, true/false, or two ints joined by x for state_block) to time a
variant beside the default in one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from retnet_train.model.config import RetentionKeep  # noqa: E402
from retnet_train.model.kernels import retention_launch as L  # noqa: E402
from retnet_train.model.kernels.retention_triton import keep_tuning  # noqa: E402
from retnet_train.model.kernels.decode_step import log2_decays  # noqa: E402
from retnet_train.model.retention import head_log_decays  # noqa: E402

H, DK, DV = 8, 256, 512


def recorded_launches(B: int, T: int, tuning: L.Tuning, device) -> list[tuple[str, L.Launch]]:
    """(role, launch) of one forward + backward at B x T, in launch order (nothing runs)."""
    q, k = (torch.randn(B * T, H, DK, device=device).bfloat16() for _ in range(2))
    v, do = (torch.randn(B * T, H, DV, device=device).bfloat16() for _ in range(2))
    lg2 = log2_decays(head_log_decays(H), device)
    lay = L.make_layout(B, T, None, tuning, device)
    forward, backward = [], []
    _, _, states, scores = L.forward(q, k, v, lg2, None, False, lay, tuning, run=forward.append)
    L.backward(q, k, v, lg2, None, do, None, False, lay, tuning, run=backward.append,
               states=states if tuning.keep_states else None, scores=scores if tuning.keep_scores else None)
    return [(f"forward {r}", x) for r, x in zip(("scores", "walk", "outputs"), forward)] + backward_roles(backward)


def backward_roles(launches: list[L.Launch]) -> list[tuple[str, L.Launch]]:
    """Names for retention_launch.backward's launches: the recomputed walk and scores where nothing
    was kept, the reverse walk, the gradient's scores (the last score pass), dq, dk, dv (the outputs)."""
    kernels = [x.kernel.__name__ for x in launches]
    last_scores = len(kernels) - 1 - kernels[::-1].index("intra_scores_kernel")
    outputs = iter(("dq", "dk", "dv"))
    named = []
    for i, (name, x) in enumerate(zip(kernels, launches)):
        if name == "segment_states_kernel":
            role = "reverse walk" if x.constexprs["REVERSE"] else "walk (recomputed)"
        elif name == "intra_scores_kernel":
            role = "gradient scores" if i == last_scores else "scores (recomputed)"
        else:
            role = next(outputs)
        named.append((f"backward {role}", x))
    return named


def parse_sets(items: list[str]) -> dict:
    """--set key=value pairs -> Tuning fields; a clear error for an unknown key or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(L.Tuning)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {sorted(fields)}")
        try:
            if fields[key].type == "bool":
                if text not in ("true", "false"):
                    raise ValueError
                out[key] = text == "true"
            elif key == "state_block":
                out[key] = tuple(int(n) for n in text.split("x"))
                if len(out[key]) != 2:
                    raise ValueError
            else:
                out[key] = int(text)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {key} takes "
                             + ("true or false" if fields[key].type == "bool" else
                                "two ints joined by x" if key == "state_block" else "an int")) from None
    try:
        L.Tuning(**out)  # its own checks (powers of two ...) name the field
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x T, comma-separated")
    p.add_argument("--keep", default="both", choices=RetentionKeep.values(), help="model.retention_keep")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Tuning fields of a variant timed beside the default")
    args = p.parse_args()
    variant = parse_sets(args.set)
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    import triton

    # what the model runs with this retention_keep (retention_triton's own choice, ROCm's tiles included)
    default = L.with_tuning(keep_tuning(args.keep), 64)
    tunings = {"default": default}
    if variant:
        tunings[" ".join(args.set)] = dataclasses.replace(default, **variant)
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        for label, tuning in tunings.items():
            launches = recorded_launches(B, T, tuning, torch.device("cuda"))
            total = 0.0
            for role, launch in launches:
                us = 1000 * triton.testing.do_bench(launch, warmup=10, rep=60)
                total += us
                rows.append([f"{B} x {T}", label, role, launch.kernel.__name__, "x".join(map(str, launch.grid)),
                             launch.num_warps, launch.num_stages, f"{us:.0f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            rows.append([f"{B} x {T}", label, "total", "", "", "", "", f"{total:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    append("Retention kernels launch by launch (bench/retention_launches.py)",
           ["shape", "tuning", "role", "kernel", "grid", "warps", "stages", "us"], rows,
           notes=f"retention_keep={args.keep}; 8 heads, d_k 256, d_v 512, bf16; each launch alone, "
                 "triton.testing.do_bench (L2 emptied before each run, the median of about 60 ms of runs)")


if __name__ == "__main__":
    main()
