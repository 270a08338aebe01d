"""Command line: python -m data_prep {sample,tokenizer,shards,inspect,verify} ... (see docs/data.md)."""
from __future__ import annotations

import argparse
import logging
import sys

from data_prep.readers import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample", help="write small raw corpora (Pile, C4, Stack layouts)")
    s.add_argument("out_dir")
    s.add_argument("--site-packages", type=float, default=0, metavar="MB",
                   help="also up to MB megabytes from the installed packages' .py files")

    t = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer")
    t.add_argument("--out", required=True, help="path of the .model file to write")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--sample-docs", type=int, default=100_000, help="documents to train on")
    t.add_argument("--text-field", default=None, help="JSON key / parquet column of the text")
    t.add_argument("sources", nargs="+", metavar="SOURCE=GLOB")

    h = sub.add_parser("shards", help="encode and pack into webdataset shards")
    h.add_argument("--tokenizer", required=True)
    h.add_argument("--seq-len", type=int, required=True, help="window length in tokens")
    h.add_argument("--out", required=True)
    h.add_argument("--workers", type=int, default=1, help="encoding processes (0: in-process)")
    h.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    h.add_argument("--val-fraction", type=float, default=0.005, help="documents held out")
    h.add_argument("--text-field", default=None)
    h.add_argument("--strict", action="store_true", help="a malformed record is an error")
    h.add_argument("sources", nargs="+", metavar="SOURCE=GLOB")

    i = sub.add_parser("inspect", help="summarise manifests and decode a window")
    i.add_argument("dir")
    i.add_argument("--window", type=int, default=0, help="which window of the first shard to decode")
    i.add_argument("--tokenizer", default=None, help="default: the path in the manifest")

    v = sub.add_parser("verify", help="check every shard against its manifest (exit 2 if bad)")
    v.add_argument("dir", help="a source directory, or a directory of them")
    v.add_argument("--full", action="store_true", help="also the sha256 of every shard (reads all)")
    v.add_argument("--tokenizer", default=None, help="default: the path in the manifest")
    v.add_argument("--seq-len", type=int, default=None,
                   help="training sample length to check for (default: the window)")

    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if a.cmd == "sample":
            from data_prep.sample import write_sample
            write_sample(a.out_dir, a.site_packages)
        elif a.cmd == "tokenizer":
            from data_prep.sources import expand_sources
            from data_prep.tokenizer import train_tokenizer
            train_tokenizer(a.out, a.vocab_size, expand_sources(a.sources),
                            sample_docs_n=a.sample_docs, text_field=a.text_field)
        elif a.cmd == "shards":
            from data_prep.shards import build_shards
            from data_prep.sources import expand_sources
            build_shards(a.out, a.tokenizer, a.seq_len, expand_sources(a.sources),
                         workers=a.workers, shard_tokens=a.shard_tokens,
                         val_fraction=a.val_fraction, text_field=a.text_field, strict=a.strict)
        elif a.cmd == "verify":
            from data_prep.verify_cmd import verify_dir
            print(verify_dir(a.dir, a.full, a.tokenizer, a.seq_len))
        else:
            from data_prep.inspect_cmd import inspect_dir
            print(inspect_dir(a.dir, a.window, a.tokenizer))
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
