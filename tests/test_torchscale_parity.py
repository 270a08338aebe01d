"""Our official-flavour RetNet gives torchscale's RetNetDecoder logits from the same weights."""

import sys
import types

import pytest
import torch

from retnet_train.model import build_model, config_from_torchscale, load_torchscale_state_dict

VOCAB = 211


@pytest.fixture(scope="module")
def torchscale_retnet():
    pytest.importorskip("torchscale")
    # torchscale's drop-path imports timm, which its RetNet path never calls with drop_path_rate 0
    if "timm" not in sys.modules:
        try:
            import timm  # noqa: F401
        except ImportError:
            layers = types.ModuleType("timm.models.layers")
            layers.drop_path = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("timm stub"))
            for name, mod in {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                              "timm.models.layers": layers}.items():
                sys.modules[name] = mod
    from torchscale.architecture.config import RetNetConfig
    from torchscale.architecture.retnet import RetNetDecoder

    return RetNetConfig, RetNetDecoder


def _pair(RetNetConfig, RetNetDecoder, **kw):
    args = RetNetConfig(decoder_embed_dim=64, decoder_value_embed_dim=128, decoder_retention_heads=4,
                        decoder_ffn_embed_dim=96, decoder_layers=3, vocab_size=VOCAB, activation_fn="swish",
                        recurrent_chunk_size=8, **kw)
    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, 64)
    torch.nn.init.normal_(embed.weight, std=64 ** -0.5)
    theirs = RetNetDecoder(args, embed_tokens=embed).eval()
    # give every weight a non-trivial value (their norms start at one)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = build_model(config_from_torchscale(args, VOCAB)).eval()
    load_torchscale_state_dict(ours, theirs.state_dict())
    return args, theirs, ours


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_parallel_logits_equal_torchscale(torchscale_retnet):
    args, theirs, ours = _pair(*torchscale_retnet)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = theirs(ids)
        got = ours(ids)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("eps,bound", [(1e-12, 1e-5), (1e-6, 1e-3)])
def test_chunkwise_and_recurrent_equal_torchscale(torchscale_retnet, eps, bound):
    """torchscale's own chunkwise and recurrent forms scale each token's head output differently
    from its parallel form; the head norm cancels such scalings up to its eps. With eps near zero
    the logits agree to fp32 precision; with the default eps 1e-6, to the stated 1e-3."""
    args, theirs, ours = _pair(*torchscale_retnet, chunkwise_recurrent=True, layernorm_eps=eps)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_chunk, _ = theirs(ids)
        assert rel_err(ours(ids, mode="chunkwise", chunk_size=8), ref_chunk) < bound
        theirs.chunkwise_recurrent = False
        incremental = {}
        steps = []
        for t in range(ids.shape[1]):
            out, _ = theirs(ids[:, : t + 1], incremental_state=incremental)
            steps.append(out[:, -1:])
        ref_rec = torch.cat(steps, 1)
        assert rel_err(ours(ids, mode="recurrent"), ref_rec) < bound


def test_unknown_torchscale_key_is_refused(torchscale_retnet):
    args, theirs, ours = _pair(*torchscale_retnet)
    sd = dict(theirs.state_dict())
    sd["layers.0.retention.rotary.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.0.retention.rotary.weight"):
        load_torchscale_state_dict(ours, sd)
