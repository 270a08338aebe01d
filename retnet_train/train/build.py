"""From config to a DeepSpeed engine: model, optimizer, precision, DeepSpeed JSON."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from retnet_train.config import checkpointing_mode
from retnet_train.parallel import get_state, mpu

from .ds_config import build_ds_config
from .float8 import convert_to_float8
from .optimizer import build_optimizer, param_groups

log = logging.getLogger(__name__)


@dataclass
class Built:
    engine: object
    model_cfg: object  # ModelConfig
    precision: str
    own_clipping: bool  # ZeRO-0 fp32: DeepSpeed hands back the raw optimizer; the trainer clips and guards
    ds_config: dict
    vocab_parallel: bool = False  # tp > 1: logits hold this rank's slice of the vocabulary


def resolve_precision(precision: str, device: torch.device, zero_stage: int, optimizer_impl: str) -> str:
    """trainer.precision as the engine runs it. `auto` on CUDA: bf16 weights with fp32 masters under
    ZeRO 1-3; at ZeRO-0 with torch's AdamW, fp32 weights under bf16 autocast, because DeepSpeed runs
    ZeRO-0 bf16 weights through its unfused fp16 optimizer (a host sync per parameter every step, and a
    first AdamW step with zero gradients at start-up: weight decay once, the step count one ahead);
    55.1k against 49.0k tokens/s for retnet_1.3b at 8 x 2048 on one H100 (bench/RESULTS.md,
    2026-12-06). DeepSpeed's own Adam (optim.impl=deepspeed) keeps bf16 there: with fp32 weights it
    clips without its overflow check, so a NaN gradient would reach the weights (trainer_clips)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    # fp32 weights where the trainer would clip them, i.e. at ZeRO-0 with torch's AdamW
    return "bf16_autocast" if trainer_clips(zero_stage, "bf16_autocast", optimizer_impl) else "bf16"


def residual_dtype(choice: str, precision: str) -> torch.dtype | None:
    """trainer.residual_dtype under the resolved precision -> LanguageModel.set_residual_dtype's argument."""
    if choice == "weights":
        return None
    if precision not in ("bf16", "bf16_autocast"):
        raise ValueError(f"trainer.residual_dtype={choice} needs a bf16 precision; trainer.precision resolved to "
                         f"{precision}: set trainer.precision=bf16_autocast or bf16, or trainer.residual_dtype=weights")
    return torch.bfloat16


def trainer_clips(zero_stage: int, precision: str, optimizer_impl: str) -> bool:
    """Whether the trainer clips the gradients and guards against NaN itself: at ZeRO-0 with fp32
    weights (fp32, bf16_autocast) DeepSpeed hands back torch's raw optimizer."""
    return zero_stage == 0 and precision != "bf16" and optimizer_impl != "deepspeed"


def precision_warnings(precision: str, device: torch.device, zero_stage: int, optimizer_impl: str) -> list[str]:
    """What start-up says about a resolved precision that runs, but slowly or with a quirk."""
    out = []
    if precision == "bf16" and device.type == "cpu":
        out.append("trainer.precision=bf16 on CPU: DeepSpeed's CPU bf16 path is slow and untested here")
    # torch's AdamW under bf16 weights at ZeRO-0 (DeepSpeed's own Adam gets its fused wrapper)
    if precision == "bf16" and trainer_clips(zero_stage, "bf16_autocast", optimizer_impl):
        out.append("trainer.precision=bf16 with ZeRO-0: DeepSpeed runs it through its unfused fp16 optimizer (a "
                   "host sync per parameter each step; a first AdamW step with zero gradients at start-up decays "
                   "the weights once); trainer.precision=bf16_autocast, auto's choice at ZeRO-0, measured 1.12x "
                   "faster for retnet_1.3b on an H100")
    return out


def model_config(model):
    """The ModelConfig of the config's `model` section (a DictConfig)."""
    from retnet_train.model import resolve_config

    return resolve_config(OmegaConf.to_container(model, resolve=True))


def forward_kwargs(trainer, model_cfg) -> dict:
    """How the model is called in training and eval: the retention form (RetNet only)."""
    if model_cfg.arch != "retnet" or trainer.mode == "parallel":
        return {}
    return {"mode": "chunkwise", "chunk_size": trainer.chunk_size or model_cfg.chunk_size}


def dependent_launch_warning(device: torch.device) -> str | None:
    """Why trainer.compile_pdl changes nothing on `device` (None where it acts): inductor generates
    programmatic dependent launches for NVIDIA GPUs of compute capability 9.0+ only."""
    if device.type != "cuda":
        return f"trainer.compile_pdl on {device.type}: dependent launches need an NVIDIA GPU; launches stay plain"
    if torch.version.hip is not None:
        return "trainer.compile_pdl on ROCm: dependent launches are NVIDIA's (inductor skips them); launches stay plain"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return (f"trainer.compile_pdl on compute capability {major}.{minor}: dependent launches need 9.0+ "
                f"(Hopper); launches stay plain")
    return None


