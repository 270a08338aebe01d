"""Raw formats are read as written, bad records are skipped and counted, broken files fail
with their name."""
from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from data_fixtures import _words, code, prose, write_c4, write_stack, write_zst_jsonl

from data_prep.readers import CorruptFileError, DataError, Doc, FileReader, Skip, file_format
from data_prep.sources import expand_sources


def texts(n, seed=0):
    rng = random.Random(seed)
    words = _words(rng, 50)
    return [prose(rng, words, i) for i in range(n)]


def docs_of(path, field=None):
    return [r.text for r in FileReader(str(path), field) if isinstance(r, Doc)]


def test_pile_long_window_zstd(tmp_path):
    t = texts(30)
    path = tmp_path / "pile" / "00.jsonl.zst"
    write_zst_jsonl(path, [{"text": x, "meta": {"pile_set_name": "ArXiv"}} for x in t])
    # the frame really declares a 2 GiB window: a default decoder refuses it
    assert zstandard.get_frame_parameters(path.read_bytes()).window_size == 2**31
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(path.read_bytes())
    assert docs_of(path) == t


def test_zstd_concatenated_frames(tmp_path):
    t = texts(10)
    a, b = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    write_zst_jsonl(a, [{"text": x} for x in t[:4]])
    write_zst_jsonl(b, [{"text": x} for x in t[4:]])
    both = tmp_path / "ab.jsonl.zst"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    assert docs_of(both) == t


def test_c4_gzip_with_string_and_number_timestamps(tmp_path):
    t = texts(25)
    path = tmp_path / "c4" / "c4-train.00000-of-01024.json.gz"
    write_c4(path, t)
    stamps = {type(json.loads(l)["timestamp"]) for l in gzip.open(path, "rt")}
    assert stamps == {str, int}
    assert docs_of(path) == t


def test_stack_parquet_content_column(tmp_path):
    rng = random.Random(1)
    t = [code(rng, _words(rng, 20), i) for i in range(70)]  # > one record batch of 16 rows
    path = tmp_path / "stack" / "data" / "python" / "train-00000-of-00001.parquet"
    write_stack(path, t)
    assert "content" in pq.read_schema(path).names
    assert docs_of(path) == t  # indentation and newlines intact


def test_other_corpora_with_text_field(tmp_path):
    t = texts(12)
    slim = tmp_path / "slimpajama.jsonl"
    slim.write_text("".join(json.dumps({"text": x, "meta": {"redpajama_set_name": "X"}}) + "\n" for x in t))
    web = tmp_path / "fineweb.parquet"
    pq.write_table(pa.table({"text": t, "id": list(range(12))}), web)
    body = tmp_path / "custom.jsonl.gz"
    with gzip.open(body, "wt") as f:
        f.writelines(json.dumps({"body": x}) + "\n" for x in t)
    assert docs_of(slim) == t
    assert docs_of(web) == t
    assert docs_of(body, "body") == t
    # without --text-field the default key is missing: every record is a counted skip
    recs = list(FileReader(str(body)))
    assert len(recs) == 12 and all(isinstance(r, Skip) and "'text'" in r.reason for r in recs)
    with pytest.raises(DataError, match="no text column 'body'"):
        list(FileReader(str(web), "body"))


def test_bad_records_are_skipped_with_line_numbers(tmp_path):
    t = texts(4)
    path = tmp_path / "bad.jsonl.zst"
    lines = [json.dumps({"text": t[0]}).encode(),
             b'{"text": "unterminated',                 # line 2: bad JSON
             json.dumps({"text": None}).encode(),        # line 3: null text
             b'{"text": "caf\xe9 latin-1"}',             # line 4: undecodable bytes
             json.dumps({"meta": {}}).encode(),          # line 5: no text field
             json.dumps({"text": t[1]}).encode(),
             json.dumps([1, 2]).encode(),                # line 7: not an object
             json.dumps({"text": t[2]}).encode()]
    write_zst_jsonl(path, [], raw_lines=[l + b"\n" for l in lines])
    recs = list(FileReader(str(path)))
    assert [r.text for r in recs if isinstance(r, Doc)] == [t[0], t[1], t[2]]
    skips = [(r.line, r.reason.split(":")[0].split(" ")[0]) for r in recs if isinstance(r, Skip)]
    assert [line for line, _ in skips] == [2, 3, 4, 5, 7]
    assert all(r.file == str(path) for r in recs if isinstance(r, Skip))
    assert "undecodable" in next(r.reason for r in recs if isinstance(r, Skip) and r.line == 4)


@pytest.mark.parametrize("kind", ["zst", "gz", "parquet"])
def test_truncated_file_fails_with_its_name(tmp_path, kind):
    t = texts(200)
    if kind == "zst":
        path = tmp_path / "x.jsonl.zst"
        write_zst_jsonl(path, [{"text": x} for x in t])
    elif kind == "gz":
        path = tmp_path / "c4-x.json.gz"
        write_c4(path, t)
    else:
        path = tmp_path / "x.parquet"
        write_stack(path, t)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptFileError, match=str(path.name)):
        list(FileReader(str(path)))


def test_format_from_name_and_source_specs(tmp_path):
    assert file_format("a/c4-train.00001-of-01024.json.gz") == "jsonl.gz"
    assert file_format("x/train-0.parquet") == "parquet"
    with pytest.raises(DataError, match="cannot tell the format"):
        file_format("notes.txt")
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    assert expand_sources([f"web={tmp_path}/*.jsonl"]) == {
        "web": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]}
    with pytest.raises(DataError, match="no file matches"):
        expand_sources([f"web={tmp_path}/*.parquet"])
    with pytest.raises(DataError, match="NAME=GLOB"):
        expand_sources([f"{tmp_path}/*.jsonl"])
