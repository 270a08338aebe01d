"""Everything a batch is a function of: the configured sources, their manifests and the
tokenizer, checked against each other once, at start-up."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retnet_train.data.config import DataConfig, validate
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
            raise ValueError(f"data.sources.{name}.path: {m.dir} was encoded with tokenizer "
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
        self.samplers = [SourceSampler(self.manifests[n], seq_len, self.seed, i)
                         for i, n in enumerate(self.names)]

    def batch(self, g: np.ndarray) -> dict[str, torch.Tensor]:
        src, k = self.mixture.lookup(g)
        x = np.empty((len(g), self.seq_len), np.int64)
        y = np.empty_like(x)
        for i in range(len(g)):
            self.samplers[src[i]].read(k[i], x[i], y[i])
        return make_batch(x, y, src, self.tok)


def make_batch(x: np.ndarray, y: np.ndarray, src: np.ndarray, tok: TokenizerInfo) -> dict:
    # A PAD label is the lookahead of the very last window of an input file: no next token.
    y[y == tok.pad_id] = IGNORE
    input_ids = torch.from_numpy(x)
    return {"input_ids": input_ids, "labels": torch.from_numpy(y),
            "source": torch.from_numpy(np.asarray(src, np.int64)),
            # Every document starts with BOS, so the document starts are where BOS is.
            "doc_starts": input_ids == tok.bos_id}
