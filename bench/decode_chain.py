"""retnet_1.3b's decoding layers as a chain of kernels, with and without programmatic dependent
launch (PDL) and the weights' L2 prefetch (issue 11's step bars). Per layer:

    x -> LayerNorm -> qkvg matmul -> retention decoding step (fp32 state in place)
      -> out_proj + residual -> LayerNorm -> fc1 -> GELU -> fc2 + residual

    python bench/decode_chain.py [--batches 1 16] [--sweep]

Variants: "torch" (torch's norm, cuBLAS matmuls, elementwise ops, our decoding kernel; eager,
so more elementwise kernels than the compiled step has), "cuBLAS only" (the four matmuls alone,
what the compiled step's matmuls cost), and our few-row linear kernels (norm, GELU and residual
fused in) without PDL, with PDL, and with PDL and the L2 prefetch of each weight. Each is one CUDA
graph over all 24 layers (2.4 GB of weights and the state: nothing stays in L2 from one replay to
the next); median of --reps replays. Floor: weights + state read and written at 3.35 TB/s (H100).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from retnet_train.model.kernels import decode_step as D  # noqa: E402
from retnet_train.model.kernels.decode_linear import LinearTiles, few_row_linear, prefetch_share  # noqa: E402
from retnet_train.model.layers import HeadNorm  # noqa: E402
from retnet_train.model.retention import head_log_decays  # noqa: E402

D_MODEL, H, DK, DV, FFN, LAYERS = 2048, 8, 256, 512, 4096, 24
HBM_GBS = 3350.0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time tile variants of the PDL + prefetch chain")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


class Layers:
    """24 layers' weights (bf16, distinct tensors) and states for a batch B."""

    def __init__(self, B: int, dev: torch.device):
        g = torch.Generator(device=dev).manual_seed(0)

        def w(n, k):
            return (torch.randn(n, k, device=dev, generator=g) * k ** -0.5).bfloat16()

        self.qkvg = [w(2 * H * (DK + DV), D_MODEL) for _ in range(LAYERS)]
        self.out = [w(D_MODEL, H * DV) for _ in range(LAYERS)]
        self.fc1 = [w(FFN, D_MODEL) for _ in range(LAYERS)]
        self.fc2 = [w(D_MODEL, FFN) for _ in range(LAYERS)]
        self.ln = [(torch.ones(D_MODEL, device=dev, dtype=torch.bfloat16),
                    torch.zeros(D_MODEL, device=dev, dtype=torch.bfloat16)) for _ in range(2 * LAYERS)]
        self.state = [torch.randn(B, H, DK, DV, device=dev, generator=g) * 0.01 for _ in range(LAYERS)]
        self.initial = [s.clone() for s in self.state]
        self.norm = HeadNorm(H, DV, "groupnorm", 1e-6, True).to(dev).bfloat16()
        self.lg2 = D.log2_decays(head_log_decays(H), dev)
        self.sin = torch.zeros(1, DK, device=dev)
        self.cos = torch.ones(1, DK, device=dev)
        self.x0 = torch.randn(B, D_MODEL, device=dev, generator=g).bfloat16()
        self.x = self.x0.clone()
        self.B = B

    def reset(self) -> None:
        """The input and the states as they were made: every variant computes the same step."""
        self.x.copy_(self.x0)
        for s, t in zip(self.state, self.initial):
            s.copy_(t)

    def bytes_per_layer(self) -> int:
        weights = sum(t.numel() * 2 for t in (self.qkvg[0], self.out[0], self.fc1[0], self.fc2[0]))
        return weights + 2 * self.state[0].numel() * 4


def retention(L: Layers, i: int, proj, pdl: bool, early: bool):
    y, launch = D.launch_decode_step(proj, L.sin, L.cos, L.lg2, L.state[i], L.norm.weight, L.norm.bias, True,
                                     L.norm.eps, DK ** -0.5, pdl=pdl, early_trigger=early)
    launch()
    return y


def torch_layer(L: Layers, i: int) -> None:
    x = L.x
    h = F.layer_norm(x, (D_MODEL,), *L.ln[2 * i], 1e-5)
    y = retention(L, i, F.linear(h, L.qkvg[i]), False, False)
    x = x + F.linear(y, L.out[i])
    u = F.gelu(F.linear(F.layer_norm(x, (D_MODEL,), *L.ln[2 * i + 1], 1e-5), L.fc1[i]).float()).bfloat16()
    L.x.copy_(x + F.linear(u, L.fc2[i]))


def cublas_only_layer(L: Layers, i: int) -> None:
    p = F.linear(L.x, L.qkvg[i])
    h = F.linear(p[:, :H * DV], L.out[i])
    u = F.linear(h, L.fc1[i])
    L.x.copy_(F.linear(u, L.fc2[i]))


