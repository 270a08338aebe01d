"""Schema of conf/data/*.yaml (an OmegaConf structured config: plain types and Choices only)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from retnet_train.schema import Choice, doc


class Verify(Choice):
    quick = "quick"
    full = "full"


@dataclass
class SourceConfig:
    """One source of the mixture (data.sources.<name>): shards built by data_prep."""

    path: str = doc("", "directory holding the source's manifest.json and shards (relative: to the working "
                    "directory)")
    weight: float = doc(1.0, "share of the training samples, normalised over all sources; > 0")


@dataclass
class DataConfig:
    """The shards and their mixture (docs/data.md): a seeded, weighted mixture of sources, split by
    data-parallel rank and loader worker. Files: conf/data/<name>.yaml."""

    sources: dict[str, SourceConfig] = doc({}, "the sources by name, each a path and a weight "
                                           "(data.sources.<name>.*); their names label validation metrics")
    tokenizer: str = doc("", "the sentencepiece .model the shards were encoded with (shards of another "
                         "tokenizer are refused)")
    seed: int = doc(1234, "the mixture and shuffle order; same seed, same batches")
    num_workers: int = doc(1, "loader worker processes per rank (0: in the training process)")
    val_batches: int = doc(4, "validation micro-batches per source per evaluation on every data-parallel rank, "
                           "unless trainer.eval_batches is set (it wins); 0: no validation data is read")
    prefetch: int = doc(4, "messages (of >= 64k tokens: several steps) each worker prepares ahead; >= 1")
    verify: Verify = doc(Verify.quick, "checked at start-up, before step 1 (retnet_train.data.verify): `quick`: "
                         "every shard exists with the size, sample count and headers its manifest records; "
                         "`full`: also its sha256 (reads every byte once)")
    reset_at_documents: bool = doc(False, "hand the model each window's document starts (the batch's doc_starts): "
                                   "retention restarts its state and attention is blocked at every boundary, so no "
                                   "document is conditioned on the one packed before it. On in the pretraining "
                                   "data (pile_c4_stack); off keeps the old behaviour")
    root: str = doc(".", "not read by the code: a base directory that the YAML files interpolate into paths "
                    "(`path: ${...root}/pile`), so that one override (data.root=DIR) moves a whole mixture")


def validate(cfg: DataConfig) -> None:
    """Fail at start-up, naming the key, on a value that would break or skew the stream.
    Cheap (no file is read): the trainer's config validation runs it before building anything."""
    from retnet_train.data.mixture import BLOCK, rounded_counts

    if not cfg.sources:
        raise ValueError("data.sources: no source configured")
    for name, src in cfg.sources.items():
        w = src.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"data.sources.{name}.weight={w!r}: must be a number > 0")
        if not src.path:
            raise ValueError(f"data.sources.{name}.path: empty")
    # The mixture gives every source its share of each block of BLOCK samples, rounded: a share
    # that rounds to none would drop the source (the mixture refuses it; here it is named).
    weights = {n: float(s.weight) for n, s in cfg.sources.items()}
    total = sum(weights.values())
    for n, count in zip(weights, rounded_counts(list(weights.values()), BLOCK)):
        if count == 0:
            raise ValueError(f"data.sources.{n}.weight={cfg.sources[n].weight!r}: {weights[n] / total:.3g} of "
                             f"the total weight {total:g}, below 1/{BLOCK}: it rounds to no sample at all; "
                             "raise it (or remove the source)")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"data.seed={seed!r}: must be an integer >= 0")
    if not cfg.tokenizer:
        raise ValueError("data.tokenizer: empty")
    for key in ("num_workers", "val_batches"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"data.{key}={getattr(cfg, key)!r}: must be >= 0")
    if cfg.verify not in Verify.values():
        raise ValueError(f"data.verify={cfg.verify!r}: must be one of {list(Verify.values())}")
    if cfg.prefetch < 1:
        raise ValueError(f"data.prefetch={cfg.prefetch!r}: must be >= 1")
