"""From config to a DeepSpeed engine: model, optimizer, precision, DeepSpeed JSON."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from retnet_train.config import checkpointing_mode
from retnet_train.parallel import get_state, mpu
from retnet_train.parallel.tensor_parallel import apply_tensor_parallel

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

    from retnet_train.model import build_model

    precision = resolve_precision(cfg.trainer.precision, device)
    if precision == "bf16" and device.type == "cpu":
        log.warning("trainer.precision=bf16 on CPU: DeepSpeed's CPU bf16 path is slow and untested here")
    mcfg = model_config(cfg)
    # Initialise on the training device: a GPU draws 13B random weights in seconds, where a host takes
    # minutes and 52 GB of fp32 per rank. Every rank of a tensor-parallel group still draws the same
    # full weights (the same seed on the same kind of device). The full fp32 model must fit one device
    # before ZeRO-3 partitions or tensor parallelism slices it.
    with torch.device(device):
        model = build_model(mcfg)
    if is_export_dir(cfg.checkpoint.init_from):
        load_export_weights(model, cfg.checkpoint.init_from)
    model.set_activation_checkpointing(checkpointing_mode(cfg.trainer.activation_checkpointing))
    ps = get_state()
    if ps.tp_size > 1:
        # every rank built the same full model from the same seed; each keeps its slice
        apply_tensor_parallel(model, ps.tp_rank, ps.tp_size, seed=cfg.trainer.seed)
    own_clipping = cfg.deepspeed.stage == 0 and precision != "bf16" and cfg.optim.impl != "deepspeed"
    ds_config = build_ds_config(cfg, layout, precision, own_clipping)
    offload = bool(cfg.deepspeed.offload_optimizer)
    optimizer = build_optimizer(model, cfg.optim, device, offload)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        model_parameters=param_groups(model, cfg.optim.weight_decay) if optimizer is None else None,
        config=ds_config, dist_init_required=False, mpu=mpu())
    if cfg.trainer.compile:
        model.compile_blocks()  # regional: one graph for every block, compiled in seconds
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.1fM parameters (zero-%d shards may report fewer), precision %s, ZeRO-%d, kernels %s "
             "(model.kernels=%s), activation checkpointing %s, fused loss %s",
             mcfg.arch, n_params / 1e6, cfg.deepspeed.stage, precision, cfg.deepspeed.stage, model.kernels,
             mcfg.kernels, model.activation_checkpointing, cfg.trainer.fused_loss)
    return Built(engine=engine, model_cfg=mcfg, precision=precision, own_clipping=own_clipping, ds_config=ds_config,
                 vocab_parallel=ps.tp_size > 1)


def is_export_dir(path) -> bool:
    from retnet_train.model import EXPORT_CONFIG

    return bool(path) and (Path(str(path)) / EXPORT_CONFIG).is_file()


def load_export_weights(model, export_dir) -> None:
    """Start from exported (full, unsharded) weights, e.g. a run at another parallel.tp. The run's own
    model config must describe the same network."""
    from safetensors.torch import load_file

    from retnet_train.model import EXPORT_WEIGHTS, resolve_config

    # the kernel choice is how this machine runs the weights, not part of what they are
    theirs = dataclasses.replace(resolve_config(str(export_dir)), kernels=model.config.kernels)
    if theirs != model.config:
        diff = {k: (getattr(theirs, k), getattr(model.config, k)) for k in vars(theirs)
                if getattr(theirs, k) != getattr(model.config, k)}
        raise ValueError(f"checkpoint.init_from={export_dir}: its model config differs from this run's "
                         f"(key: (export, run)): {diff}")
    weights = load_file(str(Path(str(export_dir)) / EXPORT_WEIGHTS))
    if model.config.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["embed.weight"])
    model.load_state_dict(weights)
    log.info("initialised weights from the export %s", export_dir)
