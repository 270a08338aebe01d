"""Schema of conf/data/*.yaml (an OmegaConf structured config: plain types only)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    path: str = ""         # directory holding the source's manifest.json (relative: to the cwd)
    weight: float = 1.0    # share of training samples; normalised over all sources


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    tokenizer: str = ""    # the sentencepiece .model the shards were encoded with
    seed: int = 1234       # the mixture and shuffle order; same seed, same batches
    num_workers: int = 1   # loader worker processes per rank (0 = in the training process)
    val_batches: int = 4   # validation micro-batches per source per eval
    prefetch: int = 4      # messages (of >= 64k tokens: several steps) each worker prepares ahead
    # Checked at start-up, before step 1 (retnet_train.data.verify): quick = every shard exists
    # with the size, sample count and headers its manifest records; full = also its sha256
    # (reads every byte once).
    verify: str = "quick"
    # Hand the model each window's document starts (the batch's doc_starts): retention restarts its
    # state and attention is blocked at every boundary, so no document is conditioned on the one
    # packed before it. On in the pretraining data (pile_c4_stack); off keeps the old behaviour.
    reset_at_documents: bool = False
    # Not read by the code: a base directory that the YAML files interpolate into paths
    # (`path: ${...root}/pile`), so that one override moves a whole mixture.
    root: str = "."


def validate(cfg: DataConfig) -> None:
    """Fail at start-up, naming the key, on a value that would break or skew the stream."""
    if not cfg.sources:
        raise ValueError("data.sources: no source configured")
    for name, src in cfg.sources.items():
        w = src.weight
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"data.sources.{name}.weight: must be a number > 0, got {w!r}")
        if not src.path:
            raise ValueError(f"data.sources.{name}.path: empty")
    if not cfg.tokenizer:
        raise ValueError("data.tokenizer: empty")
    for key in ("num_workers", "val_batches"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"data.{key}: must be >= 0, got {getattr(cfg, key)}")
    if cfg.verify not in ("quick", "full"):
        raise ValueError(f"data.verify: must be quick or full, got {cfg.verify!r}")
    if cfg.prefetch < 1:
        raise ValueError(f"data.prefetch: must be >= 1, got {cfg.prefetch}")
