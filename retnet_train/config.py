"""Dataclass schemas of every config group, their registration with Hydra, and start-up checks.

The schemas hold every key's default and its documentation (`doc(default, text)`, see
retnet_train/schema.py; docs/config.md is generated from them); conf/ sets only what differs.
`load_config(overrides)` composes conf/config.yaml with command-line overrides. Hydra checks each
key and type against these schemas (an unknown key, a wrong type or a word that is not one of a
Choice key's values fails naming the key); `validate` then checks the values that no type can
express (batch arithmetic, ranges, combinations), raising ConfigError with the key and its value.
All of this runs before any device is touched.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from retnet_train.schema import Choice, doc


class ConfigError(ValueError):
    """A config value that cannot run; the message starts with `key=value`."""


# ---- choices -------------------------------------------------------------------------------------
# Each is a Choice (a str Enum, see retnet_train/schema.py): OmegaConf refuses any other word where
# YAML or the command line sets the key, and load_config turns that into `key='word': must be one of`.


class Optimizer(Choice):
    adamw = "adamw"


class OptimImpl(Choice):
    auto = "auto"
    torch = "torch"
    fused = "fused"
    deepspeed = "deepspeed"


class Decay(Choice):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class Precision(Choice):
    auto = "auto"
    bf16 = "bf16"
    bf16_autocast = "bf16_autocast"
    fp32 = "fp32"


class Float8Recipe(Choice):
    none = "none"
    tensorwise = "tensorwise"
    rowwise = "rowwise"


class Float8FastAccum(Choice):
    output = "output"
    output_grad_input = "output_grad_input"
    all = "all"


class ResidualDtype(Choice):
    weights = "weights"
    bf16 = "bf16"


class CompileTuning(Choice):
    default = "default"
    coordinate_descent = "coordinate_descent"


class Device(Choice):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class TrainMode(Choice):
    parallel = "parallel"
    chunkwise = "chunkwise"


class DataSource(Choice):
    stream = "stream"
    synthetic = "synthetic"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class LogLevel(Choice):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


# the modes of trainer.activation_checkpointing are the model's (retnet_train.model.lm.CHECKPOINTING);
# the key stays untyped because configs written before them say true/false
CHECKPOINTING_TYPE = "`none` | `full` | `selective` (older configs: `true` = full, `false` = none)"


# ---- group schemas -------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """The optimizer and the learning-rate schedule: AdamW, linear warmup, then decay. The defaults
    are the RetNet paper's recipe at 1.3B (arXiv 2307.08621, section 3.1)."""

    name: Optimizer = doc(Optimizer.adamw, "the optimizer (AdamW is the only one)")
    impl: OptimImpl = doc(OptimImpl.auto, "whose AdamW: `auto`: torch's, fused on CUDA unless "
                          "deepspeed.offload_optimizer (the per-tensor loop on CPU); `torch`: torch's, unfused; "
                          "`fused`: torch's fused kernel; "
                          "`deepspeed`: DeepSpeed's own, built from the DeepSpeed JSON (a JIT build that fails on "
                          "some machines)")
    lr: float = doc(6e-4, "peak learning rate, reached at the end of warmup; the paper uses 3e-4 above 1.3B")
    min_lr_ratio: float = doc(0.0, "the LR at the end of the decay, as a fraction of lr (0-1)")
    betas: List[float] = doc([0.9, 0.98], "AdamW's (beta1, beta2), each in [0, 1)")
    eps: float = doc(1e-8, "AdamW's epsilon")
    weight_decay: float = doc(0.05, "decoupled weight decay of the matrices; norms, biases and gains are not decayed")
    warmup_steps: int = doc(375, "steps of linear warmup from lr / warmup_steps to lr; 0: none")
    decay: Decay = doc(Decay.linear, "after warmup: `linear` or `cosine` down to lr x min_lr_ratio at decay_steps; "
                       "`constant` keeps lr")
    decay_steps: Optional[int] = doc(None, "the step at which the decay ends (counted from step 0); null: "
                                     "trainer.max_steps")
    grad_clip: float = doc(2.0, "clip the global gradient norm (all ranks, all tensor-parallel slices) to this; "
                           "0 disables clipping")


