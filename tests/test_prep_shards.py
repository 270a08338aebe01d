"""data_prep shards/tokenizer/inspect/sample: what the shards hold, errors, resuming."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import webdataset as wds
import zstandard
from data_fixtures import SHARD_WINDOWS, VOCAB, WINDOW, built, texts_for, write_zst_jsonl  # noqa: F401 (built: fixture)

from data_prep import pack
from data_prep.__main__ import main
from data_prep.readers import CorruptFileError, DataError, FileReader, Doc
from data_prep.shards import _is_val, build_shards
from data_prep.sources import expand_sources
from data_prep.tokenizer import train_tokenizer
from retnet_train.data import DataConfig, SourceConfig, TokenStream, read_vocab_size
from retnet_train.data.tokenizer import file_sha256

SOURCES = ("pile", "c4", "stack")


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".tar", ".npy")}


def test_manifest_describes_the_shards(built):
    sha = file_sha256(built.tokenizer)
    for s in SOURCES:
        m = json.loads((built.shards / s / "manifest.json").read_text())
        assert m["complete"] and m["source"] == s
        assert m["tokenizer"]["sha256"] == sha
        assert m["tokenizer"]["vocab_size"] == 512 and m["tokenizer"]["n_pieces"] == VOCAB
        assert (m["window"], m["stored_window"], m["dtype"]) == (WINDOW, WINDOW + 1, "uint16")
        assert m["documents"] == len(built.corpus.docs[s]) and m["skipped_count"] == 0
        assert 0 < m["val_documents"] < m["documents"]
        assert m["tokens"] == WINDOW * sum(x["samples"] for x in m["shards"])
        assert [i["file"] for i in m["inputs"]] == built.corpus.files[s]
        for x in m["shards"] + m["val_shards"]:
            assert 0 < x["samples"] <= SHARD_WINDOWS and x["tokens"] == x["samples"] * WINDOW
            with_wds = list(wds.WebDataset(str(built.shards / s / x["path"]), shardshuffle=False))
            assert len(with_wds) == x["samples"]


def test_windows_hold_every_document_with_bos_eos(built):
    sp = spm.SentencePieceProcessor(model_file=built.tokenizer)
    bos, eos = sp.bos_id(), sp.eos_id()
    for s in SOURCES:
        m = json.loads((built.shards / s / "manifest.json").read_text())
        for fi, path in enumerate(built.corpus.files[s]):
            train_docs = [r.text for r in FileReader(path) if isinstance(r, Doc)
                          and not _is_val(path, r.line, m["val_fraction"])]
            expected = np.concatenate([[bos] + sp.encode(d) + [eos] for d in train_docs])
            shards = [x["path"] for x in m["shards"] if x["path"].startswith(f"train/{s}-{fi:05d}-")]
            wins = [smp for p in shards for smp in
                    wds.WebDataset(str(built.shards / s / p), shardshuffle=False).decode()]
            stream = np.concatenate([w["tokens.npy"][:WINDOW] for w in wins])
            # nothing lost but the tail that does not fill a window
            assert np.array_equal(stream, expected[: len(stream)])
            assert 0 <= len(expected) - len(stream) < WINDOW
            for i, w in enumerate(wins):
                toks = w["tokens.npy"]
                assert toks.dtype == np.uint16 and len(toks) == WINDOW + 1
                # the lookahead token is the next window's first token
                nxt = wins[i + 1]["tokens.npy"][0] if i + 1 < len(wins) else expected[len(stream)] \
                    if len(expected) > len(stream) else sp.pad_id()
                assert toks[WINDOW] == nxt
                assert list(w["doc_starts.npy"]) == list(np.flatnonzero(toks[:WINDOW] == bos))
            decoded = sp.decode(stream.tolist())
            assert decoded.startswith(train_docs[0][:50])


def test_tokenizer_settings(built):
    sp = spm.SentencePieceProcessor(model_file=built.tokenizer)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    src = "def f(x):\n    if x:\n\t\treturn  x   *  2  # two spaces\n\n\n    return 0\n"
    assert sp.decode(sp.encode(src)) == src  # identity normalisation, whitespace kept
    odd = "naïve 東京 🙂 ©"
    ids = sp.encode(odd)
    assert sp.unk_id() not in ids and sp.decode(ids) == odd  # byte fallback
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
    digits = [sp.id_to_piece(i).lstrip("▁") for i in sp.encode("1234567")]
    assert "".join(digits) == "1234567" and all(len(d) <= 1 for d in digits)
    assert read_vocab_size(built.cfg()) == 512  # 400 pieces padded to a multiple of 128


def test_tokenizer_is_reproducible(built, tmp_path):
    # the shards record the tokenizer's sha256: the same inputs must give the same file
    train_tokenizer(str(tmp_path / "again.model"), VOCAB, expand_sources(built.corpus.specs()),
                    threads=1)
    assert file_sha256(tmp_path / "again.model") == file_sha256(built.tokenizer)


def _one_source_build(tmp_path, built, files, **kw):
    return build_shards(str(tmp_path / "out"), built.tokenizer, WINDOW, {"web": files},
                        workers=0, shard_tokens=WINDOW * 4, val_fraction=0.0, **kw)


def test_bad_records_counted_or_strict(tmp_path, built):
    good = texts_for(6)
    path = tmp_path / "web.jsonl.zst"
    lines = [json.dumps({"text": good[0]}).encode(), b"{not json", json.dumps({"text": None}).encode(),
             json.dumps({"text": good[1]}).encode(), b'{"text": "\xff\xfe"}']
    write_zst_jsonl(path, [], raw_lines=[l + b"\n" for l in lines])
    m = _one_source_build(tmp_path, built, [str(path)])["web"]
    assert m["documents"] == 2 and m["skipped_count"] == 3
    assert [(x["file"], x["line"]) for x in m["skipped"]] == [(str(path), 2), (str(path), 3), (str(path), 5)]
    with pytest.raises(DataError, match=rf"{path.name}:2: bad JSON.*--strict"):
        build_shards(str(tmp_path / "strict"), built.tokenizer, WINDOW, {"web": [str(path)]},
                     workers=0, strict=True)
    rc = main(["shards", "--tokenizer", built.tokenizer, "--seq-len", str(WINDOW), "--strict",
               "--out", str(tmp_path / "cli"), "--workers", "0", f"web={path}"])
    assert rc == 2


def test_corrupt_file_fails_and_finished_shards_stay_valid(tmp_path, built):
    a, b = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    write_zst_jsonl(a, [{"text": t} for t in texts_for(30)])
    write_zst_jsonl(b, [{"text": t} for t in texts_for(30, seed=1)])
    b.write_bytes(b.read_bytes()[:-40])
    with pytest.raises(CorruptFileError, match="b.jsonl.zst"):
        _one_source_build(tmp_path, built, [str(a), str(b)])
    m = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())
    assert not m["complete"] and [i["file"] for i in m["inputs"]] == [str(a)]
    assert m["shards"] and all(x["path"].startswith("train/web-00000-") for x in m["shards"])
    for x in m["shards"]:
        assert len(list(wds.WebDataset(str(tmp_path / "out" / "web" / x["path"]),
                                       shardshuffle=False))) == x["samples"]
    # the stream does not train on an unfinished build
    cfg = DataConfig(sources={"web": SourceConfig(str(tmp_path / "out" / "web"))}, tokenizer=built.tokenizer)
    with pytest.raises(ValueError, match=r"data\.sources\.web\.path: .*'complete' is false"):
        TokenStream(cfg, seq_len=WINDOW, micro_batch_size=2, dp_rank=0, dp_size=1)


def test_interrupted_build_continues(tmp_path, built, monkeypatch):
    specs = expand_sources(built.corpus.specs())
    out = tmp_path / "out"
    pile = built.manifests["pile"]
    file0 = sum(x["samples"] for x in pile["shards"] + pile["val_shards"]
                if "/pile-00000-" in x["path"])
    calls = {"n": 0}
    real_add = pack.ShardWriter.add

    def dying_add(self, *a):
        calls["n"] += 1
        if calls["n"] == file0 + 17:  # mid-shard, in the second input file of pile
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(pack.ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(out), built.tokenizer, WINDOW, specs, workers=0,
                     shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    monkeypatch.setattr(pack.ShardWriter, "add", real_add)
    m = json.loads((out / "pile" / "manifest.json").read_text())
    assert not m["complete"] and len(m["inputs"]) == 1
    for x in m["shards"]:  # everything listed is complete
        assert len(list(wds.WebDataset(str(out / "pile" / x["path"]), shardshuffle=False))) == x["samples"]
    assert list((out / "pile").glob("*/*.tmp*")), "the interrupted shard was being written"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "pile").glob("*/*.tar")}
    assert len(before) > len(m["shards"]) + len(m["val_shards"])  # incl. shards of the unfinished file

    build_shards(str(out), built.tokenizer, WINDOW, specs, workers=0,
                 shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    for p, stat in before.items():  # finished shards were kept, not rewritten
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat
    assert not list(out.rglob("*.tmp*"))
    assert shard_bytes(out) == shard_bytes(built.shards)  # same as a build never interrupted
    for s in SOURCES:
        assert (json.loads((out / s / "manifest.json").read_text())
                == json.loads((built.shards / s / "manifest.json").read_text()))
    with pytest.raises(DataError, match="window"):  # other arguments, same --out: refused
        build_shards(str(out), built.tokenizer, 2 * WINDOW, specs, workers=0)


def test_worker_processes_give_the_same_shards(tmp_path, built):
    specs = expand_sources(built.corpus.specs())
    build_shards(str(tmp_path / "w2"), built.tokenizer, WINDOW, specs, workers=2,
                 shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    assert shard_bytes(tmp_path / "w2") == shard_bytes(built.shards)


def test_inspect_prints_summary_and_text(built, capsys):
    assert main(["inspect", str(built.shards)]) == 0
    out = capsys.readouterr().out
    for s in SOURCES:
        m = json.loads((built.shards / s / "manifest.json").read_text())
        assert f"== {s}" in out and f"{m['documents']} documents" in out
    assert "Document 0." in out  # the first pile window, decoded


@pytest.mark.parametrize("window", ["-1", "999999"])
def test_inspect_names_a_window_past_the_shard(built, capsys, window):
    assert main(["inspect", str(built.shards), "--window", window]) == 2
    err = capsys.readouterr().err
    assert f"error: --window {window}: " in err and "windows (0 to" in err and "Traceback" not in err


def test_sample_writes_the_three_layouts(tmp_path):
    assert main(["sample", str(tmp_path)]) == 0
    specs = expand_sources([f"pile={tmp_path}/pile/*.jsonl.zst", f"c4={tmp_path}/c4/c4-*.json.gz",
                            f"stack={tmp_path}/stack/data/python/*.parquet"])
    total = 0
    for files in specs.values():
        assert len(files) == 2
        for f in files:
            recs = list(FileReader(f))
            assert len(recs) > 20 and all(isinstance(r, Doc) for r in recs)
            total += os.path.getsize(f)
    pile = Path(specs["pile"][0]).read_bytes()
    assert zstandard.get_frame_parameters(pile).window_size == 2**31
    assert 0.5e6 < total < 5e6  # "a few MB raw" (compressed here)


def test_shard_records_carry_size_and_sha256(built):
    for s in SOURCES:
        m = json.loads((built.shards / s / "manifest.json").read_text())
        for x in m["shards"] + m["val_shards"]:
            path = built.shards / s / x["path"]
            assert x["bytes"] == path.stat().st_size and x["sha256"] == file_sha256(path)


def test_rerun_adds_checksums_to_an_older_build(tmp_path, built):
    """A build from a data_prep that did not record bytes/sha256: rerunning the same command
    hashes the existing shards (encoding nothing) and gives the manifest of a fresh build."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(built.shards, out)
    for f in list(out.glob("*/parts/*.json")) + list(out.glob("*/manifest.json")):
        rec = json.loads(f.read_text())
        for x in rec["shards"] + rec["val_shards"]:
            del x["bytes"], x["sha256"]
        f.write_text(json.dumps(rec))
    from retnet_train.data.manifest import load_manifest
    old = load_manifest(out / "c4")  # still loadable, without the checksums
    assert old.shards and all(sh.bytes is None and sh.sha256 is None for sh in old.shards)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/*.tar")}
    build_shards(str(out), built.tokenizer, WINDOW, expand_sources(built.corpus.specs()), workers=0,
                 shard_tokens=WINDOW * SHARD_WINDOWS, val_fraction=0.15)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/*.tar")} == before  # not rewritten
    for s in SOURCES:
        assert (json.loads((out / s / "manifest.json").read_text())
                == json.loads((built.shards / s / "manifest.json").read_text()))


def test_source_without_any_document_fails(tmp_path, built):
    """Empty files, or records without the text field: exit 2 naming each such source and
    why, and a manifest the trainer refuses; the other sources are built."""
    import subprocess
    import sys
    good = tmp_path / "good.jsonl.zst"
    write_zst_jsonl(good, [{"text": t} for t in texts_for(20)])
    (tmp_path / "empty.jsonl").write_text("")
    nofield = tmp_path / "nofield.jsonl.zst"
    write_zst_jsonl(nofield, [{"content": t} for t in texts_for(5)])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "data_prep", "shards", "--tokenizer", built.tokenizer,
                        "--seq-len", str(WINDOW), "--out", str(out), "--workers", "0",
                        f"good={good}", f"empty={tmp_path / 'empty.jsonl'}", f"nofield={nofield}"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    errors = r.stderr[r.stderr.index("error: "):].splitlines()
    assert errors == [
        f"error: source empty: no document in its 1 input file(s) ({tmp_path / 'empty.jsonl'}): "
        "the files hold no record at all (empty?); check the glob and --text-field",
        f"source nofield: no document in its 1 input file(s) ({nofield}): all 5 records were "
        f"skipped, the first: {nofield}:1: field 'text' is missing, not a string; {nofield}:2: "
        f"field 'text' is missing, not a string; {nofield}:3: field 'text' is missing, not a "
        "string; check the glob and --text-field"]
    from retnet_train.data.manifest import load_manifest
    assert load_manifest(out / "good").shards
    for s in ("empty", "nofield"):
        m = json.loads((out / s / "manifest.json").read_text())
        assert m["complete"] is False and m["error"].startswith(f"source {s}: no document")
        with pytest.raises(DataError, match=rf"manifest\.json: key 'complete' is false: source {s}: "
                                            "no document in its 1 input file"):
            load_manifest(out / s)


def test_tokenizer_vocab_size_checked_before_sampling(tmp_path, built, capsys, monkeypatch):
    import data_prep.tokenizer as tokenizer
    monkeypatch.setattr(tokenizer, "sample_docs", lambda *a, **k: pytest.fail("sampled before the check"))
    out = tmp_path / "sub" / "tok.model"
    for bad in ("0", "-3"):
        rc = main(["tokenizer", "--out", str(out), "--vocab-size", bad, *built.corpus.specs()])
        assert rc == 2
        assert capsys.readouterr().err.strip() == f"error: --vocab-size must be at least 1, got {bad}"
    assert not out.parent.exists()


def test_sentencepiece_error_is_one_line_exit_2(tmp_path, built, capsys):
    # a vocabulary too small for the byte-fallback pieces: sentencepiece's own RuntimeError
    rc = main(["tokenizer", "--out", str(tmp_path / "tok.model"), "--vocab-size", "5",
               "--sample-docs", "10", *built.corpus.specs()])
    assert rc == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the sampling bar
    assert last.startswith("error: ") and "Increase vocab_size" in last and "Traceback" not in err
    assert not (tmp_path / "tok.model").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--shard-tokens", "-5", f"--shard-tokens must be at least --seq-len ({WINDOW}: one window a shard), got -5"),
    ("--shard-tokens", str(WINDOW - 1), f"--shard-tokens must be at least --seq-len ({WINDOW}: one window a "
                                        f"shard), got {WINDOW - 1}"),
    ("--workers", "-1", "--workers must be >= 0 (0: encode in this process), got -1"),
])
def test_bad_shards_flags_fail_before_any_output(tmp_path, built, capsys, flag, value, message):
    out = tmp_path / "out"
    rc = main(["shards", "--tokenizer", built.tokenizer, "--seq-len", str(WINDOW), "--out", str(out),
               flag, value, *built.corpus.specs()])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not out.exists()  # not even build.json
