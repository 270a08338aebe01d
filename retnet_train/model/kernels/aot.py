"""Compile every Triton kernel of ours ahead of time, for GPUs this machine need not have.

    python -m retnet_train.model.kernels.aot sm_90 gfx90a

Replays the launches of real calls (retention_launch and _norm_gate_triton build them; here on meta
tensors) at the presets' head shapes (d_k 256 / d_v 512 and 128 / 256, bf16, chunk 64; fixed-length
and varlen; with and without states; the head norm + gate as groupnorm or rmsnorm, with and without
its affine weight) and compiles each distinct (kernel, signature, constexprs, warps, stages)
with triton.compile for each target, in parallel. Prints one line per kernel and target, checks the
shared memory each needs against the target's limit, and exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import os
import sys
import time

import torch

HEAD_SHAPES = ((256, 512), (128, 256))  # (d_k, d_v) of the presets
# shared memory a program may use: H100 227 KiB; MI200 64 KiB of LDS
SMEM_LIMIT = {"cuda": 232448, "hip": 65536}
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}


def target(name: str):
    from triton.backends.compiler import GPUTarget

    if name.startswith("sm_"):
        return GPUTarget("cuda", int(name[3:]), 32)
    if name.startswith("gfx"):
        return GPUTarget("hip", name, 64)
    raise SystemExit(f"unknown target {name!r}: expected sm_XY (NVIDIA) or gfxNNN (AMD)")


def launches(rocm: bool, dtype=torch.bfloat16, chunk: int = 64):
    """The launches of forward, backward and the recurrent kernel at the preset shapes."""
    from . import retention_launch as L

    meta = torch.device("meta")
    tuning = L.default_tuning(chunk, rocm=rocm)
    lg2 = torch.empty(8, dtype=torch.float32, device=meta)
    seen = []
    for DK, DV in HEAD_SHAPES:
        q, k = (torch.empty(8192, 8, DK, dtype=dtype, device=meta) for _ in range(2))
        v = torch.empty(8192, 8, DV, dtype=dtype, device=meta)
        for cu in (None, torch.empty(5, dtype=torch.int32, device=meta)):
            # 4 rows of 2048 tokens, or one packed row of 4 sequences: 4 states either way
            lay = L.make_layout(4, 2048, None, tuning, meta) if cu is None else \
                L.make_layout(1, 8192, cu, tuning, meta)
            state = torch.empty(4, 8, DK, DV, dtype=torch.float32, device=meta)
            for s0 in (None, state):
                for need in (False, True):
                    L.forward(q, k, v, lg2, s0, need, lay, tuning, run=seen.append)
                    L.backward(q, k, v, lg2, s0, v, state if need else None, s0 is not None, lay, tuning,
                               run=seen.append)
        qr, kr = (torch.empty(4, 1, 8, DK, dtype=dtype, device=meta) for _ in range(2))
        vr = torch.empty(4, 1, 8, DV, dtype=dtype, device=meta)
        st = torch.empty(4, 8, DK, DV, dtype=torch.float32, device=meta)
        for s_in, s_out in ((st, st), (None, st), (st, None), (None, None)):
            seen.append(L.recurrent(qr, kr, vr, lg2, s_in, s_out)[1])
        norm_gate_launches(DV, dtype, meta, seen.append)
        decode_step_launches(DK, DV, dtype, meta, seen.append)
    return seen


def decode_step_launches(DK: int, DV: int, dtype, device, run) -> None:
    """The one-kernel decoding step (decode_step.py) of 8 heads: groupnorm with its affine weight and
    bias (the presets), rmsnorm without; per-sequence positions (the engine) and one for all; the
    state written every token, and once per window of the engine's default length and of 8."""
    from ..retention_state import DEFAULT_WINDOW
    from .decode_step import launch_decode_step

    B, H = 4, 8
    proj = torch.empty(B, 2 * H * (DK + DV), dtype=dtype, device=device)
    state = torch.empty(B, H, DK, DV, dtype=torch.float32, device=device)
    lg2 = torch.empty(H, dtype=torch.float32, device=device)
    w = torch.empty(H * DV, dtype=dtype, device=device)
    counters = torch.empty(B * H, dtype=torch.int32, device=device)
    for rows, group, affine in ((B, True, True), (1, False, False)):
        sin = torch.empty(rows, DK, dtype=torch.float32, device=device)
        run(launch_decode_step(proj, sin, sin, lg2, state, w if affine else None, w if affine and group else None,
                               group, 1e-6, DK ** -0.5, arrivals=counters)[1])
    # the state written back once per window (retention_state.WindowedState): the engine's default
    # length and another
    sin = torch.empty(B, DK, dtype=torch.float32, device=device)
    positions = torch.empty(B, dtype=torch.long, device=device)
    for n in sorted({DEFAULT_WINDOW, 8}):
        window = (torch.empty(B, H, n, DK, dtype=dtype, device=device), torch.empty(B, H, n, DV, dtype=dtype, device=device),
                  positions, positions)
        run(launch_decode_step(proj, sin, sin, lg2, state, w, w, True, 1e-6, DK ** -0.5, arrivals=counters,
                               window=window)[1])