@dataclass
class DeepSpeedConfig:
    """The ZeRO part of the DeepSpeed JSON; the rest of that JSON (batch sizes, clipping, bf16,
    the optimizer) follows from the trainer and optim keys. conf/deepspeed/ holds one file per stage."""

    stage: int = doc(2, "ZeRO stage 0-3: 0 replicates everything (plain data parallelism); 1 shards the optimizer "
                     "state over the data-parallel ranks; 2 also the gradients; 3 also the parameters")
    offload_optimizer: bool = doc(False, "keep the optimizer state on the CPU (stage 2 or 3)")
    offload_params: bool = doc(False, "keep the parameters on the CPU (stage 3)")
    overlap_comm: bool = doc(True, "overlap gradient reduction with backward (stages 1-3)")
    contiguous_gradients: bool = doc(True, "copy gradients into one contiguous buffer as they are produced "
                                     "(stages 1-3)")
    reduce_bucket_size: int = doc(500_000_000, "elements reduced at a time (stages 1-3)")
    allgather_bucket_size: int = doc(500_000_000, "elements all-gathered at a time (stages 1-2)")
    stage3_prefetch_bucket_size: int = doc(50_000_000, "parameter elements fetched ahead of use (stage 3)")
    stage3_param_persistence_threshold: int = doc(100_000, "parameters smaller than this many elements stay "
                                                  "unpartitioned (stage 3)")
    extra: Dict[str, Any] = doc({}, "any other DeepSpeed keys, deep-merged into the generated JSON last (they win)")


@dataclass
class ParallelConfig:
    """Process groups. Data-parallel size = world size / (tp x cp); ZeRO shards over the data- and
    context-parallel ranks (dp x cp)."""

    tp: int = doc(1, "tensor-parallel size: `tp` consecutive ranks form a group that splits heads, FFN and "
                  "vocabulary (fairscale's Megatron layers); must divide model.n_heads, the FFN width, the "
                  "vocabulary and the world size; keep a group inside one node (NVLink)")
    cp: int = doc(1, "context-parallel size (RetNet only): `cp` ranks split each sequence into consecutive slices "
                  "of seq_len / cp tokens (whole chunks); each retention layer exchanges one [H, d_k, d_v] state "
                  "per sequence (an all-gather)")
    backend: Backend = doc(Backend.auto, "the torch.distributed backend; `auto`: nccl on CUDA, gloo on CPU")
    timeout_minutes: int = doc(30, "how long a collective may wait before the process group fails")
    host_group: bool = doc(True, "a gloo group over every rank for the per-step stop check, on host memory, so "
                           "the check does not wait for the step queued before it (an NCCL all-reduce read on the "
                           "host does). false: the check goes through the backend's group; for clusters where gloo "
                           "cannot reach across nodes (a host name resolving to loopback: or set GLOO_SOCKET_IFNAME)")


