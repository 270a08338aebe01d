"""`python -m data_prep inspect DIR`: summary of a shard manifest and one window decoded."""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.readers import DataError
from retnet_train.data.manifest import load_manifest
from retnet_train.data.shard_reader import ShardReader
from retnet_train.data.tokenizer import load_tokenizer


def inspect_dir(directory: str, window_index: int = 0, tokenizer: str | None = None) -> str:
    d = Path(directory)
    dirs = [d] if (d / "manifest.json").exists() else sorted(p.parent for p in d.glob("*/manifest.json"))
    if not dirs:
        raise FileNotFoundError(f"no manifest.json in {d} or its subdirectories")
    lines = []
    for sd in dirs:
        m = load_manifest(sd)
        r = m.raw
        n_train = sum(s.samples for s in m.shards)
        n_val = sum(s.samples for s in m.val_shards)
        lines += [f"== {m.source} ({sd})",
                  f"window {m.window} tokens, {m.dtype}, vocabulary {m.vocab_size}, "
                  f"tokenizer sha256 {m.tokenizer_sha256[:12]}",
                  f"{r['documents']} documents from {len(r['inputs'])} files, "
                  f"{r['skipped_count']} records skipped, {r['tokens_dropped']} tokens dropped",
                  f"train: {len(m.shards)} shards, {n_train} windows, {r['tokens']} tokens",
                  f"val:   {len(m.val_shards)} shards, {n_val} windows, {r['val_tokens']} tokens"]
        for s in r["skipped"][:5]:
            lines.append(f"  skipped {s['file']}:{s['line']}: {s['reason']}")
        tok_path = tokenizer or r["tokenizer"]["path"]
        if m.shards and not Path(tok_path).exists():
            lines.append(f"(tokenizer {tok_path} not found: pass --tokenizer to decode a window)")
        elif m.shards:
            sp, _ = load_tokenizer(tok_path)
            reader = ShardReader(m.shards[0].path, m.window + 1, m.dtype)
            count = len(reader)
            if not 0 <= window_index < count:  # it used to decode the last window under this window's name
                reader.close()
                raise DataError(f"--window {window_index}: {m.shards[0].path} has {count} windows "
                                f"(0 to {count - 1})")
            ids = reader.read(window_index)[:-1].tolist()
            reader.close()
            lines.append(f"window {window_index} of {m.shards[0].path.name}, decoded:")
            lines.append(json.dumps(sp.decode(ids))[:2000])
    return "\n".join(lines)
