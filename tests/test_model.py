"""The RetNet LM (and the Transformer baseline) give the same function in every form."""

import pytest
import torch

from retnet_train.model import ModelConfigError, State, build_model, load_preset, preset_names

VOCAB = 97


def small(arch="retnet", **kw):
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, chunk_size=8)
    base.update(kw)
    return build_model("retnet_tiny" if arch == "retnet" else "transformer_tiny", **base)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def ids(B=3, T=29, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def all_forms(model, x, chunk_size=8):
    """logits of the parallel, chunkwise and recurrent forms, and of a split prefill + decode."""
    par = model(x)
    chunk = model(x, mode="chunkwise", chunk_size=chunk_size)
    rec = model(x, mode="recurrent")
    cut = x.shape[1] // 2
    head, state = model(x[:, :cut], mode="chunkwise", chunk_size=chunk_size, return_state=True)
    mid, state = model(x[:, cut:cut + 3], mode="parallel", state=state, return_state=True)
    tail = []
    for t in range(cut + 3, x.shape[1]):
        logit, state = model.step(x[:, t:t + 1], state)
        tail.append(logit)
    split = torch.cat([head, mid] + tail, dim=1)
    assert isinstance(state, State) and state.offset == x.shape[1]
    return par, chunk, rec, split


@pytest.mark.parametrize("flavour", [
    dict(),
    dict(norm="rmsnorm", ffn_type="glu", head_norm="rmsnorm", head_norm_affine=False),
    dict(score_norm="torchscale", decay_schedule="linspace", tie_embeddings=True, bias=True),
])
def test_forms_agree_float64_with_eps_zero(flavour):
    torch.manual_seed(0)
    model = small(head_norm_eps=0.0, **flavour).double().eval()
    par, chunk, rec, split = all_forms(model, ids())  # T=29: not a multiple of the chunk size 8
    for other in (chunk, rec, split):
        assert rel_err(other, par) < 1e-9


def test_forms_agree_float32_default_eps():
    torch.manual_seed(0)
    model = small().eval()
    par, chunk, rec, split = all_forms(model, ids(T=70), chunk_size=16)
    # stated tolerance for fp32 with the default head-norm eps (1e-6): 1e-4 relative on the logits
    for other in (chunk, rec, split):
        assert rel_err(other, par) < 1e-4


def test_transformer_decoding_matches_full_attention():
    torch.manual_seed(0)
    model = small("transformer").double().eval()
    par, chunk, rec, split = all_forms(model, ids())
    for other in (chunk, rec, split):
        assert rel_err(other, par) < 1e-9


def test_chunkwise_gradients_equal_parallel_gradients():
    torch.manual_seed(0)
    model = small(head_norm_eps=0.0).double()
    x = ids(T=37)
    grads = []
    for kw in (dict(mode="parallel"), dict(mode="chunkwise", chunk_size=8)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x, **kw).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-9, name


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_causal_in_every_form(arch, mode):
    torch.manual_seed(0)
    model = small(arch).double().eval()
    x = ids(B=2, T=24)
    t = 13
    y = x.clone()
    y[:, t + 1:] = (y[:, t + 1:] + 5) % VOCAB
    a, b = model(x, mode=mode), model(y, mode=mode)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that run while active (here: during backward, recomputation included)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_modes_give_same_losses_and_gradients():
    """none / full / selective on retnet_tiny: the same loss and gradients; full recomputes the
    matmuls in backward, selective only the elementwise work (norms, rotary, gates)."""
    torch.manual_seed(0)
    model = build_model("retnet_tiny", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, chunk_size=8,
                        ffn_type="glu").double()
    x = ids(T=16)
    results = {}
    for mode in ("none", "full", "selective", "full first 1"):
        model.set_activation_checkpointing(mode.split()[0], 1 if mode.endswith("1") else None)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, mode="chunkwise").flatten(0, 1), x.roll(-1, 1).flatten())
        with _CountOps() as ops:
            loss.backward()
        results[mode] = (loss.item(), [p.grad.clone() for p in model.parameters()], ops.counts)
    base_loss, base_grads, base_ops = results["none"]
    for mode in ("full", "selective", "full first 1"):
        loss, grads, _ = results[mode]
        assert loss == base_loss
        for a, b in zip(grads, base_grads):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), mode
    matmuls = lambda counts: counts.get("mm", 0) + counts.get("bmm", 0)  # noqa: E731
    assert matmuls(results["full"][2]) > matmuls(base_ops)  # the blocks' forward again
    # checkpoint_layers=1 of 2: only the first block's forward again
    assert matmuls(results["full first 1"][2]) - matmuls(base_ops) == (matmuls(results["full"][2]) - matmuls(base_ops)) / 2
    assert [model.block_checkpointing(i) for i in (0, 1)] == ["full", "none"]
    assert matmuls(results["selective"][2]) == matmuls(base_ops)  # projections and retention kept
    assert results["selective"][2].get("rsqrt", 0) > base_ops.get("rsqrt", 0)  # head norm recomputed
    # the rotation of q and k (its sin/cos table is made once per forward, outside the blocks)
    assert results["selective"][2].get("stack", 0) > base_ops.get("stack", 0)
    # configs of before: True / False
    model.set_activation_checkpointing(True)
    assert model.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="'partial' is not one of"):
        model.set_activation_checkpointing("partial")
    with pytest.raises(ValueError, match="checkpoint layers 3: must be a count of blocks from 0 to 2"):
        model.set_activation_checkpointing("full", 3)


