"""Shards -> batches: a seeded, weighted mixture of sources, split by data-parallel rank and
loader worker, with a cursor that checkpoints save (see docs/data.md)."""
from retnet_train.data.config import DataConfig, SourceConfig
from retnet_train.data.stream import TokenStream
from retnet_train.data.val import build_val_batches, read_vocab_size

__all__ = ["DataConfig", "SourceConfig", "TokenStream", "build_val_batches", "read_vocab_size"]
