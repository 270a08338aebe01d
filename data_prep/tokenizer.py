"""`python -m data_prep tokenizer`: train a sentencepiece BPE model on documents drawn
across the sources, with the settings LLM pretraining needs."""
from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from data_prep.readers import DataError, Doc, FileReader
from retnet_train.data.tokenizer import VOCAB_MULTIPLE, load_tokenizer
from retnet_train.progress import Bar

log = logging.getLogger("data_prep.tokenizer")
# sentencepiece silently drops training "sentences" longer than max_sentence_length bytes,
# so documents are cut into pieces of at most this many bytes, at line ends where possible.
MAX_PIECE_BYTES = 8192


def _chunks(text: str) -> Iterator[str]:
    """While the rest of `text` is over MAX_PIECE_BYTES of UTF-8, cut off its first span of
    MAX_PIECE_BYTES // 4 characters (4 bytes a character at worst), after the span's last
    newline if it has one past its first character; then the rest.  Linear time: the rest is
    a position, not a copy, and its byte length is kept by subtracting each piece's."""
    span = MAX_PIECE_BYTES // 4
    pos, rest_bytes = 0, len(text.encode("utf-8"))
    while rest_bytes > MAX_PIECE_BYTES:
        nl = text.rfind("\n", pos, pos + span)
        cut = nl + 1 if nl > pos else pos + span  # a newline at the span's start: no cut there
        piece = text[pos:cut]
        yield piece
        rest_bytes -= len(piece.encode("utf-8"))
        pos = cut
    if pos < len(text):
        yield text[pos:]


def sample_docs(sources: dict[str, list[str]], n_docs: int, text_field: str | None,
                on_doc: Optional[Callable[[], None]] = None) -> Iterator[str]:
    """About n_docs documents, an equal share from every source and, within a source, from
    every file (taken from the head of each file, so a huge corpus is not read whole)."""
    for name, files in sources.items():
        per_file = max(1, n_docs // len(sources) // len(files))
        got = 0
        for path in files:
            taken = 0
            for rec in FileReader(path, text_field):
                if isinstance(rec, Doc):
                    yield from _chunks(rec.text)
                    taken += 1
                    if on_doc is not None:
                        on_doc()
                    if taken >= per_file:
                        break
            got += taken
        log.info("tokenizer sample: %d documents from %s (%d files)", got, name, len(files))


def _sample_with_progress(sources: dict[str, list[str]], n_docs: int, text_field: str | None,
                          vocab_size: int) -> Iterator[str]:
    """sample_docs with a bar over the documents read. sentencepiece pulls this iterator, then
    trains in one call that reports nothing: the end of the sample is the only moment we can
    say that the (long, silent) BPE phase begins."""
    with Bar("tokenizer sample", total=n_docs, unit="docs") as bar:
        yield from sample_docs(sources, n_docs, text_field, on_doc=bar.update)
    log.info("training sentencepiece BPE, %d pieces (it logs nothing until done) ...", vocab_size)


def train_tokenizer(out: str, vocab_size: int, sources: dict[str, list[str]], *,
                    sample_docs_n: int = 100_000, text_field: str | None = None,
                    threads: int | None = None) -> None:
    import sentencepiece as spm
    if vocab_size < 1:  # before sampling: sentencepiece would only refuse it after reading the sample
        raise DataError(f"--vocab-size must be at least 1, got {vocab_size}")
    if vocab_size % VOCAB_MULTIPLE:
        log.warning("vocab size %d is padded to a multiple of %d for the model's embedding",
                    vocab_size, VOCAB_MULTIPLE)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log.info("sampling about %d documents for a sentencepiece BPE of %d pieces", sample_docs_n, vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sample_with_progress(sources, sample_docs_n, text_field, vocab_size),
            model_writer=model,  # not model_prefix: a path would be stored in the model, and hashed
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,                # any byte is representable: no <unk> in practice
            split_digits=True,                 # numbers as digits: better arithmetic
            normalization_rule_name="identity",  # text goes in and comes out unchanged
            remove_extra_whitespaces=False,    # code keeps its indentation
            allow_whitespace_only_pieces=True,  # so runs of spaces become single pieces
            split_by_whitespace=True,
            character_coverage=0.9995,
            max_sentence_length=MAX_PIECE_BYTES,
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece's own refusal of the settings or the sample: one line
        raise DataError(f"sentencepiece: {e}") from None
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)  # atomic: a half-written model is never seen
    _, info = load_tokenizer(out_path)
    log.info("wrote %s in %.0f s: %d pieces, model vocabulary %d, sha256 %s", out_path,
             time.monotonic() - t0, info.n_pieces, info.vocab_size, info.sha256[:12])