@dataclass
class TrainerConfig:
    """The training loop: steps, batch, precision, retention form, evaluation, NaN guard. Gradient
    accumulation is not a key: it is global_batch_tokens / (micro_batch_size x seq_len x
    data-parallel size) and must be a whole number."""

    max_steps: int = doc(1000, "optimizer steps to train")
    global_batch_tokens: int = doc(4_194_304, "tokens per optimizer step, all ranks together (the paper: 4M)")
    micro_batch_size: int = doc(8, "sequences per forward pass per rank")
    seq_len: int = doc(2048, "tokens per training sequence")
    log_every: int = doc(10, "steps between log lines (console, metrics.jsonl, wandb); the last step is always "
                         "logged")
    eval_every: int = doc(500, "steps between evaluations; 0: no periodic evaluation (the one at the end still "
                          "runs unless eval_at_end=false)")
    eval_at_end: bool = doc(True, "evaluate once more after the last step")
    eval_batches: Optional[int] = doc(
        None, "validation micro-batches per source at each evaluation, on every data-parallel rank (each of "
        "micro_batch_size sequences of seq_len tokens, disjoint across ranks: a source is scored on "
        "eval_batches x micro_batch_size x data-parallel size sequences); it replaces data.val_batches, larger "
        "or smaller; null: data.val_batches (4 with trainer.data_source=synthetic)")
    precision: Precision = doc(Precision.auto, "`auto`: on CUDA bf16 with ZeRO 1-3 and bf16_autocast with ZeRO-0 "
                               "(bf16 with optim.impl=deepspeed), fp32 on CPU; `bf16`: bf16 weights, fp32 master copy and "
                               "gradient accumulation in the optimizer (DeepSpeed's bf16 mode); "
                               "`bf16_autocast`: fp32 weights, bf16 matmuls under torch.autocast; `fp32`")
    residual_dtype: ResidualDtype = doc(
        ResidualDtype.weights, "the dtype of the residual stream between blocks (and of its gradient): `weights`: "
        "the embedding's, so fp32 under bf16_autocast and fp32, bf16 with bf16 weights; `bf16`: cast to bf16 after "
        "the embedding, as with bf16 weights, for half the memory traffic and activation memory of the residual "
        "adds and norms (the norms still compute in fp32 under autocast). Needs a bf16 precision (bf16, "
        "bf16_autocast, or auto resolving to one). See docs/training.md for its measured speed")
    device: Device = doc(Device.auto, "`auto`: cuda when available, else cpu")
    mode: TrainMode = doc(TrainMode.parallel, "the retention form for training and evaluation (RetNet): "
                          "`parallel`, or `chunkwise` (memory linear in seq_len)")
    chunk_size: Optional[int] = doc(None, "the chunk length of the chunkwise form; null: model.chunk_size")
    activation_checkpointing: Any = doc(
        "none", "what each block keeps for backward: `none`; `full`: only the block's input, the block is "
        "recomputed (about 1/3 more compute); `selective`: the outputs of matmuls and retention kernels are "
        "kept, norms, rotary, gates and activations recomputed. Configs written before these values: "
        "true = full, false = none", shown_type=CHECKPOINTING_TYPE)
    checkpoint_layers: Optional[int] = doc(
        None, "how many blocks, counted from the first, use activation_checkpointing; the others keep "
        "everything. null: every block. Where memory beside full checkpointing holds a few blocks' "
        "activations, they are not recomputed (Megatron's recompute_num_layers)")
    compile: bool = doc(False, "torch.compile each block (regional: one graph serves every layer)")
    compile_tuning: CompileTuning = doc(
        CompileTuning.default, "with trainer.compile: how the compiler sizes each fused kernel's tiles. `default`: "
        "its heuristics; `coordinate_descent`: it times neighbouring tile sizes on each kernel's first call and "
        "keeps the fastest (longer first step; inductor's coordinate_descent_tuning). See docs/training.md")
    compile_pdl: bool = doc(
        False, "with trainer.compile: the compiled kernels use programmatic dependent launch (inductor's "
        "triton.enable_pdl): each may start while the one before it drains, which hides part of the gap "
        "between the thousands of short kernels of a step. NVIDIA compute capability 9.0+ (plain launches "
        "elsewhere). See docs/training.md")
    float8: Float8Recipe = doc(
        Float8Recipe.none, "the blocks' linear layers multiply in fp8 (torchao's Float8Linear; weights, gradients "
        "and optimizer unchanged): `tensorwise` (one dynamic scale per tensor; the fastest), `rowwise` (one per "
        "row); `none`: the precision's own matmuls. Needs fp8 tensor cores (NVIDIA compute capability 8.9+, "
        "AMD MI300+; emulated on CPU), trainer.compile to fuse the casts, parallel.tp=1 and ZeRO 0-2. Not the "
        "LM head. See docs/training.md for its measured speed and loss")
    float8_fast_accum: Float8FastAccum = doc(
        Float8FastAccum.output, "with trainer.float8: which fp8 matmuls accumulate in the tensor cores' faster, "
        "lower-precision mode: `output` (torchao's default: the forward's, contracting over in_features), "
        "`output_grad_input` (also the input gradient's, contracting over out_features: the same lengths as the "
        "forward's), `all` (also the weight gradient's, contracting over every token of the micro-batch). See "
        "docs/training.md for its measured speed")
    activation_memory_budget: Optional[float] = doc(
        None, "with trainer.compile: the share (0 to 1) of a block's activations the compiled graph may "
        "keep for backward; the compiler recomputes the rest, the cheapest per byte first (torch's "
        "activation memory budget). 0 keeps about what full checkpointing keeps, 1 what the compiler "
        "keeps by itself. null: the compiler's default (1). Only for blocks without activation "
        "checkpointing (those past trainer.checkpoint_layers, or all with activation_checkpointing=none). "
        "A finer trade than activation_checkpointing where a long sequence's activations almost fit")
    fused_loss: bool = doc(True, "true: the loss from the final hidden states and the LM head's weight in token "
                           "chunks, never the full [tokens, vocab] fp32 logits (same loss to fp32 rounding); "
                           "false: logits, then cross-entropy")
    defer_step_values: bool = doc(
        False, "the host queues step N + 1 before it reads step N's loss and gradient norm (copied to pinned "
        "memory behind an event), so the GPU's queue does not drain between steps. A bad step is still "
        "skipped by the optimizer at once; it is counted, logged and checked against max_bad_steps one step "
        "later. Steps followed by an evaluation or a checkpoint, and the last, are read at once. (The ranks agree on "
        "stopping through a gloo group, so that does not drain the queue either; the input batch's copy from "
        "pageable memory does not wait for the queue, measured on an H100.) Not measured here yet")
    gc_every: int = doc(0, "Python's garbage collector: 0 leaves it to run on its own schedule (whenever enough "
                        "objects were allocated, at a different moment on each rank); N > 0 turns automatic "
                        "collection off and runs a full collection after every N-th step, on every rank at the same "
                        "step (Megatron's manual GC, torchtitan's gc_freq). Not measured here yet")
    max_bad_steps: int = doc(5, "stop after this many consecutive skipped steps (a NaN/inf loss or gradient "
                             "skips the update)")
    data_source: DataSource = doc(DataSource.stream, "`stream`: the shards of data=<name>; `synthetic`: a "
                                  "generated, learnable token pattern (tests, benchmarks; no data config needed)")
    build_lock_timeout_s: float = doc(900, "give up waiting for a C++ extension build lock after this many seconds "
                                      "(a killed build leaves its lock behind)")
    seed: int = doc(1234, "initial weights (the same on every rank), dropout and synthetic data")


