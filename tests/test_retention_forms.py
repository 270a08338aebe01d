"""The three retention forms compute one function: parallel == chunkwise == recurrent."""

import pytest
import torch

from retnet_train.model.retention import (
    chunkwise_retention,
    head_log_decays,
    parallel_retention,
    recurrent_retention,
)


def _inputs(B=2, T=77, H=3, K=8, V=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype) * K ** -0.5
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    return q, k, v


def _reference(q, k, v, log_gamma, state=None):
    """Direct O(T^2) sum: o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) q_t S_in."""
    B, T, H, K = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    gamma = log_gamma.exp().to(q.dtype)
    for t in range(T):
        for s in range(t + 1):
            w = gamma ** (t - s) * (q[:, t] * k[:, s]).sum(-1)  # [B, H]
            o[:, t] += w[..., None] * v[:, s]
        if state is not None:
            o[:, t] += gamma[None, :, None] ** (t + 1) * torch.einsum("bhk,bhkv->bhv", q[:, t], state)
    return o


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_decays_follow_the_paper_from_global_head_index():
    lg = head_log_decays(8)
    assert lg.dtype == torch.float64
    assert torch.allclose(lg.exp(), 1 - 2.0 ** (-5 - torch.arange(8, dtype=torch.float64)), rtol=0, atol=1e-15)
    # a tensor-parallel shard holding heads 4..7 gets exactly those heads' decays
    assert torch.equal(head_log_decays(8, head_start=4, head_count=4), lg[4:])
    lin = head_log_decays(10, "linspace").exp()
    assert abs(1 - lin[0].item() - 1 / 32) < 1e-12 and abs(1 - lin[-1].item() - 1 / 512) < 1e-12
    with pytest.raises(ValueError, match="unknown decay schedule"):
        head_log_decays(4, "cosine")


@pytest.mark.parametrize("T", [1, 16, 77])
def test_parallel_matches_direct_sum(T):
    q, k, v = _inputs(T=T, B=1)
    lg = head_log_decays(3)
    o, _ = parallel_retention(q, k, v, lg)
    assert rel_err(o, _reference(q, k, v, lg)) < 1e-12


@pytest.mark.parametrize("T,C", [(64, 16), (77, 16), (77, 64), (10, 64), (77, 1)])
def test_three_forms_agree_float64(T, C):
    q, k, v = _inputs(T=T)
    lg = head_log_decays(3)
    p, sp = parallel_retention(q, k, v, lg, need_state=True)
    c, sc = chunkwise_retention(q, k, v, lg, need_state=True, chunk_size=C)
    r, sr = recurrent_retention(q, k, v, lg, need_state=True)
    assert rel_err(c, p) < 1e-12 and rel_err(r, p) < 1e-12
    assert rel_err(sc, sr) < 1e-12 and rel_err(sp, sr) < 1e-12


def test_state_hand_off_continues_the_sequence():
    q, k, v = _inputs(T=77)
    lg = head_log_decays(3)
    whole, final = parallel_retention(q, k, v, lg, need_state=True)
    cut = 45
    first, state = chunkwise_retention(q[:, :cut], k[:, :cut], v[:, :cut], lg, need_state=True, chunk_size=16)
    second, state2 = chunkwise_retention(q[:, cut:], k[:, cut:], v[:, cut:], lg, state=state, need_state=True, chunk_size=8)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-12
    assert rel_err(state2, final) < 1e-12
    # and token by token from a parallel prefill
    first, state = parallel_retention(q[:, :cut], k[:, :cut], v[:, :cut], lg, need_state=True)
    steps = []
    for t in range(cut, 77):
        o, state = recurrent_retention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], lg, state=state)
        steps.append(o)
    assert rel_err(torch.cat([first] + steps, 1), whole) < 1e-12
    assert rel_err(state, final) < 1e-12
    assert rel_err(_reference(q[:, cut:], k[:, cut:], v[:, cut:], lg, state=parallel_retention(
        q[:, :cut], k[:, :cut], v[:, :cut], lg, need_state=True)[1]), whole[:, cut:]) < 1e-12


def test_float32_forms_agree():
    q, k, v = _inputs(T=300, H=4, K=32, V=32, dtype=torch.float32)
    lg = head_log_decays(4)
    p, _ = parallel_retention(q, k, v, lg)
    c, _ = chunkwise_retention(q, k, v, lg, chunk_size=64)
    r, _ = recurrent_retention(q, k, v, lg)
    assert rel_err(c, p) < 1e-5 and rel_err(r, p) < 1e-5


def test_chunkwise_gradients_equal_parallel():
    q, k, v = (x.requires_grad_() for x in _inputs(T=50))
    lg = head_log_decays(3)
    w = torch.randn(2, 50, 3, 6, dtype=torch.float64)
    grads = []
    for fn in (parallel_retention, lambda *a: chunkwise_retention(*a, chunk_size=16)):
        o, _ = fn(q, k, v, lg)
        grads.append(torch.autograd.grad((o * w).sum(), (q, k, v)))
    for gp, gc in zip(*grads):
        assert rel_err(gc, gp) < 1e-12
