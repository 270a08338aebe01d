"""One layer's decoding retention on the GPU: the one-kernel step (kernels/decode_step.py) against
the unfused kernels it replaces (rotary of q and k and the copies of v and g, compiled;
our recurrent kernel; the norm + gate kernel), same inputs, each as a CUDA graph of many layers' launches.

    python bench/decode_kernel.py [--batches 1 16 64] [--sweep] [--windows 4 8 16]

Shapes of retnet_1.3b (8 heads, d_k 256, d_v 512), bf16, fp32 state. Each timed graph launches the
step over --layers state buffers in turn (at least 256 MB of them, so no state is in L2 when it is
read: the time is the DRAM's, as in a real step). GB/s counts the bytes the step must move: the state
read and written, q/k/v/g read, y written. --sweep also times other tiles of the fused kernel;
--windows the state written back once every W tokens (model/retention_state.py: the graph then
runs W tokens, so its mean per token and layer holds one write-back).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from retnet_train.model.kernels import decode_step as D  # noqa: E402
from retnet_train.model.kernels import retention_triton as RT  # noqa: E402
from retnet_train.model.kernels.norm_gate import gated_head_norm  # noqa: E402
from retnet_train.model.layers import HeadNorm, apply_rotary  # noqa: E402
from retnet_train.model.retention import head_log_decays  # noqa: E402

H, DK, DV = 8, 256, 512


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--sweep", action="store_true", help="also time block_v 16..128 x warps 2..8 of the fused kernel")
    p.add_argument("--windows", type=int, nargs="*", default=[],
                   help="also time the state written back once every W tokens (the engine's state_window)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def graph_ms(step, layers: int, reps: int, tokens: int = 1) -> float:
    """Median ms of one step(i, t) over a CUDA graph of tokens t = 0..tokens-1, each through layers
    i = 0..layers-1."""
    def all_steps():
        for t in range(tokens):
            for i in range(layers):
                step(i, t)

    all_steps()  # warm-up: compiles, allocates
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_steps()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (layers * tokens))
    return sorted(times)[len(times) // 2]


def setting(batch: int):
    """Inputs of `layers` layers' steps: projections, states, rotary tables, decays, one head norm."""
    state_bytes = batch * H * DK * DV * 4
    layers = max(4, -(-256 * 2 ** 20 // state_bytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    width = 2 * H * (DK + DV)
    projs = [torch.randn(batch, 1, width, device="cuda", generator=g).bfloat16() for _ in range(layers)]
    states = [torch.randn(batch, H, DK, DV, device="cuda", generator=g) * 0.1 for _ in range(layers)]
    angle = torch.rand(batch, 1, 1, DK, device="cuda", generator=g) * 6.28
    norm = HeadNorm(H, DV, "groupnorm", 1e-6, True).cuda().bfloat16()
    lg = head_log_decays(H).cuda()
    return projs, states, (angle.sin(), angle.cos()), norm, lg, layers


def fused_step(projs, states, rotary, norm, lg, window: int = 1, **tiles):
    """The one-kernel step; window > 1: each state written back once every `window` tokens (token t
    of the graph at position t, every sequence's window starting at 0)."""
    lg2 = D.log2_decays(lg, lg.device)
    sin, cos = (t.reshape(-1, DK).contiguous() for t in rotary)
    B = projs[0].shape[0]
    windows = None
    if window > 1:
        start = torch.zeros(B, dtype=torch.long, device="cuda")
        positions = [torch.full((B,), t, dtype=torch.long, device="cuda") for t in range(window)]
        windows = [(torch.zeros(B, H, window, DK, dtype=torch.bfloat16, device="cuda"),
                    torch.zeros(B, H, window, DV, dtype=torch.bfloat16, device="cuda")) for _ in states]

    def step(i, t=0):
        proj = projs[i].view(projs[i].shape[0], -1)
        win = None if windows is None else (*windows[i], positions[t], start)
        y, launch = D.launch_decode_step(proj, sin, cos, lg2, states[i], norm.weight, norm.bias, True, norm.eps,
                                         DK ** -0.5, window=win, **tiles)
        launch()
        return y
    return step


def unfused_step(projs, states, rotary, norm, lg):
    """What the model's compiled step ran per layer before the fused kernel: rotary through
    inductor, our recurrent kernel and norm + gate kernel (custom ops)."""
    sin, cos = rotary

    def layer(proj, state):
        B = proj.shape[0]
        q, k, v, g = proj.split([H * DK, H * DK, H * DV, H * DV], dim=-1)
        q = apply_rotary(q.view(B, 1, H, DK), sin, cos)
        k = apply_rotary(k.view(B, 1, H, DK), sin * DK ** -0.5, cos * DK ** -0.5)
        o = RT.recurrent_step(q[:, 0], k[:, 0], v.reshape(B, H, DV), lg, state)
        return gated_head_norm(o[:, None], g, norm, "swish", "triton")

    compiled = torch.compile(layer, dynamic=False)
    return lambda i, t=0: compiled(projs[i], states[i])


def main(argv=None) -> None:
    args = parse(argv)
    rows = []
    for batch in args.batches:
        projs, states, rotary, norm, lg, layers = setting(batch)
        moved = batch * (H * DK * DV * 8 + 2 * H * (DK + DV) * 2 + H * DV * 2)
        variants = [("unfused kernels", unfused_step(projs, states, rotary, norm, lg), 1),
                    ("fused (default)", fused_step(projs, states, rotary, norm, lg), 1)]
        variants += [(f"fused, state written once every {w} tokens", fused_step(projs, states, rotary, norm, lg, w), w)
                     for w in args.windows]
        if args.sweep:
            variants += [(f"fused BV={bv} warps={w}", fused_step(projs, states, rotary, norm, lg, block_v=bv, num_warps=w),
                          1) for bv in (16, 32, 64, 128) for w in (2, 4, 8)]
        base = None
        for name, step, tokens in variants:
            with torch.no_grad():
                ms = graph_ms(step, layers, args.reps, tokens)
            base = base or ms
            rows.append([batch, name, f"{ms * 1e3:.1f}", f"{moved / ms / 1e6:.0f}", f"{base / ms:.2f}"])
            print(rows[-1], flush=True)
        del projs, states
        torch.cuda.empty_cache()
    append("Decoding retention step, one layer: fused kernel against the unfused kernels (bench/decode_kernel.py)",
           ["batch", "variant", "us per layer", "GB/s (bytes needed)", "x unfused"], rows,
           notes=f"retnet_1.3b heads ({H} x d_k {DK} x d_v {DV}), bf16, fp32 state; median of {args.reps} replays "
                 f"of a CUDA graph over >= 256 MB of states; bytes needed = state read + written, q/k/v/g read, y written "
                 f"(the plain step's, also for the windowed rows: their GB/s is the same work's rate)",
           save=not args.no_save)


if __name__ == "__main__":
    main()
