"""Facts about a sentencepiece tokenizer that both data_prep and the stream rely on."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

VOCAB_MULTIPLE = 128  # tensor-parallel vocab splits and tensor cores want multiples of 128


def padded_vocab_size(n_pieces: int) -> int:
    return -(-n_pieces // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    n_pieces: int      # pieces in the sentencepiece model
    vocab_size: int    # n_pieces padded to a multiple of 128: the model's embedding rows
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


def load_tokenizer(path: str | Path):
    """Return (SentencePieceProcessor, TokenizerInfo); a clear error if the file is unusable."""
    import sentencepiece as spm
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path} (run `make sample-data` or "
                                "`python -m data_prep tokenizer ...`)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a sentencepiece model: {e}") from e
    for name, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        if tid < 0:
            raise ValueError(f"{path}: tokenizer has no {name} id; train it with data_prep tokenizer")
    n = sp.get_piece_size()
    info = TokenizerInfo(str(path), file_sha256(path), n, padded_vocab_size(n),
                         sp.bos_id(), sp.eos_id(), sp.pad_id())
    return sp, info
