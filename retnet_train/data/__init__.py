"""Shards -> batches: a seeded, weighted mixture of sources, split by data-parallel rank and
loader worker, with a cursor that checkpoints save (see docs/data.md)."""
from retnet_train.data.config import DataConfig, SourceConfig

__all__ = ["DataConfig", "SourceConfig", "TokenStream", "build_val_batches", "read_vocab_size"]


def __getattr__(name: str):
    # Imported on first use: data_prep's encoding workers use the manifest/tokenizer helpers
    # of this package and should not pay for importing torch.
    if name == "TokenStream":
        from retnet_train.data.stream import TokenStream
        return TokenStream
    if name in ("build_val_batches", "read_vocab_size"):
        from retnet_train.data import val
        return getattr(val, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
