"""Shards -> batches: a seeded, weighted mixture of sources, split by data-parallel rank and
loader worker, with a cursor that checkpoints save (see docs/data.md)."""
from retnet_train.data.config import DataConfig, SourceConfig
from retnet_train.data.errors import DataError

__all__ = ["DataConfig", "DataError", "SourceConfig", "TokenStream", "build_val_batches",
           "read_vocab_size", "verify_sources"]


def __getattr__(name: str):
    # Imported on first use: data_prep's encoding workers use the manifest/tokenizer helpers
    # of this package and should not pay for importing torch.
    if name == "TokenStream":
        from retnet_train.data.stream import TokenStream
        return TokenStream
    if name == "verify_sources":
        from retnet_train.data.verify import verify_sources
        return verify_sources
    if name in ("build_val_batches", "read_vocab_size"):
        from retnet_train.data import val
        return getattr(val, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
