"""The decoding step's matmuls alone: cuBLAS (F.linear) against our skinny-matmul kernel, at a
preset's weight shapes and 1-16 rows, in GB/s of weight read.

    python bench/skinny_matmul.py --preset retnet_1.3b --rows 1 16 [--sweep]

Each timing is a CUDA graph of calls over enough copies of the weight (>= 256 MB together) that
none is still in L2 when it is read again, as in a real step. --sweep also times every tile
config and prints the best per shape (what `default_config` should pick). Prints only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retnet_train.model import build_model  # noqa: E402
from retnet_train.model.kernels import skinny_matmul as S  # noqa: E402

BW = {"H200": 4800.0, "H100": 3350.0}


def shapes(preset: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the weights one decoding step reads (RetNet: fused q/k/v/g)."""
    with torch.device("meta"):
        model = build_model(preset)
    cfg = model.config
    d, v, f = cfg.d_model, cfg.value_width, cfg.ffn_width
    if cfg.arch == "retnet":
        out = {"qkvg": (2 * d + 2 * v, d), "out": (d, v)}
    else:
        out = {"qkv": (3 * d, d), "out": (d, d)}
    out.update({"fc1": (f * (2 if cfg.ffn_type == "glu" else 1), d), "fc2": (d, f), "lm_head": (cfg.vocab_size, d)})
    return out


def time_graph(fn, weights, reps: int = 10) -> float:
    """Seconds per call of fn(w) averaged over a graph that calls it once per weight copy."""
    fn(weights[0])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in weights:
            fn(w)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / len(weights)


def sweep_configs():
    for bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8), (3, 4, 5)):
        if bn * bk * 2 * stages > 200_000:  # shared memory of the pipelined W tiles
            continue
        yield bn, bk, warps, stages


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="retnet_1.3b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BW.items() if k in name), None)
    print(f"{name}, bf16, {args.preset}; GB/s of weight read" + (f" (peak {peak:.0f})" if peak else ""))
    print(f"{'weight':>8} {'N x K':>12} {'rows':>4} {'cuBLAS us':>9} {'GB/s':>6} {'ours us':>8} {'GB/s':>6} "
          f"{'x cuBLAS':>8}" + ("  best config (us, GB/s)" if args.sweep else ""))
    for wname, (N, K) in shapes(args.preset).items():
        nbytes = N * K * 2
        copies = max(2, -(-256 * 2 ** 20 // nbytes))
        weights = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, weights[0])
            got = S.skinny_linear_raw(x, weights[0], None)
            err = (got.float() - ref.float()).abs().max().item()
            if err > 1e-2 * ref.float().abs().max().item() + 1e-3:
                raise SystemExit(f"{wname} rows {m}: skinny_linear differs from F.linear by {err}")
            t_ref = time_graph(lambda w: F.linear(x, w), weights)
            t_our = time_graph(lambda w: S.skinny_linear_raw(x, w, None), weights)
            line = (f"{wname:>8} {f'{N}x{K}':>12} {m:>4} {t_ref * 1e6:9.2f} {nbytes / t_ref / 1e9:6.0f} "
                    f"{t_our * 1e6:8.2f} {nbytes / t_our / 1e9:6.0f} {t_ref / t_our:8.2f}")
            if args.sweep:
                best = None
                for cfg in sweep_configs():
                    try:
                        t = time_graph(lambda w: S.skinny_linear_raw(x, w, None, cfg), weights, reps=3)
                    except Exception:  # out of shared memory or registers for this tile
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    line += f"  {best[1]} ({best[0] * 1e6:.2f}, {nbytes / best[0] / 1e9:.0f})"
            print(line, flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