def norm_gate_launches(D: int, dtype, device, run) -> None:
    """The head norm + gate kernels as HeadNorm uses them: groupnorm (weight and bias, or none) and
    rmsnorm (weight, or none), forward and backward, 8 heads of width D."""
    from . import _norm_gate_triton as NG

    o, g, dy = (torch.empty(2, 64, 8, D, dtype=dtype, device=device) for _ in range(3))
    w = torch.empty(8 * D, dtype=dtype, device=device)
    stats = torch.empty(2 * 64 * 8, dtype=torch.float32, device=device)
    for group in (True, False):
        for affine in (True, False):
            weight, bias = (w if affine else None), (w if affine and group else None)
            NG.forward(o, g, weight, bias, group, 1e-6, run=run)
            NG.backward(dy, o, g, weight, bias, stats, stats, group, run=run)


def spec(launch) -> tuple:
    """(module, kernel name, signature, constexprs, attrs, num_warps, num_stages): one compile.

    It specialises as the JIT does at a real launch, so loads vectorise and pipeline as they will
    there and the shared memory it reports is real: every tensor 16-byte aligned (torch's
    allocations are), an int argument equal to 1 a constant, one divisible by 16 marked so (a row
    stride of 256 lets a tile's rows start aligned). Without the last two, a load whose addresses
    step by such an int compiled unpipelined here and reported less shared memory than the JIT uses.
    """
    fn = launch.kernel
    sig, aligned, constexprs = {}, [], dict(launch.constexprs)
    for i, name in enumerate(fn.arg_names):
        a = launch.args.get(name)
        if name in launch.constexprs or (name in launch.args and a is None):
            sig[name] = "constexpr"  # a None pointer (an absent weight) is a constexpr to triton too
            constexprs.setdefault(name, None)
            continue
        if type(a) is int and a == 1:  # the JIT's specialisation of 1
            sig[name] = "constexpr"
            constexprs[name] = 1
            continue
        sig[name] = _PTR[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
        if isinstance(a, torch.Tensor) or (type(a) is int and a % 16 == 0):
            aligned.append(i)
    return (fn.fn.__module__, fn.__name__, tuple(sig.items()), tuple(sorted(constexprs.items(), key=lambda kv: kv[0])),
            tuple(aligned), launch.num_warps, launch.num_stages)


def compile_spec(s, tgt_name: str):
    """triton.compile of one spec() for a target named as on the command line: the compiled kernel
    (its `asm` holds each stage's code, e.g. "ttgir")."""
    import triton

    module, name, sig, constexprs, aligned, warps, stages = s
    fn = getattr(importlib.import_module(module), name)
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=dict(sig), constexprs=dict(constexprs), attrs=attrs)
    options = {"num_warps": warps, **({} if stages is None else {"num_stages": stages})}
    return triton.compile(src, target=target(tgt_name), options=options)


def compile_one(job):
    s, tgt_name = job
    tgt = target(tgt_name)
    start = time.time()
    try:
        out = compile_spec(s, tgt_name)
        shared = int(getattr(out.metadata, "shared", 0))
        err = None if shared <= SMEM_LIMIT[tgt.backend] else \
            f"needs {shared} bytes of shared memory, over the {SMEM_LIMIT[tgt.backend]} of {tgt_name}"
    except Exception as e:  # report and go on: every failure is listed
        shared, err = 0, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return s, tgt_name, shared, err, time.time() - start


def describe(s) -> str:
    _, name, _, constexprs, _, warps, stages = s
    keep = ("H", "D", "DX", "DZ", "DY", "DK", "DV", "BZ", "BY", "BV", "C", "REVERSE", "VARLEN",
            "HAS_INIT", "STORE_FINAL", "HAS_STATE", "STORE_STATE", "BLOCK_D", "GROUP", "HAS_W", "HAS_B")
    c = " ".join(f"{k}={v}" for k, v in constexprs if k in keep)
    return f"{name} {c} warps={warps} stages={stages}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+", help="sm_90, gfx90a, ...")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    for t in args.targets:
        target(t)
    jobs = []
    for t in args.targets:  # the tiles differ by vendor (shared memory), so do the launches
        specs = dict.fromkeys(spec(launch) for launch in launches(rocm=target(t).backend == "hip"))
        jobs += [(s, t) for s in specs]
    print(f"compiling {len(jobs)} kernel specialisations for {', '.join(args.targets)}", flush=True)
    failed = 0
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for s, t, shared, err, secs in pool.map(compile_one, jobs):
            failed += err is not None
            status = "FAILED" if err else "ok"
            print(f"{status} {t} {describe(s)} shared={shared} ({secs:.1f} s)" + (f": {err}" if err else ""),
                  flush=True)
    print(f"{len(jobs) - failed} of {len(jobs)} compiled" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
