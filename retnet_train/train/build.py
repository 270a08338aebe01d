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


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def model_config(cfg):
    from retnet_train.model import resolve_config

    return resolve_config(OmegaConf.to_container(cfg.model, resolve=True))


def forward_kwargs(cfg, model_cfg) -> dict:
    """How the model is called in training and eval: the retention form (RetNet only)."""
    if model_cfg.arch != "retnet" or cfg.trainer.mode == "parallel":
        return {}
    return {"mode": "chunkwise", "chunk_size": cfg.trainer.chunk_size or model_cfg.chunk_size}


def build_engine(cfg, layout: dict, device: torch.device) -> Built:
    import deepspeed

    precision = resolve_precision(cfg.trainer.precision, device)
    if precision == "bf16" and device.type == "cpu":
        log.warning("trainer.precision=bf16 on CPU: DeepSpeed's CPU bf16 path is slow and untested here")
    mcfg = model_config(cfg)
    ps = get_state()
    own_clipping = cfg.deepspeed.stage == 0 and precision != "bf16" and cfg.optim.impl != "deepspeed"
    ds_config = build_ds_config(cfg, layout, precision, own_clipping)
    model = build_model_shard(cfg, mcfg, ds_config, device)
    model.set_activation_checkpointing(checkpointing_mode(cfg.trainer.activation_checkpointing))
    offload = bool(cfg.deepspeed.offload_optimizer)
    optimizer = build_optimizer(model, cfg.optim, device, offload)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        model_parameters=param_groups(model, cfg.optim.weight_decay) if optimizer is None else None,
        config=ds_config, dist_init_required=False, mpu=mpu())
    if cfg.trainer.compile:
        model.compile_blocks()  # regional: one graph for every block, compiled in seconds
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info("model %s: %.1fM parameters in this rank's tensor-parallel slice, precision %s, ZeRO-%d, kernels %s "
             "(model.kernels=%s), activation checkpointing %s, fused loss %s",
             mcfg.arch, n_params / 1e6, precision, cfg.deepspeed.stage, model.kernels,
             mcfg.kernels, model.activation_checkpointing, cfg.trainer.fused_loss)
    return Built(engine=engine, model_cfg=mcfg, precision=precision, own_clipping=own_clipping, ds_config=ds_config,
                 vocab_parallel=ps.tp_size > 1)


def is_export_dir(path) -> bool:
    from retnet_train.model import EXPORT_CONFIG

    return bool(path) and (Path(str(path)) / EXPORT_CONFIG).is_file()


def build_model_shard(cfg, mcfg, ds_config: dict, device: torch.device):
    """This rank's shard of the model, never the whole (parallel/sharded_init.py): built on the meta
    device, each parameter materialised as its tensor-parallel slice, with ZeRO-3 straight into this
    rank's partition; the values from trainer.seed, or from the export checkpoint.init_from names."""
    from retnet_train.model import EXPORT_WEIGHTS
    from retnet_train.parallel.sharded_init import ExportValues, InitValues, build_sharded_model
    from retnet_train.parallel.zero3_init import Zero3Partitioner

    ps = get_state()
    if is_export_dir(cfg.checkpoint.init_from):
        check_export_config(mcfg, cfg.checkpoint.init_from)
        values = ExportValues(Path(str(cfg.checkpoint.init_from)) / EXPORT_WEIGHTS)
    else:
        values = InitValues(cfg.trainer.seed)
    partition = Zero3Partitioner(ds_config, mpu()) if cfg.deepspeed.stage == 3 else None
    start = time.perf_counter()
    model = build_sharded_model(mcfg, values, device, ps.tp_rank, ps.tp_size, partition=partition,
                                dropout_seed=cfg.trainer.seed)
    log.info("built this rank's shard of the model in %.1f s (tensor-parallel rank %d of %d%s)%s",
             time.perf_counter() - start, ps.tp_rank, ps.tp_size, ", ZeRO-3 partitions" if partition else "",
             f", weights from {cfg.checkpoint.init_from}" if isinstance(values, ExportValues) else "")
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
