"""Dataclass schemas of every config group, their registration with Hydra, and start-up checks.

`load_config(overrides)` composes conf/config.yaml with command-line overrides. Hydra checks each
key and type against these schemas (an unknown key or a wrong type fails naming the key);
`validate` then checks the values that no type can express (batch arithmetic, choices, ranges),
raising ConfigError with the key and its value. All of this runs before any device is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot run; the message starts with `key=value`."""


# ---- group schemas -------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW with linear warmup then decay. The paper's recipe: betas 0.9/0.98, wd 0.05, clip 2.0."""

    name: str = "adamw"
    impl: str = "auto"  # auto: torch AdamW (fused on CUDA) | torch | fused | deepspeed (DeepSpeed's own AdamW)
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.0  # LR at the end of decay = lr * min_lr_ratio
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05  # applied to matrices only (not norms, biases)
    warmup_steps: int = 375
    decay: str = "linear"  # linear | cosine | constant
    decay_steps: Optional[int] = None  # steps from 0 to the end of decay; null: trainer.max_steps
    grad_clip: float = 2.0  # max global gradient norm; 0 disables clipping


@dataclass
class DeepSpeedConfig:
    """The ZeRO part of the DeepSpeed JSON; the rest is derived from trainer/optim keys."""

    stage: int = 2  # ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer state on CPU
    offload_params: bool = False  # ZeRO-3: parameters on CPU
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: Dict[str, Any] = field(default_factory=dict)  # deep-merged into the generated DeepSpeed JSON


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: consecutive ranks form a group; must divide heads, FFN, vocab, world
    cp: int = 1  # context-parallel size: ranks that split each sequence into consecutive slices (RetNet only)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU | nccl | gloo
    timeout_minutes: int = 30


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    global_batch_tokens: int = 4_194_304  # tokens per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward pass per rank
    seq_len: int = 2048
    log_every: int = 10
    eval_every: int = 500  # 0 disables periodic eval (eval still runs at the end unless eval_at_end=false)
    eval_at_end: bool = True
    eval_batches: Optional[int] = None  # validation micro-batches per source per eval; null: data.val_batches
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | bf16 | bf16_autocast | fp32
    device: str = "auto"  # auto | cuda | cpu
    mode: str = "parallel"  # retention form for training: parallel | chunkwise
    chunk_size: Optional[int] = None  # chunkwise chunk length; null: model.chunk_size
    # what each block keeps for backward: none | full (only the block input; the block is recomputed)
    # | selective (matmul and retention outputs kept; norms, rotary, gates, activations recomputed).
    # Configs written before these values: true = full, false = none.
    activation_checkpointing: Any = "none"
    compile: bool = False  # torch.compile the model
    # true: the loss from the final hidden states and the LM head's weight in token chunks, never the
    # full [tokens, vocab] fp32 logits (same loss to fp32 rounding); false: logits, then cross-entropy
    fused_loss: bool = True
    max_bad_steps: int = 5  # stop after this many consecutive skipped (NaN/inf) steps
    data_source: str = "stream"  # stream: retnet_train.data shards | synthetic: a learnable token pattern
    build_lock_timeout_s: float = 900  # give up waiting for a C++ extension build lock after this (a killed build leaves it)
    seed: int = 1234


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0: only at the end and on signals
    keep: int = 3  # newest complete checkpoints kept; 0 keeps all
    save_at_end: bool = True
    resume: bool = True  # continue from run_dir/checkpoints/latest when it exists
    init_from: Optional[str] = None  # start a *new* run from these weights: a checkpoint (same parallel.tp) or an export folder (any tp)
    checksums: bool = True  # sha256 of every file written with each checkpoint and checked before one is loaded (sizes are always checked)


@dataclass
class WandbConfig:
    mode: str = "offline"  # online (offline if no API key) | offline | disabled
    project: str = "retnet_train"
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the run's `name`
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    console: bool = True
    level: str = "INFO"
    peak_tflops: Optional[float] = None  # per device for MFU; null: guessed from the device name
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _model_schema() -> Any:
    try:
        from retnet_train.model import ModelConfig
    except ImportError:
        return Any
    return ModelConfig


def _data_schema() -> Any:
    try:
        from retnet_train.data import DataConfig
    except ImportError:
        return Any
    return DataConfig


def _make_root_schema() -> type:
    """The root schema; model/data types come from their packages (Any until those import)."""
    return make_dataclass("Config", [
        ("name", str, field(default="run")),
        ("run_dir", str, field(default="runs/${name}")),  # config.yaml, metrics.jsonl, checkpoints/, wandb/
        ("model", _model_schema(), field(default=MISSING)),
        ("data", Optional[_data_schema()], field(default=None)),  # unused with trainer.data_source=synthetic
        ("optim", OptimConfig, field(default_factory=OptimConfig)),
        ("deepspeed", DeepSpeedConfig, field(default_factory=DeepSpeedConfig)),
        ("parallel", ParallelConfig, field(default_factory=ParallelConfig)),
        ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
        ("checkpoint", CheckpointConfig, field(default_factory=CheckpointConfig)),
        ("logging", LoggingConfig, field(default_factory=LoggingConfig)),
    ])