def test_chunk_form_flops_against_a_hand_count():
    """Per head and chunk: 2 C^2 K (Q K^T over the full tile) + 2 C^2 V (times V) + 2 C K V (q S)
    + 2 C K V (k^T v); a last partial chunk of r tokens counts r; backward twice the forward."""
    from retnet_train.model.flops import mixing_flops_per_token, retention_flops, training_flops_per_token

    cfg = load_preset("retnet_tiny", d_model=16, n_heads=2, value_dim=32, n_layers=3, chunk_size=4)
    K, V = 8, 16  # per head
    assert (cfg.key_head_dim, cfg.value_head_dim) == (K, V)
    chunk = 2 * 16 * 8 + 2 * 16 * 16 + 2 * 4 * 8 * 16 + 2 * 4 * 8 * 16  # C = 4: 256 + 512 + 1024 + 1024
    assert chunk == 2816
    tail = 2 * 4 * 8 + 2 * 4 * 16 + 4 * 2 * 8 * 16  # r = 2: 64 + 128 + 1024
    fwd, bwd = retention_flops(cfg, 10, "chunkwise")  # 2 full chunks + 2 tokens
    assert fwd == 2 * (2 * chunk + tail) and bwd == 2 * fwd  # 2 heads
    assert mixing_flops_per_token(cfg, 10, "chunkwise") == 3 * fwd / 10  # 3 layers
    assert retention_flops(cfg, 8, "parallel")[0] == 2 * 2 * 8 * 8 * (K + V)  # the full T x T product
    # one chunk of 8: the parallel product plus the (zero-state) q S and the state update
    assert retention_flops(cfg, 8, "chunkwise", chunk_size=8)[0] == retention_flops(cfg, 8, "parallel")[0] + 2 * 4 * 8 * K * V
    matmul = 2 * (cfg.n_layers * (2 * 16 * 16 + 3 * 16 * 32 + 2 * 16 * 32) + 16 * cfg.vocab_size)
    assert training_flops_per_token(cfg, 10) == 3 * (matmul + 3 * fwd / 10)


NOMINAL = {"1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9, "13b": 13e9}


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@pytest.mark.parametrize("size", list(NOMINAL))
def test_preset_parameter_counts_on_meta_device(arch, size):
    with torch.device("meta"):
        model = build_model(f"{arch}_{size}")
    assert next(model.parameters()).is_meta
    n = model.num_parameters()
    assert abs(n - NOMINAL[size]) / NOMINAL[size] < 0.10, (arch, size, n)


def test_paper_dimensions():
    for size, (d, layers, heads) in {"1.3b": (2048, 24, 8), "2.7b": (2560, 32, 10),
                                      "6.7b": (4096, 32, 16), "13b": (5120, 40, 20)}.items():
        cfg = load_preset(f"retnet_{size}")
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (d, layers, heads)
        assert cfg.key_head_dim == 256 and cfg.value_width == 2 * d and cfg.ffn_width == 2 * d
    assert {"retnet_tiny", "transformer_tiny", "transformer_1.3b"} <= set(preset_names())


@pytest.mark.parametrize("overrides,message", [
    (dict(value_dim=30), r"model\.value_dim=30 is not divisible by model\.n_heads=4"),
    (dict(d_model=36, n_heads=4), r"key head dim must be even"),
    (dict(d_model=30, n_heads=4), r"model\.d_model=30 is not divisible"),
    (dict(norm="batchnorm"), r"model\.norm='batchnorm'"),
    (dict(n_layers=0), r"model\.n_layers=0"),
    (dict(colour="red"), r"unknown key\(s\) model\.colour"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model("retnet_tiny", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ModelConfigError, match=r"model='retnet_99b': unknown preset.*retnet_tiny"):
        build_model("retnet_99b")


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode='sideways'"):
        small()(ids(), mode="sideways")


def test_a_bf16_cast_of_the_module_keeps_positions_exact():
    """DeepSpeed's bf16 mode casts every floating tensor of the module. Rotary frequencies and
    decays must not be among them (rounded to bf16, positions past a few hundred scramble): a
    model cast to bf16 and back must equal one whose weights alone were rounded."""
    import copy

    torch.manual_seed(0)
    model = small().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    cast = copy.deepcopy(model).bfloat16().float()
    x = ids(B=1, T=8)
    state = State(offset=3000)  # far positions, where a rounded frequency table would be off
    state.layers = [torch.zeros(1, 4, 8, 16) for _ in range(2)]
    a = model(x, mode="chunkwise", state=state)
    b = cast(x, mode="chunkwise", state=state)
    assert torch.equal(a, b)
