"""TokenStream: mixture, determinism, exact resume (also at another data-parallel size),
tensor-parallel ranks, sequence lengths beyond the window, epochs, validation batches."""
from __future__ import annotations

import itertools
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import WINDOW, built  # noqa: F401 (built: fixture)
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from retnet_train.data import DataConfig, SourceConfig, TokenStream, build_val_batches
from retnet_train.data.manifest import load_manifest
from retnet_train.data.mixture import Mixture
from retnet_train.data.shard_reader import ShardReader
from retnet_train.data.source import SourceSampler

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pile", "c4", "stack")


def take(stream, n, it=None):
    return list(itertools.islice(it if it is not None else iter(stream), n))


def rows(batches) -> list[bytes]:
    return [r.numpy().tobytes() for b in batches for r in b["input_ids"]]


def stream(built, seq_len=WINDOW, b=4, rank=0, dp=1, **kw):
    return TokenStream(built.cfg(**kw), seq_len=seq_len, micro_batch_size=b, dp_rank=rank, dp_size=dp)


def shard_streams(built, split="shards"):
    """source -> list of each shard's whole token stream (windows joined, last lookahead kept)."""
    out = {}
    for s in SOURCES:
        m = load_manifest(built.shards / s)
        out[s] = []
        for sh in getattr(m, split):
            r = ShardReader(sh.path, WINDOW + 1, m.dtype)
            wins = [r.read(i) for i in range(len(r))]
            out[s].append(np.concatenate([w[:WINDOW] for w in wins] + [wins[-1][WINDOW:]]).astype(np.int64))
            r.close()
    return out


def test_batch_fields_and_labels(built):
    s = stream(built, b=8)
    assert s.source_names == list(SOURCES)
    b = take(s, 20)
    pad_bos = load_manifest(built.shards / "pile")
    for x in b:
        ids, lab = x["input_ids"], x["labels"]
        assert ids.shape == lab.shape == (8, WINDOW) and ids.dtype == lab.dtype == torch.int64
        assert x["source"].shape == (8,) and set(x["source"].tolist()) <= {0, 1, 2}
        assert torch.equal(lab[:, :-1], ids[:, 1:])  # labels[t] is the token after input_ids[t]
        assert not (lab[:, :-1] == -100).any()       # -100 only where the next token is unknown
        assert torch.equal(x["doc_starts"], ids == pad_bos.bos_id)
        assert int(ids.max()) < 400


def test_mixture_proportions_are_the_weights(built):
    mix = Mixture([5, 3, 2], seed=7)
    g = np.arange(50_000)
    src, k = mix.lookup(g)
    share = np.bincount(src, minlength=3) / len(g)
    assert np.allclose(share, [0.5, 0.3, 0.2], atol=1e-3)
    for s in range(3):  # each source's samples are numbered 0, 1, 2, ... with no gap
        assert np.array_equal(np.sort(k[src == s]), np.arange((src == s).sum()))
    sub = np.array([49_999, 3, 4096, 12_345, 0])  # random access agrees with the sequence
    assert [tuple(map(int, v)) for v in zip(*mix.lookup(sub))] == [(int(src[i]), int(k[i])) for i in sub]
    s = stream(built, b=16, weights=(0.2, 0.2, 0.6))
    seen = torch.cat([x["source"] for x in take(s, 256)]).numpy()
    assert np.allclose(np.bincount(seen, minlength=3) / len(seen), [0.2, 0.2, 0.6], atol=0.01)


