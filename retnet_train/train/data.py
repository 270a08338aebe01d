"""Where training and validation batches come from: the shard stream, or the synthetic stream.

Each function takes the config's `trainer` section and its `data` section (None or unused with
trainer.data_source=synthetic).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def resolve_vocab_size(trainer, data) -> int | None:
    """The tokenizer's vocabulary size (None for synthetic data: the model's own is used)."""
    if trainer.data_source != "stream":
        return None
    from retnet_train.data import read_vocab_size

    return int(read_vocab_size(_data_config(data)))


def _data_config(node):
    from omegaconf import OmegaConf

    from retnet_train.data import DataConfig

    if isinstance(node, DataConfig):
        return node
    # a saved config.yaml loads untyped: give it the schema again
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))


def val_batches(trainer, data) -> int:
    """Validation micro-batches per source per evaluation on each data-parallel rank: trainer.eval_batches
    when set (larger or smaller than data.val_batches; it once only capped it), else data.val_batches,
    else (synthetic data) 4."""
    if trainer.eval_batches is not None:
        return trainer.eval_batches
    return data.val_batches if trainer.data_source == "stream" else 4


def _val_data_config(trainer, data):
    """The data config with val_batches as the run will read them, for verification and validation."""
    import dataclasses

    return dataclasses.replace(_data_config(data), val_batches=val_batches(trainer, data))


def verify_data(trainer, data, is_main: bool) -> None:
    """Rank 0 checks every shard the run will read (data.verify) before step 1; every rank raises
    the same DataError if anything is wrong (so none waits for the others in a collective)."""
    from retnet_train.data import DataError, verify_sources
    from retnet_train.parallel import all_gather_objects

    if trainer.data_source != "stream":
        return
    error = None
    if is_main:
        checked = _val_data_config(trainer, data)
        try:
            verify_sources(checked, trainer.seq_len, full=checked.verify == "full")
        except DataError as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        e = DataError(error)
        e.every_rank = True
        raise e


def build_train_stream(trainer, data, vocab_size: int, dp_rank: int, dp_size: int):
    t = trainer
    if t.data_source == "synthetic":
        from .synthetic import SyntheticStream

        return SyntheticStream(vocab_size, t.seq_len, t.micro_batch_size, dp_rank, dp_size, seed=t.seed)
    from retnet_train.data import TokenStream

    return TokenStream(_data_config(data), seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                       dp_rank=dp_rank, dp_size=dp_size)


def build_val(trainer, data, vocab_size: int, dp_rank: int, dp_size: int) -> dict[str, list[dict]]:
    """val_batches(trainer, data) micro-batches per source for this data-parallel rank."""
    t = trainer
    if t.data_source == "synthetic":
        from .synthetic import synthetic_val_batches

        return synthetic_val_batches(vocab_size, t.seq_len, t.micro_batch_size, dp_rank, dp_size, seed=t.seed,
                                     n_batches=val_batches(t, data))
    from retnet_train.data import build_val_batches

    return build_val_batches(_val_data_config(t, data), seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                             dp_rank=dp_rank, dp_size=dp_size)