@dataclass
class CheckpointConfig:
    """Checkpoints in ${run_dir}/checkpoints/step_NNNNNNNN; `latest` names the newest complete one."""

    every: int = doc(1000, "steps between checkpoints; 0: only at the end and on SIGTERM/SIGUSR1/Ctrl-C")
    keep: int = doc(3, "newest complete checkpoints kept; 0 keeps all")
    save_at_end: bool = doc(True, "save after the last step")
    resume: bool = doc(True, "continue from ${run_dir}/checkpoints/latest when it exists")
    init_from: Optional[str] = doc(None, "start a *new* run from these weights: a checkpoint folder (same "
                                   "parallel.tp) or an export folder (any tp)")
    checksums: bool = doc(True, "write the sha256 of every file with each checkpoint and check it before one is "
                          "loaded (sizes are always checked)")


@dataclass
class WandbConfig:
    """Weights & Biases, on rank 0; the run's resolved config goes with it."""

    mode: WandbMode = doc(WandbMode.offline, "`online` (offline when there is no WANDB_API_KEY or netrc login) | "
                          "`offline` | `disabled`")
    project: str = doc("retnet_train", "wandb project")
    entity: Optional[str] = doc(None, "wandb entity (team or user); null: wandb's default")
    name: Optional[str] = doc(None, "the wandb run name; null: the run's `name`")
    group: Optional[str] = doc(None, "wandb group")
    tags: List[str] = doc([], "wandb tags")


@dataclass
class ProfileConfig:
    """torch.profiler over a few optimizer steps (retnet_train/train/profiling.py): ${run_dir}/profile/
    gets kernels_rank<R>.txt (device time per step by kernel family, and the top kernels; on a GPU
    also the step's wall time and how much of it the device waited for the host) and a Chrome trace
    per profiled rank."""

    start: int = doc(0, "the first profiled optimizer step (1-based; after warm-up and compilation); 0: no profiling")
    steps: int = doc(1, "optimizer steps profiled from `start`")
    ranks: List[int] = doc([0], "the global ranks that profile")
    trace: bool = doc(True, "also write trace_rank<R>.json (chrome://tracing, Perfetto); large for big models")
    top: int = doc(30, "kernels listed by name in kernels_rank<R>.txt")


