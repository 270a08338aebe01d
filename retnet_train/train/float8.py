"""trainer.float8: the blocks' linear layers compute their matmuls in float8 (torchao's Float8Linear).

Each matmul of a converted linear (forward, and both backward ones) casts its two operands to fp8
with a dynamic scale (one per tensor, or per row with `rowwise`), multiplies on the fp8 tensor
cores and returns the autocast dtype; the weights, their gradients and the optimizer stay as they
were (fp32 or bf16 masters). The cast and its amax need torch.compile to fuse into the neighbouring
kernels (trainer.compile); eager, they cost more than the fp8 matmul saves.

What is converted: every nn.Linear inside the blocks whose two sizes are multiples of 16 (the
fp8 GEMM's alignment). Not the LM head (the fused loss reads its weight directly, and the logits are
where low precision hurts most), not the embedding. A converted layer keeps its parameter names, so
checkpoints and exports are the same with or without float8 and a run may switch either way.

The model's hand-written memory savers (one shared bf16 copy of the norm output for q, k, v and g;
the FFN's activation recomputed before fc2; the gated head norm recomputed before out_proj) work
on a plain nn.Linear and step aside for a converted one. Eager, torchao's linear then saves its
high-precision input and weight, so an eager float8 block keeps more than a bf16 one; compiled, the
partitioner keeps the fp8 casts instead (retnet_1.3b at 2 x 8192 on an H100: 37.3 against 43.4 GiB).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from retnet_train.config import Float8Recipe

log = logging.getLogger(__name__)

RECIPES = tuple(r for r in Float8Recipe.values() if r != "none")  # torchao's recipe names, as the key's words
ALIGN = 16  # torch._scaled_mm wants both sizes of the weight a multiple of 16


def float8_problem(device: torch.device) -> str | None:
    """Why this device cannot run fp8 matmuls (None: it can). CPU runs torchao's emulation (tests)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"device {device} has no fp8 matmul"
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        arch = getattr(props, "gcnArchName", "")
        if arch.startswith(("gfx94", "gfx95")):  # MI300 and later: fp8 (e4m3fnuz) matrix cores
            return None
        return f"{props.name} ({arch or 'unknown arch'}) has no fp8 matrix cores (ROCm needs MI300, gfx94x, or later)"
    if (props.major, props.minor) < (8, 9):
        return (f"{props.name} (compute capability {props.major}.{props.minor}) has no fp8 tensor cores "
                f"(needs 8.9 or later: Ada, Hopper, Blackwell)")
    return None


def convertible(module: nn.Module, name: str) -> bool:
    """A plain linear layer inside a block, with fp8-aligned sizes."""
    return (type(module) is nn.Linear and name.split(".")[0] == "layers"
            and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0)


# trainer.float8_fast_accum -> which of torchao's three GEMM configs accumulate fast: the forward's
# (output), the input gradient's and the weight gradient's
FAST_ACCUM = {"output": ("output",), "output_grad_input": ("output", "grad_input"),
              "all": ("output", "grad_input", "grad_weight")}


def convert_to_float8(model: nn.Module, recipe: str, device: torch.device, fast_accum: str = "output") -> list[str]:
    """Swap the convertible linears of `model` for torchao's Float8Linear in place (the same
    Parameter objects: build the optimizer before or after, either works); returns their names.
    On CPU the fp8 casts are emulated (torchao's `emulate`: fp8 rounding, fp32 matmuls).

    `fast_accum` (a key of FAST_ACCUM): which matmuls accumulate in Hopper's fast fp8 mode, which
    keeps fewer bits between promotions to fp32 (error grows with the contraction length): torchao
    uses it for the forward only; its input gradient contracts over the same lengths (the layer's
    out_features, 2048-4096 here), its weight gradient over every token of the micro-batch."""
    if fast_accum not in FAST_ACCUM:
        raise ValueError(f"trainer.float8_fast_accum={fast_accum!r}: one of {', '.join(FAST_ACCUM)}")
    if recipe not in RECIPES:
        raise ValueError(f"trainer.float8={recipe!r}: one of none, {', '.join(RECIPES)}")
    problem = float8_problem(device)
    if problem:
        raise RuntimeError(f"trainer.float8={recipe}: {problem}; set trainer.float8=none")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.config import Float8GemmConfig
    except ImportError as e:
        raise RuntimeError(f"trainer.float8={recipe} needs torchao (pip install torchao, or the project's "
                           f"`gpu` extra): {e}") from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    fast = FAST_ACCUM[fast_accum]
    config = dataclasses.replace(config, **{f"gemm_config_{gemm}": Float8GemmConfig(use_fast_accum=gemm in fast)
                                            for gemm in FAST_ACCUM["all"]})
    if device.type == "cpu":
        config = dataclasses.replace(config, emulate=True)
    names = [name for name, m in model.named_modules() if convertible(m, name)]
    if not names:
        raise ValueError(f"trainer.float8={recipe}: no linear layer of the blocks has sizes that are multiples "
                         f"of {ALIGN}; nothing would run in fp8")
    chosen = set(names)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in chosen)
    log.info("trainer.float8=%s: %d linear layers compute in fp8%s, fast accumulation in the %s matmuls", recipe,
             len(names), " (emulated on CPU)" if device.type == "cpu" else "", ", ".join(fast))
    return names
