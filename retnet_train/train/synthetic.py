"""A generated token stream with the TokenStream interface: for tests and benchmarks, no shards.

Sequences are concatenations of "words": 64 fixed random token strings of 8 tokens. Within a word
the next token is determined, so a model can learn it (entropy log(64)/8 = 0.52 nats per token).
Sample i depends only on (seed, split, i); rank r of n takes global micro-batches r, r+n, r+2n, ...
so a step sees the same samples for any split of its batch over ranks and accumulation steps.
"""

from __future__ import annotations

import math

import torch

WORDS, WORD_LEN = 64, 8


class SyntheticStream:
    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, split: str = "train"):
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.split_id = {"train": 0, "val": 1}[split]
        g = torch.Generator().manual_seed(seed)
        self.words = torch.randint(0, vocab_size, (WORDS, WORD_LEN), generator=g)
        self.index = 0  # micro-batches this rank has taken

    def sample(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) * 2 + self.split_id)
        n_words = math.ceil((self.seq_len + 1) / WORD_LEN) + 1
        ids = self.words[torch.randint(0, WORDS, (n_words,), generator=g)].flatten()
        start = int(torch.randint(0, WORD_LEN, (1,), generator=g))
        return ids[start:start + self.seq_len + 1]

    def batch(self, micro_index: int) -> dict:
        first = micro_index * self.micro_batch_size
        seqs = torch.stack([self.sample(first + j) for j in range(self.micro_batch_size)])
        return {"input_ids": seqs[:, :-1].contiguous(), "labels": seqs[:, 1:].contiguous(),
                "source": ["synthetic"] * self.micro_batch_size}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.batch(self.index * self.dp_size + self.dp_rank)
        self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"index": self.index, "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """The position is global: index x dp_size micro-batches taken by all ranks together, so a
        cursor saved at one data-parallel size continues at another where that count divides."""
        if state["seed"] != self.seed:
            raise ValueError(f"synthetic stream cursor is for seed={state['seed']}; this run has seed={self.seed}")
        taken = state["index"] * state["dp_size"]
        if taken % self.dp_size:
            raise ValueError(f"synthetic stream cursor: {taken} micro-batches taken (index {state['index']} x "
                             f"dp_size {state['dp_size']}) do not split over dp_size={self.dp_size}")
        self.index = taken // self.dp_size


def synthetic_val_batches(vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                          seed: int, n_batches: int = 4) -> dict[str, list[dict]]:
    s = SyntheticStream(vocab_size, seq_len, micro_batch_size, dp_rank, dp_size, seed, split="val")
    return {"synthetic": [next(s) for _ in range(n_batches)]}