@dataclass
class LoggingConfig:
    """Console (rank 0; the other ranks warnings only), ${run_dir}/metrics.jsonl (always), a log
    file per rank in ${run_dir}/logs/, and wandb."""

    console: bool = doc(True, "print step and evaluation lines on rank 0")
    level: LogLevel = doc(LogLevel.INFO, "log level of rank 0's console and of every rank's log file")
    peak_tflops: Optional[float] = doc(None, "peak TFLOP/s of one device, for MFU; null: guessed from the device name")
    wandb: WandbConfig = doc(WandbConfig(), "Weights & Biases (logging.wandb.*)")
    profile: ProfileConfig = doc(ProfileConfig(), "torch.profiler over chosen steps (logging.profile.*)")


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


ROOT_DOC = """The root of `python -m retnet_train`: conf/config.yaml picks one file of each group
(model, data, deepspeed) and an optional experiment; every other value comes from these schemas."""


def _make_root_schema() -> type:
    """The root schema; model/data types come from their packages (Any until those import)."""
    return make_dataclass("Config", [
        ("name", str, doc("run", "names the run: run_dir, the wandb run name")),
        ("run_dir", str, doc("runs/${name}", "holds config.yaml, metrics.jsonl, checkpoints/, logs/, wandb/; "
                              "a run started again with the same run_dir resumes")),
        ("model", _model_schema(), doc(MISSING, "the network: model=<preset> of conf/model/ (model.*)")),
        ("data", Optional[_data_schema()], doc(None, "the shards and their mixture: data=<name> of conf/data/ "
                                               "(data.*); unused with trainer.data_source=synthetic")),
        ("optim", OptimConfig, doc(OptimConfig(), "optimizer and LR schedule (optim.*)")),
        ("deepspeed", DeepSpeedConfig, doc(DeepSpeedConfig(), "ZeRO: deepspeed=zero0 ... zero3, zero3_offload "
                                           "(deepspeed.*)")),
        ("parallel", ParallelConfig, doc(ParallelConfig(), "tensor and context parallelism (parallel.*)")),
        ("trainer", TrainerConfig, doc(TrainerConfig(), "the training loop (trainer.*)")),
        ("checkpoint", CheckpointConfig, doc(CheckpointConfig(), "saving and resuming (checkpoint.*)")),
        ("logging", LoggingConfig, doc(LoggingConfig(), "console, metrics.jsonl, wandb (logging.*)")),
    ], namespace={"__doc__": ROOT_DOC})


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
            raise ConfigError(_choice_error(e) or f"{e}\n{cause}") from None
        except Exception as e:  # omegaconf ValidationError / ConfigKeyError from the schema merge
            if type(e).__module__.startswith(("omegaconf", "hydra")):
                raise ConfigError(_choice_error(e) or str(e)) from None
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


def schema_type(path: str) -> Any:
    """The schema's type of a dotted key ("trainer.precision", "data.sources.pile.weight"), Optional
    unwrapped; None for a key no schema types."""
    import dataclasses
    import typing

    node: Any = _make_root_schema()
    for part in path.split("."):
        node = _unwrap_optional(node)
        if dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return None
            node = hints[part]
        elif typing.get_origin(node) in (dict, Dict):
            node = typing.get_args(node)[1]
        else:
            return None
    return _unwrap_optional(node)


def _unwrap_optional(tp: Any) -> Any:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _choice_error(e: Optional[BaseException]) -> Optional[str]:
    """OmegaConf's refusal of a word that is not one of a Choice key's values, as `key='word': must
    be one of [...]` (its own message names the key on a later line and the choices by member name).
    Hydra raises it as the cause of its own error, or (a value in a YAML file) as the context."""
    import re

    from omegaconf.errors import ValidationError

    where = re.match(r"In '([^']+)':", str(e))  # Hydra names the file that set the value
    while e is not None and not (isinstance(e, ValidationError) and getattr(e, "full_key", None)):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    key = e.full_key
    tp = schema_type(key)
    if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):  # the model's Choice is its own class
        return None
    return (f"{key}={getattr(e, 'value', None)!r}: must be one of {[m.value for m in tp]}"
            + (f" (in conf/{where.group(1)}.yaml)" if where else ""))


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
    # nan fails no comparison, so it is refused by name (it would train to a nan loss)
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


