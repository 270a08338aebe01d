"""Where training and validation batches come from: the shard stream, or the synthetic stream."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def resolve_vocab_size(cfg) -> int | None:
    """The tokenizer's vocabulary size (None for synthetic data: the model's own is used)."""
    if cfg.trainer.data_source != "stream":
        return None
    from retnet_train.data import read_vocab_size

    return int(read_vocab_size(_data_config(cfg)))


def _data_config(cfg):
    from omegaconf import OmegaConf

    from retnet_train.data import DataConfig

    node = cfg.data
    if isinstance(node, DataConfig):
        return node
    # a saved config.yaml loads untyped: give it the schema again
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))


def verify_data(cfg, is_main: bool) -> None:
    """Rank 0 checks every shard the run will read (data.verify) before step 1; every rank raises
    the same DataError if anything is wrong (so none waits for the others in a collective)."""
    from retnet_train.data import DataError, verify_sources
    from retnet_train.parallel import all_gather_objects

    if cfg.trainer.data_source != "stream":
        return
    error = None
    if is_main:
        data = _data_config(cfg)
        try:
            verify_sources(data, cfg.trainer.seq_len, full=data.verify == "full")
        except DataError as e:
            error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        e = DataError(error)
        e.every_rank = True
        raise e


def build_train_stream(cfg, vocab_size: int, dp_rank: int, dp_size: int):
    t = cfg.trainer
    if t.data_source == "synthetic":
        from .synthetic import SyntheticStream

        return SyntheticStream(vocab_size, t.seq_len, t.micro_batch_size, dp_rank, dp_size, seed=t.seed)
    from retnet_train.data import TokenStream

    return TokenStream(_data_config(cfg), seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                       dp_rank=dp_rank, dp_size=dp_size)


def build_val(cfg, vocab_size: int, dp_rank: int, dp_size: int) -> dict[str, list[dict]]:
    t = cfg.trainer
    if t.data_source == "synthetic":
        from .synthetic import synthetic_val_batches

        return synthetic_val_batches(vocab_size, t.seq_len, t.micro_batch_size, dp_rank, dp_size, seed=t.seed,
                                     n_batches=t.eval_batches or 4)
    import dataclasses

    from retnet_train.data import build_val_batches

    data = _data_config(cfg)
    if t.eval_batches:  # the trainer's count wins over the data config's default (it used to cap it silently)
        data = dataclasses.replace(data, val_batches=t.eval_batches)
    return build_val_batches(data, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                             dp_rank=dp_rank, dp_size=dp_size)
