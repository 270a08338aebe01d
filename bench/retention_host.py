"""Host time of one forward + backward of our retention op, layer by layer.

    python bench/retention_host.py [--shapes 8x2048,2x8192] [--keep both] [--calls 30]

bench/retention_kernels.py shows the host's time per call of the whole op; this splits it into the
layers a call goes through, each timed on its own as `calls` calls back to back: the launch plans in
Python without launching ("plans"), the Triton launches ("launches"), the two torch.library ops
without autograd ("ops"), chunk_retention's forward alone without gradients ("forward"), and a
plain eager call of chunk_retention with its backward through autograd ("autograd": what a user's
eager step runs). "host" is the host clock per call before waiting for the GPU; "with GPU" after
it: where they agree, the GPU waited for the host. Shapes of RetNet-1.3B: 8 heads, d_k 256, d_v 512.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from bench.retention_kernels import back_to_back_s  # noqa: E402
from retnet_train.model.config import RetentionKeep  # noqa: E402
from retnet_train.model.kernels import retention_launch as L  # noqa: E402
from retnet_train.model.kernels import retention_triton as RT  # noqa: E402
from retnet_train.model.retention import head_log_decays  # noqa: E402

H, DK, DV = 8, 256, 512
LAYERS = ("plans", "launches", "ops", "forward", "autograd")


def layer_calls(B: int, T: int, keep: str, device, heads: int = H, dk: int = DK, dv: int = DV,
                dtype=torch.bfloat16) -> dict[str, Callable[[], tuple]]:
    """name -> a callable running one forward + backward through that layer (the forward alone for
    "forward"); it returns the gradients it computed (dq, dk, dv; None for "plans" and "forward")."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, heads, d, generator=g).to(device, dtype) for d in (dk, dk, dv, dv))
    k = k * dk ** -0.5
    log_gamma = head_log_decays(heads).to(device)
    lg2 = RT.log2_decays(log_gamma, device)
    tuning = L.with_tuning(RT.keep_tuning(keep), 64)
    ints = RT._tuning_ints(tuning)
    lay = L.make_layout(B, T, None, tuning, device)
    flat = [x.view(B * T, heads, -1) for x in (q, k, v, do)]

    def through_launches(run=L.execute):
        o, _, states, scores = L.forward(*flat[:3], lg2, None, False, lay, tuning, run=run)
        return L.backward(*flat[:3], lg2, None, flat[3], None, False, lay, tuning, run=run,
                          states=states if tuning.keep_states else None,
                          scores=scores if tuning.keep_scores else None)[:3]

    def plans():
        through_launches(run=lambda launch: None)
        return None

    def ops():
        _, _, states, scores = torch.ops.retnet.retention_chunk(q, k, v, lg2, None, None, False, ints)
        # what the op's autograd passes back: a kept tensor, or None (the op returns empty ones)
        kept = (states if tuning.keep_states else None, scores if tuning.keep_scores else None)
        return torch.ops.retnet.retention_chunk_backward(do, None, q, k, v, lg2, None, None, *kept, False, ints)[:3]

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def forward():
        with torch.no_grad():
            RT.chunk_retention(q, k, v, log_gamma, chunk_size=64, tuning=tuning)
        return None

    def autograd():
        for x in leaves:
            x.grad = None
        RT.chunk_retention(*leaves, log_gamma, chunk_size=64, tuning=tuning)[0].backward(do)
        return tuple(x.grad for x in leaves)

    return dict(zip(LAYERS, (plans, through_launches, ops, forward, autograd)))


def per_call_us(fn: Callable, calls: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(host us per call, us per call with the GPU's time) over `calls` calls back to back."""
    for _ in range(3):
        fn()
    sync()
    host, with_gpu = back_to_back_s(fn, calls, sync)
    return host / calls * 1e6, with_gpu / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8x2048,2x8192", help="batch x T, comma-separated")
    p.add_argument("--keep", default="both", choices=RetentionKeep.values(), help="model.retention_keep")
    p.add_argument("--calls", type=int, default=30, help="calls back to back per layer")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    import triton

    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        for name, fn in layer_calls(B, T, args.keep, torch.device("cuda")).items():
            host, with_gpu = per_call_us(fn, args.calls, torch.cuda.synchronize)
            rows.append([f"{B} x {T}", name, f"{host:.0f}", f"{with_gpu:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    append("Retention op, host time by layer (bench/retention_host.py)", ["shape", "layer", "host us", "with GPU us"],
           rows, notes=f"retention_keep={args.keep}; 8 heads, d_k 256, d_v 512, bf16; {args.calls} calls back to "
                       f"back per layer after 3 warm-up calls; triton {triton.__version__}; layers: {', '.join(LAYERS)} "
                       "(see the script's docstring)")


if __name__ == "__main__":
    main()
