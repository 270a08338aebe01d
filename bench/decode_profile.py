"""Where a decoding step's GPU time goes: the engine's step (compiled or not) under torch.profiler,
kernels grouped by name, per step.

    python bench/decode_profile.py --preset retnet_1.3b --batches 1 16 --compile

For each batch: the step time with CUDA graphs (as bench/decode.py measures it), then the same
step replayed under the profiler: the sum of kernel times per step (the GPU's busy time; the rest
of the step time is gaps between kernels), the number of kernels per step, the time by kernel
family and the kernels that take the most time (retnet_train/train/profiling.py's report). Prints only: a profile is for reading, its figures go to RESULTS.md through
bench/decode.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import decode_lib as L  # noqa: E402
from retnet_train.inference import Generator  # noqa: E402
from retnet_train.train.profiling import event_times, kernel_table  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="retnet_1.3b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (RetNet's step does not depend on it)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE")
    p.add_argument("--kernels", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--coordinate-descent", action="store_true",
                   help="inductor's coordinate_descent_tuning (it then lowers a one-row matmul to a tuned reduction)")
    return p.parse_args(argv)


def profile_batch(model, batch: int, args) -> None:
    gen = Generator(model, max_batch=batch, max_len=args.prompt + 8, compile=args.compile)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=g).tolist()
    gen.generate(prompts, max_new_tokens=4)  # prefill, capture, fill the buffers
    gen.graphs.ensure(batch, True)
    for _ in range(5):
        gen.graphs.replay(batch, True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        gen.graphs.replay(batch, True)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / args.steps

    acts = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[acts.CPU, acts.CUDA]) as prof:
        for _ in range(args.steps):
            gen.graphs.replay(batch, True)
        torch.cuda.synchronize()
    times = event_times(prof, torch.device("cuda"))
    busy = sum(t for t, _ in times.values()) / args.steps
    print(f"\n== {args.preset} batch {batch}: {ms:.3f} ms/step with graphs; gaps between kernels {ms - busy:.3f} ms")
    print(kernel_table(times, args.steps, args.top, "kernels"))
    gen.close()
    L.free_memory(next(model.parameters()).device)


def main(argv=None) -> None:
    args = parse(argv)
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    device = torch.device("cuda")
    model, _ = L.build(args.preset, device, torch.bfloat16, args.kernels)
    print(f"{args.preset}, kernels={model.kernels if hasattr(model, 'kernels') else '?'}, compile={args.compile}, "
          f"{torch.cuda.get_device_name()}")
    for b in args.batches:
        profile_batch(model, b, args)


if __name__ == "__main__":
    main()