def test_same_seed_same_batches(built):
    a, b = take(stream(built), 6), take(stream(built, num_workers=2), 6)
    assert rows(a) == rows(b)
    assert all(torch.equal(x["source"], y["source"]) for x, y in zip(a, b))
    assert rows(take(stream(built, seed=99), 6)) != rows(a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(built, workers):
    ref = take(stream(built, dp=2, rank=1), 10)
    s = stream(built, dp=2, rank=1, num_workers=workers)
    it = iter(s)
    first = take(s, 4, it)
    state = s.state_dict()
    # prefetching workers ran ahead; the cursor counts only the 4 batches handed out
    assert state["samples"] == 4 * 4 * 2
    assert rows(first) == rows(ref[:4])
    state = pickle.loads(pickle.dumps(state))
    resumed = stream(built, dp=2, rank=1, num_workers=workers)
    resumed.load_state_dict(state)
    assert rows(take(resumed, 6)) == rows(ref[4:10])
    # loading a cursor into a live iterator restarts it there
    s.load_state_dict(state)
    assert rows(take(s, 2, it)) == rows(ref[4:6])


def test_resume_at_another_data_parallel_size(built):
    b = 4
    reference = rows(take(stream(built, b=b), 12))  # dp=1: the global sample sequence
    dp2 = [stream(built, b=b, rank=r, dp=2) for r in range(2)]
    its2 = [take(s, 3) for s in dp2]
    assert dp2[0].state_dict() == dp2[1].state_dict()
    state = dp2[0].state_dict()
    dp3 = [stream(built, b=b, rank=r, dp=3) for r in range(3)]
    for s in dp3:
        s.load_state_dict(state)
    its3 = [take(s, 2) for s in dp3]
    # global order: step by step, rank by rank
    seen = [r for step in range(3) for rank in range(2) for r in rows([its2[rank][step]])]
    seen += [r for step in range(2) for rank in range(3) for r in rows([its3[rank][step]])]
    assert seen == reference  # 24 + 24 samples: none repeated, none skipped
    assert dp3[0].state_dict()["samples"] == 48


def test_tensor_parallel_ranks_get_the_same_batches(built):
    tp, world = 2, 4
    streams = [stream(built, rank=r // tp, dp=world // tp, num_workers=r % 2 * 2) for r in range(world)]
    got = [rows(take(s, 5)) for s in streams]
    assert got[0] == got[1] and got[2] == got[3]
    assert not set(got[0]) & set(got[2])  # the two data-parallel ranks read different samples


@pytest.mark.parametrize("seq_len", [2 * WINDOW, 3 * WINDOW, WINDOW + WINDOW // 2, WINDOW // 2])
def test_sequence_lengths_other_than_the_window(built, seq_len):
    streams = shard_streams(built)
    bos = load_manifest(built.shards / "pile").bos_id
    batches = take(stream(built, seq_len=seq_len, b=4), 8)
    for x in batches:
        assert x["input_ids"].shape == (4, seq_len)
        for ids, lab, src in zip(x["input_ids"].numpy(), x["labels"].numpy(), x["source"].tolist()):
            # each sample is seq_len consecutive tokens of one shard, at a multiple of seq_len,
            # joined across window boundaries, with the true next tokens as labels
            hits = [(sh, j) for sh, st in enumerate(streams[SOURCES[src]])
                    for j in range((len(st) - 1) // seq_len)
                    if np.array_equal(st[j * seq_len:(j + 1) * seq_len], ids)]
            assert len(hits) >= 1
            sh, j = hits[0]
            nxt = streams[SOURCES[src]][sh][j * seq_len + 1:(j + 1) * seq_len + 1].copy()
            nxt[nxt == 3] = -100  # PAD lookahead at the end of a file
            assert np.array_equal(lab, nxt)
        assert torch.equal(x["doc_starts"], x["input_ids"] == bos)


def test_epochs_visit_every_sample_once_and_never_run_out(built):
    m = load_manifest(built.shards / "stack")  # uneven shards (some not full)
    sampler = SourceSampler(m, 2 * WINDOW, seed=5, index=2)
    n = sampler.per_epoch
    assert n == sum(s.samples * WINDOW // (2 * WINDOW) for s in m.shards)
    e0 = [sampler.locate(k) for k in range(n)]
    e1 = [sampler.locate(k) for k in range(n, 2 * n)]
    assert len(set(e0)) == n and set(e0) == set(e1) and e0 != e1
    # 3 ranks far past an epoch of every source: nobody runs out, all stay in step
    many = [stream(built, seq_len=2 * WINDOW, b=16, rank=r, dp=3) for r in range(3)]
    for s in many:
        got = take(s, 60)
        assert len(got) == 60 and s.state_dict()["samples"] == 60 * 16 * 3
    assert 60 * 16 * 3 * 0.2 > 2 * n


def test_validation_batches(built):
    val = build_val_batches(built.cfg(val_batches=3), seq_len=WINDOW, micro_batch_size=4,
                            dp_rank=0, dp_size=2)
    again = build_val_batches(built.cfg(val_batches=3), seq_len=WINDOW, micro_batch_size=4,
                              dp_rank=0, dp_size=2)
    other = build_val_batches(built.cfg(val_batches=3), seq_len=WINDOW, micro_batch_size=4,
                              dp_rank=1, dp_size=2)
    train_rows = {w[i:i + WINDOW].tobytes() for st in shard_streams(built).values() for w in st
                  for i in range(0, len(w) - WINDOW, WINDOW)}
    val_rows = {w[i:i + WINDOW].tobytes() for st in shard_streams(built, "val_shards").values()
                for w in st for i in range(0, len(w) - WINDOW, WINDOW)}
    assert list(val) == list(SOURCES)
    for i, s in enumerate(SOURCES):
        assert len(val[s]) == 3 and all(x["input_ids"].shape == (4, WINDOW) for x in val[s])
        assert all((x["source"] == i).all() for x in val[s])
        assert rows(val[s]) == rows(again[s])
        assert not set(rows(val[s])) & set(rows(other[s]))
        assert set(rows(val[s])) <= val_rows and not set(rows(val[s])) & train_rows
    none = build_val_batches(built.cfg(val_batches=0), seq_len=WINDOW, micro_batch_size=4,
                             dp_rank=0, dp_size=1)
    assert none == {s: [] for s in SOURCES}


def test_bad_configuration_names_the_key(built, tmp_path):
    with pytest.raises(ValueError, match=r"data\.sources\.c4\.weight"):
        stream(built, weights=(0.5, 0.0, 0.5))
    cfg = built.cfg()
    cfg.sources["pile"].path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.pile\.path.*nowhere"):
        TokenStream(cfg, seq_len=WINDOW, micro_batch_size=2, dp_rank=0, dp_size=1)
    from data_prep.sources import expand_sources
    from data_prep.tokenizer import train_tokenizer
    other = tmp_path / "other.model"
    train_tokenizer(str(other), 384, expand_sources(built.corpus.specs()), sample_docs_n=30, threads=1)
    cfg = built.cfg()
    cfg.tokenizer = str(other)
    with pytest.raises(ValueError, match=r"data\.sources\.pile\.path.*other tokenizer|must be the same file"):
        TokenStream(cfg, seq_len=WINDOW, micro_batch_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="no shard holds even one sample"):
        stream(built, seq_len=1000 * WINDOW)
    with pytest.raises(ValueError, match="dp_rank"):
        stream(built, rank=2, dp=2)
    s = stream(built)
    with pytest.raises(ValueError, match="seq_len"):
        s.load_state_dict({**s.state_dict(), "seq_len": 2 * WINDOW})
    with pytest.raises(ValueError, match="sources"):
        s.load_state_dict({**s.state_dict(), "sources": [["pile", 1.0]]})
    reordered = s.state_dict()["sources"][::-1]  # same weights, other numbering: other data
    with pytest.raises(ValueError, match="sources"):
        s.load_state_dict({**s.state_dict(), "sources": reordered})
    s.load_state_dict({**s.state_dict(), "sources": [tuple(p) for p in s.state_dict()["sources"]]})


@pytest.mark.parametrize("overrides,message", [
    (["data.seed=-1"], "data.seed=-1: must be an integer >= 0"),
    (["data.sources.c4.weight=0.0001", "data.sources.pile.weight=2"],
     "data.sources.c4.weight=0.0001: 4.55e-05 of the total weight 2.2001, below 1/4096: it rounds to no "
     "sample at all; raise it (or remove the source)"),
    (["data.sources.stack.weight=0"], "data.sources.stack.weight=0.0: must be a number > 0"),
])
def test_config_validation_names_the_data_key(overrides, message):
    """Caught when the config is loaded (before the model is built), naming key and value; the
    TokenStream's own check (data.config.validate) is the same."""
    from retnet_train.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(["trainer.data_source=stream", "data=sample", *overrides])
    assert str(e.value) == message


def test_mixture_share_below_a_block_names_the_source(built):
    with pytest.raises(ValueError, match=r"^data\.sources\.c4\.weight=0\.0001: .* below 1/4096"):
        stream(built, weights=(2, 0.0001, 0.2))
    with pytest.raises(ValueError, match=r"^data\.seed=-1: must be an integer >= 0"):
        stream(built, seed=-1)


def test_yaml_configs_match_the_schema():
    schema = OmegaConf.structured(DataConfig)
    sample = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(REPO / "conf/data/sample.yaml")))
    assert sample.tokenizer == "data/sample/tokenizer.model"
    assert {k: (v.path, v.weight) for k, v in sample.sources.items()} == {
        "pile": ("data/sample/shards/pile", 0.5), "c4": ("data/sample/shards/c4", 0.3),
        "stack": ("data/sample/shards/stack", 0.2)}
    prod = OmegaConf.merge(schema, OmegaConf.load(REPO / "conf/data/pile_c4_stack.yaml"),
                           OmegaConf.from_dotlist(["root=/lustre/x"]))
    prod = OmegaConf.to_object(prod)
    assert prod.tokenizer == "/lustre/x/tokenizer.model"
    assert prod.sources["stack"].path == "/lustre/x/shards/stack"
    with pytest.raises(ConfigKeyError, match="Key 'wieght' not in 'SourceConfig'"):  # a misspelt key is refused
        OmegaConf.merge(schema, {"sources": {"pile": {"wieght": 1.0}}})


def test_loader_workers_die_with_a_killed_trainer(built, tmp_path):
    """SIGKILL of the process iterating the stream takes its loader workers with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "reader.py"
    cfg = built.cfg(num_workers=2)
    script.write_text(
        "import multiprocessing, time\n"
        "from retnet_train.data import DataConfig, SourceConfig, TokenStream\n"
        f"cfg = DataConfig(sources={{n: SourceConfig(path=p, weight=1.0) for n, p in "
        f"{ {n: s.path for n, s in cfg.sources.items()} !r}.items()}}, tokenizer={cfg.tokenizer!r}, num_workers=2)\n"
        f"s = TokenStream(cfg, seq_len={WINDOW}, micro_batch_size=2, dp_rank=0, dp_size=1)\n"
        "it = iter(s); next(it)\n"
        "print(' '.join(str(c.pid) for c in multiprocessing.active_children()), flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and "Z" not in
                 open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"loader workers outlived the killed trainer: {alive}"


def _copy_with_bad_token(built, tmp_path, split="shards", shard=2, window=5, pos=7, value=450):
    """A copy of the stack source with one token id >= the tokenizer's 400 pieces (but below
    the padded 512 rows: the embedding would take it silently)."""
    import json
    import shutil
    src = tmp_path / "stack"
    shutil.copytree(built.shards / "stack", src)
    path = src / json.loads((src / "manifest.json").read_text())[split][shard]["path"]
    off = int(np.load(path.with_name(path.name[:-4] + ".idx.npy"))[window]) + 2 * pos
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(np.uint16(value).tobytes())
    cfg = DataConfig(sources={"stack": SourceConfig(path=str(src))}, tokenizer=built.tokenizer)
    return cfg, path


@pytest.mark.parametrize("workers,seq_len,pos,window", [
    (0, WINDOW, 7, 5), (1, WINDOW, 7, 5),
    (0, 2 * WINDOW, 0, 5),  # samples join windows 4+5: the first token of 5 is 5's own
    (1, WINDOW // 2, 31, 5)])
def test_out_of_vocabulary_token_names_shard_and_window(built, tmp_path, workers, seq_len, pos, window):
    from retnet_train.data import DataError
    cfg, path = _copy_with_bad_token(built, tmp_path, pos=pos, window=window)
    cfg.num_workers = workers
    s = TokenStream(cfg, seq_len=seq_len, micro_batch_size=4, dp_rank=0, dp_size=1)
    with pytest.raises(DataError) as e:
        take(s, 200)  # more than an epoch of the source
    # the trainer gets the worker's one line, not a traceback wrapped in text
    assert str(e.value) == (f"{path}: window {window}: token id 450 is not below the "
                            "tokenizer's 400 pieces (a corrupt shard?)")


def test_out_of_vocabulary_token_in_validation(built, tmp_path):
    from retnet_train.data import DataError
    cfg, path = _copy_with_bad_token(built, tmp_path, split="val_shards", shard=0, window=1)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: window 1: token id 450 "):
        build_val_batches(cfg, seq_len=WINDOW, micro_batch_size=4, dp_rank=0, dp_size=1)


def test_loader_workers_ignore_termination_signals(built):
    """A cluster's SIGTERM (or a ^C) goes to the whole process group: the workers must let the
    trainer handle it and keep serving batches while it saves its checkpoint."""
    import os
    import signal
    import time

    import psutil

    me = psutil.Process(os.getpid())
    before = {c.pid for c in me.children()}
    s = stream(built, num_workers=1, prefetch=1)
    ref = rows(take(stream(built), 1600))
    it = iter(s)
    got = take(s, 1, it)
    workers = [c for c in me.children() if c.pid not in before]
    assert len(workers) == 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.kill(workers[0].pid, sig)
    time.sleep(0.5)
    assert workers[0].is_running() and workers[0].status() != psutil.STATUS_ZOMBIE
    # 512 steps a message and one message in flight: most of these are made after the signals
    got += take(s, 1599, it)
    assert rows(got) == ref
