"""Document boundaries in packed windows (doc_starts): from a document's first token on, nothing of
the previous document is seen, in every form of retention and in the Transformer baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retnet_train.model import build_model

MODES = ["parallel", "chunkwise", "recurrent"]
CASES = [("retnet_tiny", {}), ("retnet_tiny", {"score_norm": "torchscale"}), ("transformer_tiny", {})]


def _model(arch, **kw):
    torch.manual_seed(0)
    return build_model(arch, d_model=64, n_layers=2, n_heads=2, vocab_size=256, **kw).double().eval()


def _docs(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, n), generator=g) for n in lengths]


def _starts(lengths, total=None):
    starts = torch.zeros(1, total or sum(lengths), dtype=torch.bool)
    at = 0
    for n in lengths:
        starts[0, at] = True
        at += n
    return starts


def _token_losses(logits, ids):
    return F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")


@pytest.mark.parametrize("arch, kw", CASES, ids=["retnet", "retnet-torchscale", "transformer"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_documents_equal_each_document_alone(arch, kw, mode):
    """A|B|C in one window (B spans a chunk boundary, C starts mid-chunk): B's and C's logits and
    per-token losses are those of B and C alone."""
    model = _model(arch, **kw)
    a, b, c = _docs(13, 21, 9)
    ids = torch.cat([a, b, c], dim=1)
    extra = {"chunk_size": 8} if mode == "chunkwise" else {}
    with torch.no_grad():
        packed = model(ids, mode=mode, doc_starts=_starts([13, 21, 9]), **extra)
        for doc, lo, hi in ((b, 13, 34), (c, 34, 43)):
            alone = model(doc, mode=mode, **extra)
            torch.testing.assert_close(packed[:, lo:hi], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_token_losses(packed[:, lo:hi], doc), _token_losses(alone, doc),
                                       rtol=1e-5, atol=1e-5)
        without = model(ids, mode=mode, **extra)
    assert not torch.allclose(without[:, 13:34], packed[:, 13:34], atol=1e-3)  # the boundary matters


@pytest.mark.parametrize("arch", ["retnet_tiny", "transformer_tiny"])
def test_rows_with_different_boundaries(arch):
    """Each row of a batch keeps its own boundaries."""
    model = _model(arch)
    a, b, c, d = _docs(10, 22, 17, 15, seed=1)
    ids = torch.cat([torch.cat([a, b], 1), torch.cat([c, d], 1)])
    starts = torch.cat([_starts([10, 22]), _starts([17, 15])])
    with torch.no_grad():
        packed = model(ids, mode="chunkwise", chunk_size=8, doc_starts=starts)
        torch.testing.assert_close(packed[:1, 10:], model(b, mode="chunkwise", chunk_size=8), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[1:, 17:], model(d, mode="chunkwise", chunk_size=8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["retnet_tiny", "transformer_tiny"])
def test_a_continued_document_then_a_new_one_hands_on_the_right_state(arch):
    """A window that continues a document from a state and then starts another: the state it hands
    on is the new document's (decoding after it equals decoding after that document alone), in the
    chunkwise and recurrent forms alike."""
    model = _model(arch)
    a1, a2, b = _docs(12, 11, 19, seed=2)
    nxt = torch.tensor([[5]])
    with torch.no_grad():
        _, state = model(a1, mode="chunkwise", chunk_size=8, return_state=True)
        window = torch.cat([a2, b], 1)
        starts = _starts([11, 19])
        starts[0, 0] = False  # a2 continues a1
        for mode in ("chunkwise", "recurrent"):
            extra = {"chunk_size": 8} if mode == "chunkwise" else {}
            out, after = model(window, mode=mode, state=state, return_state=True, doc_starts=starts, **extra)
            torch.testing.assert_close(out[:, :11], model(torch.cat([a1, a2], 1))[:, 12:], rtol=1e-5, atol=1e-5)
            _, alone = model(b, mode="chunkwise", chunk_size=8, return_state=True)
            torch.testing.assert_close(model.step(nxt, after)[0], model.step(nxt, alone)[0], rtol=1e-5, atol=1e-5)


def test_document_positions_restart_and_continue_the_offset():
    from retnet_train.model.layers import document_positions

    starts = torch.tensor([[False, False, True, False, False, True], [True, False, False, False, False, False]])
    assert document_positions(starts, 7).tolist() == [[7, 8, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert document_positions(starts, torch.tensor([3, 9])).tolist() == [[3, 4, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("arch", ["retnet_tiny", "transformer_tiny"])
def test_rotary_positions_per_document_or_per_window(arch):
    """rope_reset_at_documents=False keeps window positions; rotary scores depend only on t - s, so
    a blocked document still equals itself alone (to float rounding) either way."""
    a, b = _docs(9, 14, seed=3)
    ids, starts = torch.cat([a, b], 1), _starts([9, 14])
    with torch.no_grad():
        for reset in (True, False):
            model = _model(arch, rope_reset_at_documents=reset)
            torch.testing.assert_close(model(ids, doc_starts=starts)[:, 9:], model(b), rtol=1e-5, atol=1e-5)


def test_bad_doc_starts_are_named():
    model = _model("retnet_tiny")
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="doc_starts must be a bool tensor shaped like ids"):
        model(ids, doc_starts=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_starts must be a bool"):
        model(ids, doc_starts=torch.zeros(2, 8, dtype=torch.long))


SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.mark.skipif(not (SAMPLE / ".complete").is_file(), reason="needs `make sample-data`")
def test_trainer_hands_the_stream_document_starts_to_the_model(tmp_path):
    """data.reset_at_documents=true: training and eval losses on the packed sample shards change
    (the windows hold several documents), and the run is otherwise the same run."""
    from test_train_utils import losses, run_train

    args = ["trainer.data_source=stream", "data=sample", f"data.root={SAMPLE}", "trainer.max_steps=2",
            "data.num_workers=0", "trainer.seq_len=256", "trainer.global_batch_tokens=2048"]
    run_train(tmp_path / "off", *args, "data.reset_at_documents=false")
    run_train(tmp_path / "on", *args, "data.reset_at_documents=true")
    off, on = losses(tmp_path / "off"), losses(tmp_path / "on")
    assert set(off) == set(on) == {1, 2}
    assert off[1] != on[1] and abs(off[1] - on[1]) < 0.5  # same weights and data, other attention pattern
