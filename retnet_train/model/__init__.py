"""The networks: RetNet (three retention forms) and the Transformer baseline. Plain nn.Modules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig, ModelConfigError, config_from_dict, load_preset, preset_names, validate
from .lm import LanguageModel, State
from .retnet import MultiScaleRetention, RetNet
from .torchscale_compat import config_from_torchscale, load_torchscale_state_dict
from .transformer import Transformer

EXPORT_CONFIG = "model_config.json"
EXPORT_WEIGHTS = "model.safetensors"

__all__ = [
    "ModelConfig", "ModelConfigError", "LanguageModel", "State", "RetNet", "Transformer", "MultiScaleRetention",
    "build_model", "load_preset", "preset_names", "config_from_torchscale", "load_torchscale_state_dict",
    "resolve_config", "EXPORT_CONFIG", "EXPORT_WEIGHTS",
]


def resolve_config(spec: Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name, an export folder, a ModelConfig, or a dict/DictConfig."""
    if isinstance(spec, ModelConfig):
        cfg = dataclasses.replace(spec, **overrides)
    elif isinstance(spec, (str, Path)) and (Path(spec) / EXPORT_CONFIG).is_file():
        values = json.loads((Path(spec) / EXPORT_CONFIG).read_text())
        # the kernels a training run chose belong to its machine, not to the weights: the machine
        # that loads them picks its own (auto, unless overridden)
        values.pop("kernels", None)
        cfg = config_from_dict({**values, **overrides}, source=str(Path(spec) / EXPORT_CONFIG))
    elif isinstance(spec, str):
        cfg = load_preset(spec, **overrides)
    elif type(spec).__name__ == "DictConfig":
        from omegaconf import OmegaConf

        values = {k: v for k, v in OmegaConf.to_container(spec, resolve=True).items() if not str(k).startswith("_")}
        cfg = config_from_dict({**values, **overrides})
    elif isinstance(spec, Mapping):
        values = {k: v for k, v in spec.items() if not str(k).startswith("_")}
        cfg = config_from_dict({**values, **overrides})
    else:
        raise ModelConfigError(f"cannot build a model from {type(spec).__name__}: {spec!r}")
    return validate(cfg)


def build_model(spec: Any = "retnet_tiny", **overrides: Any) -> LanguageModel:
    """Build a model; on an export folder, also load its weights. Works under torch.device('meta').

    model.kernels is resolved here, once, for the device the model is built on (the default device:
    build under `with torch.device("cuda"):` to get GPU kernels); the result is `model.kernels`."""
    cfg = resolve_config(spec, **overrides)
    if not (isinstance(spec, (str, Path)) and (Path(spec) / EXPORT_WEIGHTS).is_file()):
        return RetNet(cfg) if cfg.arch == "retnet" else Transformer(cfg)
    from safetensors.torch import load_file

    from .kernels import resolve_kernels

    # an export's weights replace the initial ones: storage only, no values drawn (13B on a host
    # would spend minutes drawing what load_state_dict then overwrites)
    device = torch.get_default_device()
    with torch.device("meta"):
        model = RetNet(cfg) if cfg.arch == "retnet" else Transformer(cfg)
    model.to_empty(device=device)
    model.kernels = resolve_kernels(cfg.kernels, device)  # for the device it runs on, not meta
    if cfg.tie_embeddings:  # to_empty gave the two modules two tensors: one again
        model.lm_head.weight = model.embed.weight
    weights = load_file(str(Path(spec) / EXPORT_WEIGHTS))
    if cfg.tie_embeddings:  # safetensors stores a shared tensor once
        weights.setdefault("lm_head.weight", weights["embed.weight"])
    model.load_state_dict(weights)
    return model
