"""Time retention's forms (and causal SDPA for reference), forward + backward, at several lengths.

    python bench/retention_kernels.py [--tokens 32768] [--lengths 2048,8192,32768]

Same token count per call at every length: chunkwise retention should cost the same at any T,
attention grows with T. Shapes of RetNet-1.3B (8 heads, d_k 256, d_v 512) and of the Transformer
baseline (16 heads x 128).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append  # noqa: E402
from retnet_train.model.kernels import fla_retention  # noqa: E402
from retnet_train.model.retention import chunkwise_retention, head_log_decays  # noqa: E402


def time_ms(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fwd_bwd(forward, *inputs):
    def run():
        out = forward(*inputs)
        out.backward(torch.ones_like(out))
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--lengths", default="2048,8192,32768")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    dt, dev = torch.bfloat16, "cuda"
    lg = head_log_decays(8)
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        B = max(args.tokens // T, 1)

        def rand(*shape):
            return torch.randn(*shape, device=dev, dtype=dt).requires_grad_()

        q, k, v = rand(B, T, 8, 256), rand(B, T, 8, 256), rand(B, T, 8, 512)
        fla_ms = time_ms(fwd_bwd(lambda a, b, c: fla_retention.retention(a, b, c, lg, "chunkwise")[0], q, k, v))
        torch_ms = time_ms(fwd_bwd(lambda a, b, c: chunkwise_retention(a, b, c, lg, chunk_size=64)[0], q, k, v),
                           warmup=1, reps=3) if T <= 8192 else float("nan")
        qa, ka, va = rand(B, 16, T, 128), rand(B, 16, T, 128), rand(B, 16, T, 128)
        sdpa_ms = time_ms(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), qa, ka, va))
        rows.append([T, B, f"{fla_ms:.2f}", f"{torch_ms:.2f}", f"{sdpa_ms:.2f}"])
    append("Retention kernels, forward + backward", ["T", "batch", "fla chunk (ms)", "torch chunkwise (ms)",
           "causal SDPA 16x128 (ms)"], rows,
           notes=f"{args.tokens} tokens per call, bf16; retention 8 heads, d_k 256, d_v 512; median of 10 (torch: 3)")


if __name__ == "__main__":
    main()
