"""The inference engine (retnet_train.inference): equal to the plain eager loop, ragged batches,
reproducible sampling, EOS per sequence, clear errors; CUDA graphs on a GPU (gpu marker)."""

from __future__ import annotations

import pytest
import torch

from retnet_train.generate import generate
from retnet_train.inference import Generator
from retnet_train.inference.sampling import sample_tokens, uniform
from retnet_train.model import build_model

ARCHS = ["retnet_tiny", "transformer_tiny"]


def _model(arch: str, **kw):
    torch.manual_seed(0)
    return build_model(arch, d_model=64, n_layers=2, n_heads=2, vocab_size=256, **kw).eval()


@pytest.fixture(scope="module", params=ARCHS)
def engine(request):
    return Generator(_model(request.param), max_batch=4, max_len=96, chunk_size=16)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_engine_equals_plain_loop(engine, temperature):
    prompts = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(1))  # not a chunk multiple
    got = engine.generate(prompts.tolist(), max_new_tokens=17, temperature=temperature, top_k=30, top_p=0.9, seed=5)
    want = generate(engine.model, prompts, 17, temperature, 30, 0.9, chunk_size=16, seed=5)
    assert got == want.tolist()


def test_ragged_batch_equals_each_prompt_alone(engine):
    # in float64: a batch sums in another order than one prompt alone, and greedy tokens agree only
    # away from ties; in fp32 the Transformer's weights of seed 0 tie two logits to 4 ulps (1e-6) once
    engine = Generator(_model(f"{engine.model.config.arch}_tiny").double(), max_batch=4, max_len=96, chunk_size=16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 1, 40, 9)]
    batch = engine.generate(prompts, max_new_tokens=12)
    alone = [engine.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert batch == alone
    # and in another order, in a smaller bucket with padding rows
    assert engine.generate(prompts[2::-1], max_new_tokens=12) == alone[2::-1]


def test_state_written_once_per_window_decodes_the_same_tokens():
    """state_window > 1 (RetNet's state written back once per window): a ragged batch, long prompts
    prefilled in pieces, greedy and sampled, equals the engine that writes the state every token
    (float64, so no rounding difference can flip a token)."""
    model = _model("retnet_tiny").double()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 1, 40)]
    plain = Generator(model, max_batch=4, max_len=96, chunk_size=16, prefill_tokens=32)
    for window in (2, 5):
        windowed = Generator(model, max_batch=4, max_len=96, chunk_size=16, prefill_tokens=32, state_window=window)
        for temperature in (0.0, 0.9):
            want = plain.generate(prompts, max_new_tokens=13, temperature=temperature, seed=1)
            assert windowed.generate(prompts, max_new_tokens=13, temperature=temperature, seed=1) == want
        # a second call on the same engine starts clean (reset rows restart the windows)
        assert windowed.generate(prompts[:1], max_new_tokens=13) == plain.generate(prompts[:1], max_new_tokens=13)
    with pytest.raises(ValueError, match="state_window=0 must be >= 1"):
        Generator(model, state_window=0)
    # the default: 1 here (the torch step on a CPU gains nothing from a window); a Transformer has none
    assert Generator(model).state_window == 1 and windowed.state_window == 5
    assert Generator(_model("transformer_tiny"), state_window=4).state_window == 1
    # where the engine's default is the window: the one-kernel step, which a GPU runs with our or
    # fla's kernels for the paper's gate and norm (the torch step rebuilds the state every token)
    cuda = torch.device("cuda")
    for kernels, options, want in (("triton", {}, True), ("fla", {}, True), ("torch", {}, False),
                                   ("triton", {"score_norm": "torchscale"}, False),
                                   ("triton", {"gate_activation": "gelu"}, False)):
        m = _model("retnet_tiny", **options)
        m.kernels = kernels  # as resolved on a GPU
        assert m.decodes_in_one_kernel(cuda) == want, (kernels, options)
        assert not m.decodes_in_one_kernel(torch.device("cpu"))
    m = _model("retnet_tiny")
    m.kernels = "triton"
    assert m.decodes_in_one_kernel(cuda) and not m.double().decodes_in_one_kernel(cuda)  # float64: the torch step


def test_sampling_is_reproducible_and_seeded(engine):
    prompts = [[1, 2, 3], [4, 5]]
    a = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=7)
    b = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=7)
    c = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=8)
    assert a == b and a != c


