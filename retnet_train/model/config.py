"""ModelConfig: the one schema for every network this package builds (RetNet and the Transformer baseline).

Presets live in conf/model/<name>.yaml with exactly these keys; Hydra's `model` group uses this
dataclass as its schema, so a typo in a YAML key fails at start-up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ARCHS = ("retnet", "transformer")
FFN_TYPES = ("gelu", "glu")
ACTIVATIONS = ("swish", "gelu")
NORMS = ("layernorm", "rmsnorm")
HEAD_NORMS = ("groupnorm", "rmsnorm")
DECAY_SCHEDULES = ("paper", "linspace", "uniform")
SCORE_NORMS = ("none", "torchscale")
MODES = ("parallel", "chunkwise", "recurrent")
KERNELS = ("auto", "torch", "fla", "triton")  # see kernels/__init__.py


class ModelConfigError(ValueError):
    """A model config value that cannot build a model; the message names the key."""


@dataclass
class ModelConfig:
    arch: str = "retnet"  # "retnet" | "transformer"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 4  # key head dim = d_model / n_heads (the paper's 256 at every size)
    value_dim: Optional[int] = None  # total value width; None: 2 * d_model (RetNet), d_model (Transformer)
    ffn_dim: Optional[int] = None  # None: 2 * d_model (RetNet), 4 * d_model (Transformer)
    ffn_type: str = "gelu"  # "gelu": two-layer GELU FFN; "glu": gated linear unit
    glu_activation: str = "swish"  # activation of the GLU branch: "swish" | "gelu"
    norm: str = "layernorm"  # pre-norm of each block and final norm: "layernorm" | "rmsnorm"
    norm_eps: float = 1e-6
    head_norm: str = "groupnorm"  # per-head normalisation of the retention output: "groupnorm" | "rmsnorm"
    head_norm_eps: float = 1e-6
    head_norm_affine: bool = True
    gate_activation: str = "swish"  # of the output gate g
    decay_schedule: str = "paper"  # "paper": 1 - 2^(-5-h); "linspace": 1 - exp(linspace(ln 1/32, ln 1/512)); "uniform"
    score_norm: str = "none"  # "torchscale": the official code's decay-mask and score normalisations
    rope_base: float = 10000.0
    # with doc_starts, rotary positions count from each document's first token (False: from the window's)
    rope_reset_at_documents: bool = True
    bias: bool = False  # biases in every projection
    tie_embeddings: bool = False
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model)
    dropout: float = 0.0
    chunk_size: int = 64  # default chunk length of the chunkwise form
    # which fast paths run (retention, fused head norm + gate, linear cross-entropy), resolved once at
    # build into model.kernels: "auto" (CPU: torch; NVIDIA: fla, else our Triton kernels, else torch;
    # ROCm: our Triton kernels, else torch) | "torch" (plain PyTorch everywhere) | "fla" | "triton"
    kernels: str = "auto"
    init: str = "official"  # "official": torchscale's initialisation
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. where a preset came from)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_width(self) -> int:
        if self.value_dim is not None:
            return self.value_dim
        return 2 * self.d_model if self.arch == "retnet" else self.d_model

    @property
    def value_head_dim(self) -> int:
        return self.value_width // self.n_heads

    @property
    def ffn_width(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 2 * self.d_model if self.arch == "retnet" else 4 * self.d_model


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ModelConfigError(f"model.{key}={value!r} is not one of {list(choices)}")


def validate(cfg: ModelConfig) -> ModelConfig:
    """Raise ModelConfigError naming the key for any value that cannot build a model."""
    _check_choice("arch", cfg.arch, ARCHS)
    _check_choice("ffn_type", cfg.ffn_type, FFN_TYPES)
    _check_choice("glu_activation", cfg.glu_activation, ACTIVATIONS)
    _check_choice("gate_activation", cfg.gate_activation, ACTIVATIONS)
    _check_choice("norm", cfg.norm, NORMS)
    _check_choice("head_norm", cfg.head_norm, HEAD_NORMS)
    _check_choice("decay_schedule", cfg.decay_schedule, DECAY_SCHEDULES)
    _check_choice("score_norm", cfg.score_norm, SCORE_NORMS)
    _check_choice("init", cfg.init, ("official",))
    _check_choice("kernels", cfg.kernels, KERNELS)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"model.{key}={value!r} must be a positive integer")
    for key in ("value_dim", "ffn_dim"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ModelConfigError(f"model.{key}={value!r} must be a positive integer or null")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ModelConfigError(f"model.dropout={cfg.dropout!r} must be in [0, 1)")
    if cfg.d_model % cfg.n_heads:
        raise ModelConfigError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}"
        )
    if cfg.key_head_dim % 2:
        raise ModelConfigError(
            f"model.d_model / model.n_heads = {cfg.key_head_dim}: the key head dim must be even "
            "(rotary position rotates pairs of channels)"
        )
    if cfg.value_width % cfg.n_heads:
        raise ModelConfigError(
            f"model.value_dim={cfg.value_width} is not divisible by model.n_heads={cfg.n_heads}"
        )
    if cfg.arch == "transformer" and cfg.value_width != cfg.d_model:
        raise ModelConfigError(
            f"model.value_dim={cfg.value_width}: the Transformer baseline needs value_dim == d_model"
        )
    return cfg


# ---- presets -----------------------------------------------------------------------------------

def conf_dir() -> Path:
    """The repository's conf/ folder (RETNET_TRAIN_CONF overrides it for installed copies)."""
    env = os.environ.get("RETNET_TRAIN_CONF")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def preset_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def config_from_dict(values: dict, source: str = "model config") -> ModelConfig:
    """Build a ModelConfig from a plain dict; an unknown key is an error naming it."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelConfigError(f"{source}: unknown key(s) model.{', model.'.join(unknown)}; known: {sorted(known)}")
    return validate(ModelConfig(**values))


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of conf/model/<name>.yaml, with keyword overrides."""
    import yaml  # PyYAML comes with omegaconf/hydra

    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ModelConfigError(f"model={name!r}: unknown preset; available: {preset_names()}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    values = {k: v for k, v in values.items() if not k.startswith("_")}  # hydra's _target_ and friends
    values.update(overrides)
    return config_from_dict(values, source=str(path))