def _validate_data(data: DictConfig) -> None:
    """The data config's own checks (seed, weights, ...: no file is read), before anything is built."""
    try:
        from retnet_train.data.config import validate as validate_data
    except ImportError:
        return
    try:
        validate_data(data)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_layout(parallel: ParallelConfig, trainer: TrainerConfig,
                 world_size: Optional[int] = None) -> Dict[str, int]:
    """Data-parallel size and gradient accumulation steps that the batch keys imply."""
    world = world_size or world_size_from_env()
    tp, cp = parallel.tp, getattr(parallel, "cp", 1)
    if world % tp:
        _fail("parallel.tp", tp, f"does not divide the world size {world}")
    if world % (tp * cp):
        _fail("parallel.cp", cp, f"times parallel.tp={tp} does not divide the world size {world}")
    dp = world // (tp * cp)  # data-parallel replicas: each reads its own samples
    t = trainer
    per_micro = t.micro_batch_size * t.seq_len * dp
    if t.global_batch_tokens % per_micro:
        _fail("trainer.global_batch_tokens", t.global_batch_tokens,
              f"not divisible by trainer.micro_batch_size x trainer.seq_len x data-parallel size "
              f"= {t.micro_batch_size} x {t.seq_len} x {dp} = {per_micro}")
    return {"dp_size": dp, "tp_size": tp, "cp_size": cp, "grad_accum": t.global_batch_tokens // per_micro,
            "global_batch_seqs": t.global_batch_tokens // t.seq_len}


def memory_budget_problem(budget: float | None, compiled: bool, checkpointing: str,
                          checkpoint_layers: int | None) -> str | None:
    """What is wrong with an activation memory budget beside these settings (None: nothing); the
    trainer's config check and bench/train_step.py's share it."""
    if budget is None:
        return None
    if not (math.isfinite(budget) and 0.0 <= budget <= 1.0):
        return "must be a share of the activations in [0, 1]"
    if not compiled:
        return "needs trainer.compile=true (the compiler chooses what to recompute)"
    if checkpointing != "none" and checkpoint_layers is None:
        # a checkpointed region has already said what to keep and what to recompute
        return (f"acts only on blocks without activation checkpointing, and trainer.activation_checkpointing="
                f"{checkpointing} covers every block (set it to none, or trainer.checkpoint_layers to fewer blocks)")
    return None


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
    """Checks types cannot express; each failure names its key and value. (The Choice keys need
    none here: OmegaConf refuses any other word when the config is composed.)"""
    if cfg.get("model") is None:
        _fail("model", None, "no model chosen (model=<preset> from conf/model/)")
    for key in ("trainer.max_steps", "trainer.micro_batch_size", "trainer.seq_len", "trainer.log_every",
                "trainer.global_batch_tokens", "trainer.max_bad_steps", "parallel.tp", "parallel.cp",
                "optim.lr", "optim.eps", "trainer.build_lock_timeout_s", "logging.profile.steps",
                "logging.profile.top", "parallel.timeout_minutes"):
        _positive(cfg, key)
    if cfg.logging.get("peak_tflops") is not None:
        _positive(cfg, "logging.peak_tflops")
    decay_steps = cfg.optim.get("decay_steps")
    if decay_steps is not None and decay_steps <= cfg.optim.warmup_steps:
        _fail("optim.decay_steps", decay_steps, f"must be > optim.warmup_steps={cfg.optim.warmup_steps} (or null: "
                                                f"trainer.max_steps); at or below it the decay would never start")
    for key in ("trainer.eval_every", "checkpoint.every", "checkpoint.keep", "optim.warmup_steps",
                "optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio", "logging.profile.start"):
        _positive(cfg, key, allow_zero=True)
    if cfg.trainer.eval_batches is not None:
        _positive(cfg, "trainer.eval_batches")
    if any(r < 0 for r in cfg.logging.profile.ranks):
        _fail("logging.profile.ranks", list(cfg.logging.profile.ranks), "ranks are >= 0")
    if cfg.trainer.chunk_size is not None:
        _positive(cfg, "trainer.chunk_size")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        _fail("optim.betas", list(cfg.optim.betas), "must be two numbers in [0, 1)")
    if cfg.optim.min_lr_ratio > 1.0:
        _fail("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be in [0, 1]")
    _choice(cfg, "deepspeed.stage", (0, 1, 2, 3))
    extra_stage = OmegaConf.select(cfg, "deepspeed.extra.zero_optimization.stage", default=None)
    if extra_stage is not None and extra_stage != cfg.deepspeed.stage:
        # the trainer plans sharding, precision, checkpoints and resharding from deepspeed.stage
        _fail("deepspeed.extra.zero_optimization.stage", extra_stage,
              f"differs from deepspeed.stage={cfg.deepspeed.stage}; set the stage with deepspeed.stage (or "
              f"deepspeed=zero<N>), which the trainer plans by")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.stage < 2:
        _fail("deepspeed.offload_optimizer", True, f"needs deepspeed.stage >= 2 (is {cfg.deepspeed.stage})")
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        _fail("deepspeed.offload_params", True, f"needs deepspeed.stage == 3 (is {cfg.deepspeed.stage})")
    checkpointing_mode(cfg.trainer.activation_checkpointing)
    if cfg.trainer.checkpoint_layers is not None:
        _positive(cfg, "trainer.checkpoint_layers", allow_zero=True)
    _positive(cfg, "trainer.gc_every", allow_zero=True)
    budget = cfg.trainer.activation_memory_budget
    problem = memory_budget_problem(budget, bool(cfg.trainer.compile),
                                    checkpointing_mode(cfg.trainer.activation_checkpointing),
                                    cfg.trainer.checkpoint_layers)
    if problem:
        _fail("trainer.activation_memory_budget", budget, problem)
    if cfg.trainer.compile_tuning != "default" and not cfg.trainer.compile:
        _fail("trainer.compile_tuning", cfg.trainer.compile_tuning, "needs trainer.compile=true (it tunes the "
              "compiled kernels)")
    if cfg.trainer.compile_pdl and not cfg.trainer.compile:
        _fail("trainer.compile_pdl", cfg.trainer.compile_pdl, "needs trainer.compile=true (it launches the "
              "compiled kernels)")
    if cfg.trainer.residual_dtype == "bf16" and cfg.trainer.precision == "fp32":
        _fail("trainer.residual_dtype", cfg.trainer.residual_dtype, "needs a bf16 precision (trainer.precision=fp32)")
    if cfg.trainer.float8 != "none":
        if cfg.parallel.tp > 1:
            _fail("trainer.float8", cfg.trainer.float8, f"needs parallel.tp=1 (is {cfg.parallel.tp}): the "
                  "tensor-parallel linear layers have no fp8 path")
        if cfg.deepspeed.stage == 3:
            _fail("trainer.float8", cfg.trainer.float8, "needs deepspeed.stage 0-2 (is 3): ZeRO-3 gathers the "
                  "weights around the fp8 linear layers' own casts")
    if cfg.trainer.float8_fast_accum != "output" and cfg.trainer.float8 == "none":
        _fail("trainer.float8_fast_accum", cfg.trainer.float8_fast_accum, "needs trainer.float8 (it chooses how "
              "the fp8 matmuls accumulate)")
    if cfg.trainer.data_source == "stream" and cfg.get("data") is None:
        _fail("data", None, "trainer.data_source=stream needs a data config (data=<name> from conf/data/)")
    if cfg.trainer.data_source == "stream":
        _validate_data(cfg.data)
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
    batch_layout(cfg.parallel, cfg.trainer, world_size)
    try:  # the model's own checks (heads | d_model, ...)
        from retnet_train.model import resolve_config
    except ImportError:
        return
    try:
        mcfg = resolve_config(model)
        from retnet_train.parallel.tensor_parallel import check_divisible

        check_divisible(mcfg, cfg.parallel.tp)  # heads, FFN width, vocabulary
        layers = cfg.trainer.checkpoint_layers
        if layers is not None and layers > mcfg.n_layers:
            _fail("trainer.checkpoint_layers", layers, f"more than model.n_layers={mcfg.n_layers}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
