"""Helpers of bench/decode.py: build a model, run one decoding setting through the inference engine
(peak memory, ms per decode step, out-of-memory as a result), the largest batch that fits, the
bytes a decoding step must move (charts: bench/charts.py)."""

from __future__ import annotations

import gc
import inspect
import time
from typing import Optional

import torch
from torch import Tensor

from bench.charts import chart  # noqa: F401  (re-exported: callers use decode_lib.chart)
from retnet_train.inference import Generator
from retnet_train.model import build_model
from retnet_train.model.retention_state import WindowedState

GIB = 2 ** 30
OOM = "OOM"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# HBM bandwidth in GB/s by device name (first match); --bandwidth-gbs overrides
BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


def free_memory(device: torch.device) -> None:
    """Release what a finished setting held: the Generator and its CUDA graphs form a reference
    cycle (the graphs hold the generator's bound step), so collect before emptying the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    # an allocation failing inside a CUDA graph capture can surface as a RuntimeError naming it
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def build(name: str, device: torch.device, dtype: torch.dtype, kernels: Optional[str] = None):
    """The preset with its random initial weights, in `dtype` on `device`; returns (model, weight GiB
    as the allocator counts them, or None off CUDA)."""
    torch.manual_seed(0)
    overrides = {"kernels": kernels} if kernels else {}
    with device:
        model = build_model(name, **overrides)
    model = model.to(dtype).eval()
    free_memory(device)
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    return model, weights


def state_bytes(gen: Generator) -> int:
    """Bytes of the engine's decoding state: RetNet's fp32 state, or the Transformer's KV cache."""
    total = 0
    for layer in gen.state.layers:
        if isinstance(layer, Tensor):
            parts = (layer,)
        elif isinstance(layer, WindowedState):
            parts = (layer.base, layer.keys, layer.values)
        else:
            parts = (layer.k, layer.v)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads: all of them, except an untied embedding table, of
    which a step reads only one row per sequence."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (name.startswith("embed.") and not model.config.tie_embeddings):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def run_setting(model, batch: int, context: int, prompt_len: int, warmup: int, steps: int,
                new_tokens: int = 0, compile: bool | str = False, seed: int = 0,
                state_window: int | None = None) -> dict | str:
    """One generate call of `batch` random prompts of `prompt_len` tokens, max(new_tokens, 1 + warmup
    + steps) new tokens, in a fresh Generator (max_batch=batch, max_len=context). peak_gib covers
    the whole call (weights, state, prefill, graphs); ms times `steps` decoding steps after `warmup`
    untimed ones, through the engine's on_token hook, so the prefill is not in it (the CUDA graph
    is captured before the prefill, in the same call). state_window: RetNet's Generator(state_window=)
    (None: the engine's default).
    Returns OOM where the device ran out of memory."""
    device = next(model.parameters()).device
    new_tokens = max(new_tokens, 1 + warmup + steps)  # token 0 comes from the prefill
    if prompt_len + new_tokens > context:
        raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the context {context}")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    marks: list[float] = []
    calls = 0

    def on_token(_ids: Tensor) -> None:  # called after each step is launched: step k-1 at call k
        nonlocal calls
        calls += 1
        if steps and calls in (warmup + 1, warmup + 1 + steps):
            sync(device)
            marks.append(time.perf_counter())

    kw = {"compile": compile} if compile else {}
    if state_window is not None and model.config.arch == "retnet":
        kw["state_window"] = state_window
    if compile and "compile" not in inspect.signature(Generator).parameters:
        raise SystemExit("--compile: this Generator has no compile option")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = None
    try:
        gen = Generator(model, max_batch=batch, max_len=context, **kw)
        gen.generate(prompts, max_new_tokens=new_tokens, on_token=on_token)
        sync(device)
        out = {"batch": batch, "state_bytes": state_bytes(gen),
               "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
        if steps:
            out["ms"] = (marks[1] - marks[0]) * 1e3 / steps
            out["tokens_per_s"] = batch * 1e3 / out["ms"]
        return out
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        return OOM
    finally:
        del gen
        free_memory(device)


def largest_batch(model, start: int, context: int, prompt_len: int, warmup: int, steps: int,
                  compile: bool | str = False, refine: int = 0,
                  state_window: int | None = None) -> tuple[dict | str, list[int]]:
    """The largest batch that runs without running out of memory: start, start/2, ..., 1 until one
    fits, then (refine > 0) bisection between it and the smallest failed batch until they are within
    max(1, fit // refine) of each other (8 and 16 -> 12, 14, 15). Returns (its result or OOM, the
    batches that did not fit)."""
    failed, b = [], start
    while b >= 1:
        res = run_setting(model, b, context, prompt_len, warmup, steps, compile=compile, state_window=state_window)
        if res != OOM:
            break
        failed.append(b)
        b //= 2
    else:
        return OOM, failed
    lo, hi = b, (failed[-1] if failed else None)
    while refine > 0 and hi is not None and hi - lo > max(1, lo // refine):
        mid = (lo + hi) // 2
        trial = run_setting(model, mid, context, prompt_len, warmup, steps, compile=compile,
                            state_window=state_window)
        if trial == OOM:
            failed.append(mid)
            hi = mid
        else:
            res, lo = trial, mid
    return res, failed


def bandwidth_gbs(flag: Optional[float], device: torch.device) -> tuple[float, str]:
    """The HBM bandwidth for the floor, and where the number came from."""
    if flag:
        return flag, "--bandwidth-gbs"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, gbs in BANDWIDTH_GBS:
        if key in name:
            return gbs, f"the {key} figure for {name}"
    return 3350.0, f"the H100 SXM figure (unknown device {name}; set --bandwidth-gbs)"