def build_engine(model, trainer, optim, ds, init_from, layout: dict, device: torch.device) -> Built:
    """model: the config's `model` section; trainer, optim, ds: the trainer, optim and deepspeed
    sections; init_from: checkpoint.init_from (an export folder's weights load here)."""
    import deepspeed

    precision = resolve_precision(trainer.precision, device, ds.stage, optim.impl)
    for warning in precision_warnings(precision, device, ds.stage, optim.impl):
        log.warning(warning)
    residual = residual_dtype(trainer.residual_dtype, precision)  # refused before anything is built
    mcfg = model_config(model)
    ps = get_state()
    own_clipping = trainer_clips(ds.stage, precision, optim.impl)
    ds_config = build_ds_config(ds, optim, trainer.micro_batch_size, layout, precision, own_clipping)
    net = build_model_shard(mcfg, ds_config, device, seed=trainer.seed, init_from=init_from,
                            zero3=ds.stage == 3)
    net.set_activation_checkpointing(checkpointing_mode(trainer.activation_checkpointing), trainer.checkpoint_layers)
    net.set_residual_dtype(residual)
    if trainer.float8 != "none":
        convert_to_float8(net, str(trainer.float8), device, str(trainer.float8_fast_accum))
        if not trainer.compile:
            log.warning("trainer.float8=%s without trainer.compile: the fp8 casts run as separate kernels and cost "
                        "more than the fp8 matmuls save", trainer.float8)
    optimizer = build_optimizer(net, optim, device, bool(ds.offload_optimizer))
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=optimizer,
        model_parameters=param_groups(net, optim.weight_decay) if optimizer is None else None,
        config=ds_config, dist_init_required=False, mpu=mpu())
    if trainer.compile:
        # regional: one graph for every block, compiled in seconds
        net.compile_blocks(memory_budget=trainer.activation_memory_budget, tuning=str(trainer.compile_tuning),
                           pdl=bool(trainer.compile_pdl))
        if trainer.compile_pdl and (warning := dependent_launch_warning(device)):
            log.warning(warning)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters())
    log.info("model %s: %.1fM parameters in this rank's tensor-parallel slice, precision %s, ZeRO-%d, kernels %s "
             "(model.kernels=%s), activation checkpointing %s%s%s, fused loss %s, float8 %s, residual stream %s",
             mcfg.arch, n_params / 1e6, precision, ds.stage, net.kernels,
             mcfg.kernels, net.activation_checkpointing,
             "" if net.checkpoint_layers is None else f" in the first {net.checkpoint_layers} blocks",
             net.compile_summary(), trainer.fused_loss, trainer.float8,
             "bf16" if net.residual_dtype == torch.bfloat16 else "as the weights")
    if ds.stage == 2 and layout["dp_size"] * layout.get("cp_size", 1) == 1:
        log.warning("deepspeed=zero2 on one data-parallel rank shards nothing, and its per-gradient copies and "
                    "checks cost time: retnet_1.3b on one H100 trained at 48.7k tokens/s at ZeRO-2 and 53.5k at "
                    "ZeRO-1 (bench/RESULTS.md, 2026-12-06); deepspeed=zero1 keeps the same precision and is faster here")
    return Built(engine=engine, model_cfg=mcfg, precision=precision, own_clipping=own_clipping, ds_config=ds_config,
                 vocab_parallel=ps.tp_size > 1)


def is_export_dir(path) -> bool:
    from retnet_train.model import EXPORT_CONFIG

    return bool(path) and (Path(str(path)) / EXPORT_CONFIG).is_file()


def build_model_shard(mcfg, ds_config: dict, device: torch.device, *, seed: int, init_from=None,
                      zero3: bool = False):
    """This rank's shard of the model, never the whole (parallel/sharded_init.py): built on the meta
    device, each parameter materialised as its tensor-parallel slice, with ZeRO-3 (zero3) straight
    into this rank's partition; the values from `seed` (trainer.seed), or from the export folder
    that `init_from` (checkpoint.init_from) names."""
    from retnet_train.model import EXPORT_WEIGHTS
    from retnet_train.parallel.sharded_init import ExportValues, InitValues, build_sharded_model
    from retnet_train.parallel.zero3_init import Zero3Partitioner

    ps = get_state()
    if is_export_dir(init_from):
        check_export_config(mcfg, init_from)
        values = ExportValues(Path(str(init_from)) / EXPORT_WEIGHTS)
    else:
        values = InitValues(seed)
    partition = Zero3Partitioner(ds_config, mpu()) if zero3 else None
    start = time.perf_counter()
    model = build_sharded_model(mcfg, values, device, ps.tp_rank, ps.tp_size, partition=partition,
                                dropout_seed=seed)
    log.info("built this rank's shard of the model in %.1f s (tensor-parallel rank %d of %d%s)%s",
             time.perf_counter() - start, ps.tp_rank, ps.tp_size, ", ZeRO-3 partitions" if partition else "",
             f", weights from {init_from}" if isinstance(values, ExportValues) else "")
    return model


def check_export_config(model_cfg, export_dir) -> None:
    """An export starts a run only if it holds the run's network (the kernel choice may differ)."""
    from retnet_train.model import resolve_config

    # the kernel choice is how this machine runs the weights, not part of what they are
    theirs = dataclasses.replace(resolve_config(str(export_dir)), kernels=model_cfg.kernels)
    if theirs != model_cfg:
        diff = {k: (getattr(theirs, k), getattr(model_cfg, k)) for k in vars(theirs)
                if getattr(theirs, k) != getattr(model_cfg, k)}
        raise ValueError(f"checkpoint.init_from={export_dir}: its model config differs from this run's "
                         f"(key: (export, run)): {diff}")