def test_eos_stops_each_sequence_on_its_own():
    model = _model("retnet_tiny")
    gen = Generator(model, max_batch=2, max_len=64)
    prompts = [[3, 1, 4], [1, 5, 9, 2]]
    free = gen.generate(prompts, max_new_tokens=20)
    eos = free[1][4]  # the fifth token of the second sequence, which greedy decoding reaches
    stopped = gen.generate(prompts, max_new_tokens=20, eos_id=eos)
    for row, out in zip(free, stopped):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:cut]
    assert len(stopped[1]) <= 5


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], [3, 256]]), r"prompt 1: token id 256 is outside the vocabulary \[0, 256\)"),
    (dict(prompts=[[1, -1]]), "token id -1"),
    (dict(prompts=[[1]] * 5), "5 prompts are more than max_batch=4"),
    (dict(prompts=[[1] * 40], max_new_tokens=30), r"40 tokens \+ max_new_tokens=30 = 70 exceeds max_len=64"),
    (dict(prompts=[[1]], eos_id=300), "eos_id=300"),
    (dict(prompts=[[1]], temperature=-1.0), "temperature=-1.0"),
    (dict(prompts=[[1]], top_p=0.0), "top_p=0.0"),
    (dict(prompts=[]), "no prompts"),
])
def test_bad_input_is_named(bad, match):
    gen = Generator(_model("transformer_tiny"), max_batch=4, max_len=64)
    kwargs = dict(max_new_tokens=4) | bad
    with pytest.raises(ValueError, match=match):
        gen.generate(**kwargs)


def test_torchscale_score_norm_state_decodes_like_the_plain_loop():
    model = _model("retnet_tiny", score_norm="torchscale")
    gen = Generator(model, max_batch=2, max_len=64, chunk_size=8)
    prompts = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    assert gen.generate(prompts.tolist(), max_new_tokens=10) == generate(model, prompts, 10, chunk_size=8).tolist()


def test_sample_tokens_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(64, 1)
    u = uniform(torch.tensor(0), torch.arange(64), torch.tensor(0))
    one = torch.ones(64)

    def draw(temperature=1.0, top_k=0, top_p=1.0):
        return set(sample_tokens(logits, one * temperature, torch.full((64,), top_k), one * top_p, u).tolist())

    assert draw(top_k=1) == {3}
    assert draw(top_k=2) == {2, 3}
    # probabilities 0.03, 0.09, 0.24, 0.64: top_p keeps the tokens whose mass before them is under it
    assert draw(top_p=0.5) == {3}
    assert draw(top_p=0.7) == {2, 3}
    assert draw() == {0, 1, 2, 3}
    assert draw(temperature=0.0) == {3}


def test_uniform_is_a_pure_function_in_the_open_interval():
    u = uniform(torch.tensor(3), torch.arange(1000)[:, None], torch.arange(50)[None, :])
    assert u.shape == (1000, 50) and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u, uniform(torch.tensor(3), torch.arange(1000)[:, None], torch.arange(50)[None, :]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["retnet_1.3b", "transformer_1.3b"])
def test_graphs_equal_eager_token_for_token(arch):
    """With CUDA graphs (and compiled), greedy decoding equals the eager engine and the plain loop (fp32 weights
    so the three paths' roundings cannot flip an argmax), for a ragged batch."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(arch, n_layers=4).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (300, 64, 300)]
    graphs = Generator(model, max_batch=4, max_len=512, cuda_graphs=True).generate(prompts, max_new_tokens=48)
    eager = Generator(model, max_batch=4, max_len=512, cuda_graphs=False).generate(prompts, max_new_tokens=48)
    compiled = Generator(model, max_batch=4, max_len=512, compile=True).generate(prompts, max_new_tokens=48)
    assert graphs == eager == compiled
    if arch.startswith("retnet"):  # the engines above write the state once every 4 tokens (the GPU default)
        assert Generator(model, max_batch=4, max_len=512).state_window == 4
        every_token = Generator(model, max_batch=4, max_len=512, compile=True, state_window=1)
        assert every_token.generate(prompts, max_new_tokens=48) == graphs
    for p, out in zip(prompts, graphs):
        assert out == generate(model, torch.tensor([p], device="cuda"), 48)[0].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_give_the_same_logits_and_follow_loaded_weights(arch):
    model, other = _model(arch), _model(arch)
    torch.manual_seed(1)
    other.load_state_dict({k: torch.randn_like(v) * 0.02 for k, v in other.state_dict().items()})
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        before, want = model(ids), other(ids)
        model.fuse_projections()
        assert all(m._fused is not None for m in model.modules() if hasattr(m, "_fused"))
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
        keys = set(model.state_dict())
        model.load_state_dict(other.state_dict())  # copies into the views: the fused weight follows
        assert set(model.state_dict()) == keys
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
def test_a_long_prompt_is_prefilled_in_pieces_with_the_same_tokens(arch):
    """prefill_tokens=16 cuts a 37-token prompt into pieces of 16, 16 and 5 tokens, each continuing
    from the state (RetNet) or cache (Transformer) the last one left; the tokens equal a prefill in
    one piece (float64)."""
    model = _model(f"{arch}_tiny").double()
    prompts = [torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(3)).tolist()]
    whole = Generator(model, max_batch=1, max_len=64, chunk_size=16).generate(prompts, max_new_tokens=9)
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[1]))
    try:
        pieces = Generator(model, max_batch=1, max_len=64, chunk_size=16, prefill_tokens=16).generate(
            prompts, max_new_tokens=9)
    finally:
        hook.remove()
    assert forwards == [16, 16, 5]  # the prefill's forwards (decoding steps call model.step)
    assert pieces == whole
