"""ModelConfig: the one schema for every network this package builds (RetNet and the Transformer baseline).

Presets live in conf/model/<name>.yaml with exactly these keys; Hydra's `model` group uses this
dataclass as its schema, so a typo in a YAML key fails at start-up.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# ---- documented fields and checked choices ----------------------------------------------------------
# The same few lines as retnet_train/schema.py (read its docstring): an export's Hugging Face folder
# bundles this package alone (retnet_train/hf/bundle.py), so the model cannot import them from there.

try:
    from enum import StrEnum
except ImportError:  # Python 3.10
    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class Choice(StrEnum):
    """One of a fixed set of words, named as its value (OmegaConf looks strings up by name); equal
    to, hashed and formatted as its string, with the string's repr."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def doc(default: Any, text: str) -> Any:
    """A dataclass field with its documentation (docs/config.md is generated from it)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


class Arch(Choice):
    retnet = "retnet"
    transformer = "transformer"


class FfnType(Choice):
    gelu = "gelu"
    glu = "glu"


class Activation(Choice):
    swish = "swish"
    gelu = "gelu"


class Norm(Choice):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class HeadNormKind(Choice):
    groupnorm = "groupnorm"
    rmsnorm = "rmsnorm"


class DecaySchedule(Choice):
    paper = "paper"
    linspace = "linspace"
    uniform = "uniform"


class ScoreNorm(Choice):
    none = "none"
    torchscale = "torchscale"


class Kernels(Choice):
    auto = "auto"
    torch = "torch"
    fla = "fla"
    triton = "triton"


class RetentionKeep(Choice):
    none = "none"
    states = "states"
    scores = "scores"
    both = "both"


class Init(Choice):
    official = "official"


KERNELS = Kernels.values()  # see kernels/__init__.py
MODES = ("parallel", "chunkwise", "recurrent")  # the retention forms a forward pass can take


class ModelConfigError(ValueError):
    """A model config value that cannot build a model; the message names the key."""


@dataclass
class ModelConfig:
    """The network: RetNet or the Transformer baseline (same embedding, blocks of pre-norm + mixing +
    FFN, final norm, LM head). Presets: conf/model/<name>.yaml; from Python,
    `build_model("retnet_tiny", kernels="torch")` takes the same keys as keywords. Choice keys take
    their words as plain strings too."""

    arch: Arch = doc(Arch.retnet, "`retnet`: multi-scale retention; `transformer`: the causal-attention baseline")
    vocab_size: int = doc(32000, "embedding and LM-head rows; a run on shards sets it to its tokenizer's "
                          "vocabulary, padded to a multiple of 128")
    d_model: int = doc(512, "the model width")
    n_layers: int = doc(6, "blocks")
    n_heads: int = doc(4, "heads; the key head dim d_model / n_heads (the paper's 256 at every size) must be "
                        "even")
    value_dim: Optional[int] = doc(None, "total value width of the heads; null: 2 x d_model (RetNet), d_model "
                                   "(Transformer, which needs value_dim = d_model)")
    ffn_dim: Optional[int] = doc(None, "FFN hidden width; null: 2 x d_model (RetNet), 4 x d_model (Transformer)")
    ffn_type: FfnType = doc(FfnType.gelu, "`gelu`: two-layer GELU FFN; `glu`: gated linear unit")
    glu_activation: Activation = doc(Activation.swish, "activation of the GLU's gate branch (ffn_type=glu)")
    norm: Norm = doc(Norm.layernorm, "the pre-norm of each block and the final norm")
    norm_eps: float = doc(1e-6, "epsilon of those norms")
    head_norm: HeadNormKind = doc(HeadNormKind.groupnorm, "per-head normalisation of the retention output: "
                                  "`groupnorm` (the paper's, one group per head) | `rmsnorm` (the official "
                                  "code's, no mean)")
    head_norm_eps: float = doc(1e-6, "epsilon of the head norm")
    head_norm_affine: bool = doc(True, "a learned per-channel gain of the head norm (and a bias with groupnorm)")
    gate_activation: Activation = doc(Activation.swish, "activation of the retention output gate g: "
                                      "act(g) * head_norm(o)")
    decay_schedule: DecaySchedule = doc(DecaySchedule.paper, "the decay gamma_h of head h: `paper`: 1 - 2^(-5-h); "
                                        "`linspace`: 1 - gamma spread log-uniformly over [1/512, 1/32] for any "
                                        "head count; `uniform`: 1 - 2^-5 for every head (the paper's ablation "
                                        "without multi-scale decay)")
    score_norm: ScoreNorm = doc(ScoreNorm.none, "`torchscale`: the official code's decay-mask and score "
                                "normalisations; `none`: the paper's formula")
    rope_base: float = doc(10000.0, "base of the rotary position angles")
    rope_reset_at_documents: bool = doc(True, "with doc_starts, rotary positions count from each document's first "
                                        "token (false: from the window's)")
    bias: bool = doc(False, "biases in every projection")
    tie_embeddings: bool = doc(False, "the LM head shares the embedding's weight")
    embed_scale: bool = doc(False, "multiply token embeddings by sqrt(d_model)")
    dropout: float = doc(0.0, "dropout probability of the embeddings, of each block's two residual branches and "
                         "of the FFN hidden units; in [0, 1)")
    chunk_size: int = doc(64, "default chunk length of the chunkwise form (trainer.chunk_size overrides it in "
                          "training)")
    kernels: Kernels = doc(Kernels.auto, "which fast paths run (retention, fused head norm + gate, linear "
                           "cross-entropy), resolved once at build into model.kernels: `auto` (CPU: torch; "
                           "NVIDIA: our Triton kernels, else fla, else torch; ROCm: our Triton kernels, else "
                           "torch) | `torch` (plain PyTorch everywhere) | `fla` | `triton`; an impossible choice "
                           "is an error, never a silent fallback")
    retention_keep: RetentionKeep = doc(RetentionKeep.none, "what our Triton retention kernels (model.kernels "
                                        "resolved to `triton`) keep from the forward for the backward instead of "
                                        "recomputing it: `none` | `states` (the state entering each 256-token "
                                        "segment: 2 d_k d_v / 256 bytes per token and head, one GEMM pass less) | "
                                        "`scores` (the in-segment scores: 512 bytes per token and head, one pass "
                                        "less) | `both`; memory for speed, as activation checkpointing the other way")
    init: Init = doc(Init.official, "the initialisation: `official`, torchscale's")
    extra: dict[str, Any] = doc({}, "free-form notes, not read by the code (e.g. where a preset came from)")

    def __post_init__(self) -> None:
        # Python callers and JSON (an export's model_config.json) give plain strings: make each the
        # key's Choice, so a wrong word fails here, naming the key, whoever built the config
        for name, choice in _choice_fields().items():
            value = getattr(self, name)
            if not isinstance(value, choice):
                try:
                    value = choice(value)
                except ValueError:
                    raise ModelConfigError(f"model.{name}={value!r} is not one of {list(choice.values())}") from None
                setattr(self, name, value)

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


@functools.lru_cache(maxsize=None)
def _choice_fields() -> dict[str, type]:
    """ModelConfig's Choice keys and their Enums."""
    hints = typing.get_type_hints(ModelConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Choice)}


def validate(cfg: ModelConfig) -> ModelConfig:
    """Raise ModelConfigError naming the key for any value that cannot build a model. (The Choice
    keys were checked when the ModelConfig was made.)"""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"model.{key}={value!r} must be a positive integer")
    for key in ("value_dim", "ffn_dim"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ModelConfigError(f"model.{key}={value!r} must be a positive integer or null")
    # nan fails every comparison, so it is refused by name; an eps of 0 is allowed (float64 tests)
    for key, allow_zero in (("norm_eps", True), ("head_norm_eps", True), ("rope_base", False)):
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or allow_zero and value == 0)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ModelConfigError(f"model.{key}={value!r} must be a finite number {bound}")
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
