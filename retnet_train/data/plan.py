"""Everything a batch is a function of: the configured sources, their manifests and the
tokenizer, checked against each other once, at start-up."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retnet_train.data.config import DataConfig, validate
from retnet_train.data.errors import DataError
from retnet_train.data.manifest import Manifest, load_manifest
from retnet_train.data.mixture import Mixture
from retnet_train.data.source import SourceSampler
from retnet_train.data.tokenizer import TokenizerInfo, load_tokenizer

IGNORE = -100  # label of a position whose next token is unknown (cross-entropy ignore_index)


def load_sources(cfg: DataConfig) -> tuple[TokenizerInfo, dict[str, Manifest]]:
    validate(cfg)
    _, tok = load_tokenizer(Path(cfg.tokenizer))
    manifests = {}
    for name, src in cfg.sources.items():
        try:
            m = load_manifest(Path(src.path))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.sources.{name}.path: {e}") from e
        if m.tokenizer_sha256 != tok.sha256:
            raise DataError(f"data.sources.{name}.path: {m.dir} was encoded with tokenizer "
                             f"sha256 {m.tokenizer_sha256[:12]}, data.tokenizer {cfg.tokenizer} is "
                             f"{tok.sha256[:12]}: they must be the same file")
        manifests[name] = m
    return tok, manifests


class Plan:
    """Maps global sample indices to batches.  Picklable; shard files open lazily."""

    def __init__(self, cfg: DataConfig, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tok, self.manifests = load_sources(cfg)
        self.names = list(cfg.sources)
        self.weights = [float(cfg.sources[n].weight) for n in self.names]
        self.seq_len, self.seed = seq_len, int(cfg.seed)
        self.mixture = Mixture(self.weights, self.seed)
        dtypes = {m.dtype for m in self.manifests.values()}
        self.dtype = np.dtype(dtypes.pop() if len(dtypes) == 1 else "uint32")
        self.samplers = [SourceSampler(self.manifests[n], seq_len, self.seed, i)
                         for i, n in enumerate(self.names)]

    def tokens(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (tokens [B, seq_len + 1] in the shards' dtype, source [B]).
        Compact on purpose: this is what loader workers send to the trainer process."""
        src, k = self.mixture.lookup(g)
        out = np.empty((len(g), self.seq_len + 1), self.dtype)
        for i in range(len(g)):
            self.samplers[src[i]].read(k[i], out[i])
        return out, src


def make_batch(tokens: np.ndarray, src: np.ndarray, tok: TokenizerInfo) -> dict:
    """[B, seq_len + 1] tokens -> the trainer's batch of int64 tensors."""
    x = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    y = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    # A PAD label is the lookahead of the very last window of an input file: no next token.
    y[y == tok.pad_id] = IGNORE
    return {"input_ids": x, "labels": y, "source": torch.from_numpy(np.asarray(src, np.int64)),
            # Every document starts with BOS, so the document starts are where BOS is.
            "doc_starts": x == tok.bos_id}