def own_layer(L: Layers, i: int, pdl: bool, prefetch: float, tiles: LinearTiles, early: bool = False) -> None:
    pk = prefetch_share

    ln1, ln2 = ("layernorm", *L.ln[2 * i], 1e-5), ("layernorm", *L.ln[2 * i + 1], 1e-5)
    # the qkvg weight (50 MB) does not fit the L2 beside the others: prefetch a share of it
    proj = few_row_linear(L.x, L.qkvg[i], norm=ln1, pdl=pdl, prefetch_k=pk(D_MODEL, prefetch / 3), tiles=tiles)
    y = retention(L, i, proj, pdl, early)
    few_row_linear(y, L.out[i], residual=L.x, out=L.x, pdl=pdl, prefetch_k=pk(H * DV, prefetch), tiles=tiles)
    u = few_row_linear(L.x, L.fc1[i], norm=ln2, gelu=True, pdl=pdl, prefetch_k=pk(D_MODEL, prefetch), tiles=tiles)
    few_row_linear(u, L.fc2[i], residual=L.x, out=L.x, pdl=pdl, prefetch_k=pk(FFN, prefetch), tiles=tiles)


def graph_ms(L: Layers, layer_fn, reps: int) -> tuple[float, torch.Tensor]:
    """Median ms of one replay of a graph of all layers, and the output after one replay from x0."""
    def run():
        for i in range(LAYERS):
            layer_fn(L, i)

    run()  # warm-up: compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    L.reset()
    graph.replay()
    out = L.x.clone()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    L.reset()
    return sorted(times)[len(times) // 2], out


def main(argv=None) -> None:
    args = parse(argv)
    dev = torch.device("cuda")
    rows = []
    for B in args.batches:
        L = Layers(B, dev)
        floor_us = L.bytes_per_layer() / HBM_GBS / 1e3
        base = LinearTiles()
        variants = [("torch (cuBLAS + eager norm/act)", torch_layer),
                    ("cuBLAS matmuls only", cublas_only_layer),
                    ("own, no PDL", lambda L, i: own_layer(L, i, False, 0.0, base)),
                    ("own, PDL", lambda L, i: own_layer(L, i, True, 0.0, base)),
                    ("own, no PDL, prefetch", lambda L, i: own_layer(L, i, False, 1.0, base)),
                    ("own, PDL, prefetch", lambda L, i: own_layer(L, i, True, 1.0, base)),
                    ("own, PDL, prefetch, early trigger", lambda L, i: own_layer(L, i, True, 1.0, base, True)),
                    ("own, PDL, prefetch 1/2", lambda L, i: own_layer(L, i, True, 0.5, base))]
        if args.sweep:
            for bn in (16, 32):
                for bk in (256, 512):
                    for warps in (4, 8):
                        for stages in (2, 3):
                            t = LinearTiles(bn, bk, warps, stages)
                            if t != base:
                                variants.append((f"own, PDL, prefetch, BN={bn} BK={bk} w={warps} st={stages}",
                                                 lambda L, i, t=t: own_layer(L, i, True, 1.0, t)))
        outs = []
        for fn in (torch_layer, lambda L, i: own_layer(L, i, False, 0.0, base)):
            L.reset()
            fn(L, 0)
            outs.append(L.x.clone())
        L.reset()
        one = float((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm())
        print(f"B={B}: one layer, own kernels against torch: relative error {one:.1e}", flush=True)
        ref = None
        for name, fn in variants:
            try:
                ms, out = graph_ms(L, fn, args.reps)
            except Exception as e:  # a tile that does not compile or fit: say so, go on
                print(f"B={B} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if name.startswith("torch"):
                ref = out
            err = float((out.float() - ref.float()).norm() / ref.float().norm()) if ref is not None else float("nan")
            us = ms * 1e3 / LAYERS
            rows.append([B, name, f"{us:.1f}", f"{L.bytes_per_layer() / us / 1e3:.0f}", f"{us / floor_us:.2f}",
                         "-" if name.startswith("cuBLAS") else f"{err:.1e}"])
            print(f"B={B} {name}: {us:.1f} us per layer (floor {floor_us:.1f}), rel err {err:.1e}", flush=True)
    header = ["batch", "variant", "us per layer", "GB/s", "x floor", "rel. error vs torch"]
    append("Decoding layers as one chain of kernels: programmatic dependent launch and L2 prefetch "
           "(bench/decode_chain.py)", header, rows,
           notes=f"retnet_1.3b layer shapes, bf16 weights, fp32 state, 24 layers in one CUDA graph, median of "
                 f"{args.reps} replays; floor = weights + state read and written at {HBM_GBS:.0f} GB/s; "
                 f"error: the layer stack's output against the torch variant's", save=not args.no_save)


if __name__ == "__main__":
    main()