# ---- composition ---------------------------------------------------------------------------------


def conf_dir() -> Path:
    env = os.environ.get("RETNET_TRAIN_CONF")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "conf"


_registered = False


def register_schemas() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=_make_root_schema())
    _registered = True


def load_config(overrides: List[str] = (), config_dir: Optional[str] = None,
                config_name: str = "config") -> DictConfig:
    """Compose the config like `python -m retnet_train <overrides>` and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    register_schemas()
    GlobalHydra.instance().clear()
    directory = str(Path(config_dir or conf_dir()).resolve())
    check_group_choices(overrides, Path(directory))
    with initialize_config_dir(config_dir=directory, version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=list(overrides))
        except ConfigCompositionException as e:  # surface omegaconf's message, which names the key
            cause = e.__cause__ or e
            raise ConfigError(f"{e}\n{cause}") from None
        except Exception as e:  # omegaconf ValidationError / ConfigKeyError from the schema merge
            if type(e).__module__.startswith(("omegaconf", "hydra")):
                raise ConfigError(str(e)) from None
            raise
    if "hydra" in cfg:
        with OmegaConf.read_write(cfg):
            del cfg["hydra"]
    check_known_keys(cfg)
    if any(o.lstrip("+").startswith("data.root=") for o in overrides):
        check_data_root_used(cfg)
    OmegaConf.resolve(cfg)
    validate(cfg)
    return cfg


# ---- typos Hydra lets through --------------------------------------------------------------------


def _suggest(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_group_choices(overrides, directory: Path) -> None:
    """`group=name` must name a file of conf/<group>/: Hydra silently skips an unknown name of an
    optional group (experiment, data), which would run another job than the one asked for."""
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.lstrip("+~")
        group = directory / key
        if not eq or "." in key or not group.is_dir() or value in ("null", ""):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: no such {key} (conf/{key}/{value}.yaml); choices: "
                              f"{', '.join(choices)}{_suggest(value, choices)}")


def check_known_keys(cfg: DictConfig) -> None:
    """Every key must belong to its schema. `+key=value` adds a key even to a typed config, so a
    typo such as `+trainer.max_step=3` would be accepted and do nothing."""
    import dataclasses

    def walk(node, prefix: str) -> None:
        if not isinstance(node, DictConfig):
            return
        schema = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            path = f"{prefix}{key}"
            if known is not None and key not in known:
                value = OmegaConf.to_container(node, resolve=False)[key]
                raise ConfigError(f"{path}={value!r}: no such key in the schema of "
                                  f"{prefix.rstrip('.') or 'the root config'}{_suggest(str(key), known)}")
            walk(node._get_node(key), path + ".")

    walk(cfg, "")


def check_data_root_used(cfg: DictConfig) -> None:
    """`data.root` is only a base that a data config's paths may interpolate; setting it (on the
    command line) for a data config whose paths do not refer to it would change nothing, silently."""
    data = cfg.get("data")
    if data is None:
        return
    raw = OmegaConf.to_container(data, resolve=False)
    paths = [raw.get("tokenizer", "")] + [s.get("path", "") for s in (raw.get("sources") or {}).values()]
    if not any("root}" in str(p) for p in paths):
        raise ConfigError(f"data.root={data.root!r}: this data config's paths do not use data.root, so it would "
                          "change nothing; set data.tokenizer and data.sources.<name>.path instead")


# ---- value checks --------------------------------------------------------------------------------


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value!r}: {why}")


def _choice(cfg: DictConfig, key: str, choices: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        _fail(key, value, f"must be one of {list(choices)}")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "must be >= 0" if allow_zero else "must be > 0")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_layout(cfg: DictConfig, world_size: Optional[int] = None) -> Dict[str, int]:
    """Data-parallel size and gradient accumulation steps that the batch keys imply."""
    world = world_size or world_size_from_env()
    tp, cp = cfg.parallel.tp, cfg.parallel.get("cp", 1)
    if world % tp:
        _fail("parallel.tp", tp, f"does not divide the world size {world}")
    if world % (tp * cp):
        _fail("parallel.cp", cp, f"times parallel.tp={tp} does not divide the world size {world}")
    dp = world // (tp * cp)  # data-parallel replicas: each reads its own samples
    t = cfg.trainer
    per_micro = t.micro_batch_size * t.seq_len * dp
    if t.global_batch_tokens % per_micro:
        _fail("trainer.global_batch_tokens", t.global_batch_tokens,
              f"not divisible by trainer.micro_batch_size x trainer.seq_len x data-parallel size "
              f"= {t.micro_batch_size} x {t.seq_len} x {dp} = {per_micro}")
    return {"dp_size": dp, "tp_size": tp, "cp_size": cp, "grad_accum": t.global_batch_tokens // per_micro,
            "global_batch_seqs": t.global_batch_tokens // t.seq_len}


def checkpointing_mode(value: Any) -> str:
    """trainer.activation_checkpointing as one of the model's CHECKPOINTING modes (true/false of older
    configs: full/none)."""
    from retnet_train.model.lm import CHECKPOINTING  # the modes are the model's; defined there once

    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINTING:
        _fail("trainer.activation_checkpointing", value, f"must be one of {list(CHECKPOINTING)} (true/false: full/none)")
    return value


def _check_context_parallel(cfg: DictConfig, chunk: Optional[int]) -> None:
    """parallel.cp > 1 splits each sequence into cp equal slices of whole chunks; retention only."""
    cp = cfg.parallel.get("cp", 1)
    if cp == 1:
        return
    arch = cfg.model.get("arch", "retnet")
    if arch != "retnet":
        _fail("parallel.cp", cp, f"context parallelism is built for retention; model.arch={arch!r} needs parallel.cp=1")
    seq = cfg.trainer.seq_len
    if seq % cp:
        _fail("parallel.cp", cp, f"does not divide trainer.seq_len={seq} into equal slices")
    if cfg.trainer.mode == "chunkwise" and chunk and (seq // cp) % chunk:
        _fail("parallel.cp", cp, f"trainer.seq_len={seq} / cp = {seq // cp} tokens per rank is not a whole number "
                                 f"of chunks of {chunk}")


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> None:
    """Checks types cannot express; each failure names its key and value."""
    if cfg.get("model") is None:
        _fail("model", None, "no model chosen (model=<preset> from conf/model/)")
    for key in ("trainer.max_steps", "trainer.micro_batch_size", "trainer.seq_len", "trainer.log_every",
                "trainer.global_batch_tokens", "trainer.max_bad_steps", "parallel.tp", "parallel.cp",
                "optim.lr", "optim.eps", "trainer.build_lock_timeout_s"):
        _positive(cfg, key)
    for key in ("trainer.eval_every", "checkpoint.every", "checkpoint.keep", "optim.warmup_steps",
                "optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio"):
        _positive(cfg, key, allow_zero=True)
    if cfg.trainer.eval_batches is not None:
        _positive(cfg, "trainer.eval_batches")
    if cfg.trainer.chunk_size is not None:
        _positive(cfg, "trainer.chunk_size")
    _choice(cfg, "optim.name", ("adamw",))
    _choice(cfg, "optim.impl", ("auto", "torch", "fused", "deepspeed"))
    _choice(cfg, "optim.decay", ("linear", "cosine", "constant"))
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        _fail("optim.betas", list(cfg.optim.betas), "must be two numbers in [0, 1)")
    if cfg.optim.min_lr_ratio > 1.0:
        _fail("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be in [0, 1]")
    _choice(cfg, "deepspeed.stage", (0, 1, 2, 3))
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.stage < 2:
        _fail("deepspeed.offload_optimizer", True, f"needs deepspeed.stage >= 2 (is {cfg.deepspeed.stage})")
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        _fail("deepspeed.offload_params", True, f"needs deepspeed.stage == 3 (is {cfg.deepspeed.stage})")
    _choice(cfg, "parallel.backend", ("auto", "nccl", "gloo"))
    _choice(cfg, "trainer.precision", ("auto", "bf16", "bf16_autocast", "fp32"))
    _choice(cfg, "trainer.device", ("auto", "cuda", "cpu"))
    _choice(cfg, "trainer.mode", ("parallel", "chunkwise"))
    _choice(cfg, "trainer.data_source", ("stream", "synthetic"))
    checkpointing_mode(cfg.trainer.activation_checkpointing)
    _choice(cfg, "logging.wandb.mode", ("online", "offline", "disabled"))
    _choice(cfg, "logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    if cfg.trainer.data_source == "stream" and cfg.get("data") is None:
        _fail("data", None, "trainer.data_source=stream needs a data config (data=<name> from conf/data/)")
    model = cfg.model
    heads, tp = model.get("n_heads"), cfg.parallel.tp
    if heads is not None and heads % tp:
        _fail("parallel.tp", tp, f"does not divide model.n_heads={heads}")
    if cfg.trainer.mode == "chunkwise" and model.get("arch", "retnet") != "retnet":
        _fail("trainer.mode", "chunkwise", f"needs a RetNet model (model.arch={model.get('arch')!r})")
    chunk = cfg.trainer.chunk_size or model.get("chunk_size")
    if cfg.trainer.mode == "chunkwise" and chunk and cfg.trainer.seq_len % chunk:
        _fail("trainer.seq_len", cfg.trainer.seq_len, f"not divisible by the chunk size {chunk}")
    _check_context_parallel(cfg, chunk)
    batch_layout(cfg, world_size)
    try:  # the model's own checks (heads | d_model, ...)
        from retnet_train.model import resolve_config
    except ImportError:
        return
    try:
        mcfg = resolve_config(model)
        from retnet_train.parallel.tensor_parallel import check_divisible

        check_divisible(mcfg, cfg.parallel.tp)  # heads, FFN width, vocabulary
    except ValueError as e:
        raise ConfigError(str(e)) from None
