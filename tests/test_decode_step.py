"""The one-kernel decoding step of retention (kernels/decode_step.py) equals the unfused layers:
rotary, in-place state update, output, head norm and gate, for ragged positions, several value
blocks per head, bf16 and fp32; it leaves its counters at zero; bad input is named.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
first imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from retnet_train.model import build_model  # noqa: E402
from retnet_train.model.kernels import decode_step as D  # noqa: E402
from retnet_train.model.lm import State  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(dtype, **kw):
    """The same weights twice: our kernels (fused step) and torch (unfused layers), q/k/v/g fused."""
    models = []
    for kernels in ("triton", "torch"):
        torch.manual_seed(0)
        with torch.device(DEV):
            m = build_model("retnet_tiny", kernels=kernels, **{"vocab_size": 128, **kw}).eval().to(dtype)
        m.fuse_projections()
        models.append(m)
    return models


def _states(model, batch, seed):
    """A state in place for `batch` sequences at different positions, with random contents."""
    state = model.allocate_state(batch, 64)
    g = torch.Generator().manual_seed(seed)
    for layer in state.layers:
        layer.copy_(torch.randn(layer.shape, generator=g) * 0.1)
    state.offset.copy_(torch.tensor([0, 5, 17, 40][:batch]))
    return state


def _copy(state):
    return State(layers=[s.clone() for s in state.layers], offset=state.offset.clone(), in_place=True)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


# (d_model, heads, value width): one value block per head, then d_k 64 / d_v 384: three blocks
# (a state tile is [64, 128]) and a head width that is not a power of two
SHAPES = [(64, 2, None), (128, 2, 768)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_model,heads,value_dim", SHAPES, ids=["one-block", "three-blocks"])
def test_fused_step_equals_the_unfused_layers(dtype, tol, d_model, heads, value_dim):
    ours, ref = _pair(dtype, d_model=d_model, n_heads=heads, n_layers=2, value_dim=value_dim)
    calls = []
    real = D.decode_step
    D.decode_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        s_ours = _states(ours, 3, seed=1)
        s_ref = _copy(s_ours)
        ids = torch.tensor([[3], [77], [127]], device=DEV)
        with torch.no_grad():
            for _ in range(3):
                logits, _ = ours.step(ids, s_ours)
                want, _ = ref.step(ids, s_ref)
                assert _rel(logits, want) < tol
                ids = want[:, -1].argmax(-1, keepdim=True)
    finally:
        D.decode_step = real
    assert len(calls) == 3 * 2  # the fused kernel ran: every step, every layer
    for mine, theirs in zip(s_ours.layers, s_ref.layers):
        assert _rel(mine, theirs) < tol
    assert int(D._ARRIVALS[torch.device(DEV) if DEV == "cpu" else logits.device].abs().sum()) == 0


def _windowed(model, plain, window):
    """plain's states as WindowedStates with empty windows (start = each sequence's position)."""
    state = model.allocate_state(plain.offset.shape[0], 64, state_window=window)
    for ws, base in zip(state.layers, plain.layers):
        ws.base.copy_(base)
    state.offset.copy_(plain.offset)
    for layer in state.layers:
        layer.restart_at(plain.offset)
    return state


def _steps_alike(model, ref, windowed, plain, steps: int, log_gamma):
    """Greedy steps of three sequences through `model` with a windowed state and `ref` with the
    plain one, offsets advanced: each step's logits and whole states must agree; yields each step."""
    ids = torch.tensor([[3], [77], [127]], device=DEV)
    with torch.no_grad():
        for step in range(steps):
            logits, _ = model.step(ids, windowed)
            want, _ = ref.step(ids, plain)
            assert _rel(logits, want) < 1e-5, step
            windowed.offset += 1
            plain.offset += 1
            ids = want[:, -1].argmax(-1, keepdim=True)
            for ws, whole in zip(windowed.layers, plain.layers):
                assert _rel(ws.materialize(windowed.offset, log_gamma), whole) < 1e-5, step
            yield step


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("window", [2, 3, 4, 8])  # 4: the engine default; 8: AOT-compiled too
def test_state_written_once_per_window_equals_the_state_written_every_token(kernels, window):
    """A WindowedState (retention_state.py) through the fused kernel (triton) and through the torch
    step: the logits of every step and, after steps that end a window and steps inside one, the
    whole state (base + window) equal the plain state's, written every token."""
    ours, ref = _pair(torch.float32, d_model=128, n_heads=2, n_layers=2, value_dim=768)
    model = ours if kernels == "triton" else ref
    s_ref = _states(ref, 3, seed=4)
    s_win = _windowed(model, s_ref, window)
    log_gamma = ref.layers[0].retention.log_decay
    for step in _steps_alike(model, ref, s_win, s_ref, 2 * window + 1, log_gamma):
        written_back = (step + 1) % window == 0
        for ws, plain in zip(s_win.layers, s_ref.layers):
            # the base itself is the state exactly when a window has just ended
            assert (_rel(ws.base, plain) < 1e-5) == written_back, step


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_rows_at_different_places_in_their_windows(kernels):
    """Rows whose windows hold 0, 1 and 2 tokens (random base and window contents): each step's
    logits and the whole states follow the plain state made from them (materialize), over steps
    that end each row's window at a different step."""
    ours, ref = _pair(torch.float32, d_model=128, n_heads=2, n_layers=2, value_dim=768)
    model = ours if kernels == "triton" else ref
    g = torch.Generator().manual_seed(6)
    state = model.allocate_state(3, 64, state_window=3)
    state.offset.copy_(torch.tensor([9, 4, 20]))
    log_gamma = ref.layers[0].retention.log_decay
    for ws in state.layers:
        ws.start.copy_(state.offset - torch.tensor([0, 1, 2], device=DEV))  # counts 0, 1, 2
        for t in (ws.base, ws.keys, ws.values):
            t.copy_((torch.randn(t.shape, generator=g) * 0.3).to(t))
    assert ws.counts(state.offset).tolist() == [0, 1, 2]
    plain = State(layers=[ws.materialize(state.offset, log_gamma) for ws in state.layers],
                  offset=state.offset.clone(), in_place=True)
    assert len(list(_steps_alike(model, ref, state, plain, 4, log_gamma))) == 4


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_prefill_after_steps_continues_from_the_windowed_state(kernels):
    """Prompt, two decoding steps (a window holding two tokens), then a chunkwise continuation of
    several tokens into the same state: the window is folded in first, so the logits equal those of
    the state written every token."""
    ours, ref = _pair(torch.float32, d_model=128, n_heads=2, n_layers=2, value_dim=768)
    model = ours if kernels == "triton" else ref
    g = torch.Generator().manual_seed(5)
    prompt, more = torch.randint(0, 128, (2, 5), generator=g).to(DEV), torch.randint(0, 128, (2, 7), generator=g).to(DEV)
    outs = []
    with torch.no_grad():
        for window in (1, 4):
            state = model.allocate_state(2, 64, state_window=window)
            model(prompt, mode="chunkwise", state=state, return_state=True)
            state.offset.fill_(5)
            for t in range(2):
                model.step(prompt[:, t:t + 1], state)
                state.offset += 1
            logits, _ = model(more, mode="chunkwise", state=state, return_state=True)
            outs.append(logits)
    assert _rel(outs[1], outs[0]) < 1e-5


def test_engine_with_several_value_blocks_decodes_the_torch_tokens():
    from retnet_train.inference import Generator

    ours, ref = _pair(torch.float32, d_model=128, n_heads=2, n_layers=2, value_dim=768)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 11]
    want = Generator(ref, max_batch=4, max_len=32, cuda_graphs=False).generate(prompts, max_new_tokens=8)
    # the one-kernel step, with the state written every token and once every 3 (ragged prompts, a
    # padding row, the prompt of 11 prefilled in pieces of 4)
    for window in (1, 3):
        gen = Generator(ours, max_batch=4, max_len=32, cuda_graphs=False, state_window=window, prefill_tokens=4)
        assert gen.generate(prompts, max_new_tokens=8) == want, window


def test_bad_state_and_projection_are_named():
    model, _ = _pair(torch.float32, n_layers=1)
    block = model.layers[0].retention
    state = model.allocate_state(2, 8).layers[0]
    width = 2 * block.n_heads * (block.key_dim + block.value_dim)  # q, k, v, g of every head
    proj = torch.randn(2, 1, width, device=DEV)
    sin, cos = torch.zeros(1, 1, block.key_dim, device=DEV), torch.ones(1, 1, block.key_dim, device=DEV)
    lg2 = torch.zeros(block.n_heads, device=DEV)
    assert D.decode_step(proj, sin, cos, lg2, state, block.head_norm, 1.0).shape == (2, 1, block.n_heads * block.value_dim)
    with pytest.raises(ValueError, match="contiguous float32"):
        D.decode_step(proj, sin, cos, lg2, state.double(), block.head_norm, 1.0)
    with pytest.raises(ValueError, match=rf"does not match a state .* expected \[2, 1, {width}\]"):
        D.decode_step(proj[..., :-2], sin, cos, lg2, state, block.head_norm, 1.0)
    windowed = model.allocate_state(2, 8, state_window=4).layers[0]
    with pytest.raises(ValueError, match="windowed decoding state needs each sequence's position"):
        D.decode_step(proj, sin, cos, lg2, windowed, block.head_norm, 1.0)
    with pytest.raises(ValueError, match="state window=0 must be >= 1"):
        model.allocate_state(2, 8, state_window=0)


def _real_heads_batch():
    """retnet_1.3b's heads in two layers, bf16 (ours, ref), a random plain state for 16 sequences at
    ragged positions, and their first ids."""
    ours, ref = _pair(torch.bfloat16, d_model=2048, n_heads=8, n_layers=2, value_dim=4096, vocab_size=1024)
    state = ref.allocate_state(16, 64)
    for layer in state.layers:
        layer.normal_(0, 0.1)
    state.offset.copy_(torch.arange(16) * 7)
    return ours, ref, state, torch.randint(0, 1024, (16, 1), device=DEV)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_real_heads_bf16_many_steps():
    """retnet_1.3b's heads (8 x d_k 256 x d_v 512: sixteen programs per head meet at the counter),
    batch 16 at ragged positions, 20 steps: the fused step stays with the unfused layers (a lost
    or early arrival would show as a wrong row)."""
    ours, ref, s_ours, ids = _real_heads_batch()
    s_ref = _copy(s_ours)
    with torch.no_grad():
        for _ in range(20):
            logits, _ = ours.step(ids, s_ours)
            want, _ = ref.step(ids, s_ref)
            assert _rel(logits, want) < 2e-2
            ids = want[:, -1].argmax(-1, keepdim=True)
    for mine, theirs in zip(s_ours.layers, s_ref.layers):
        assert _rel(mine, theirs) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_real_heads_state_written_once_per_window():
    """The same heads and batch with the state written back once per window of the engine's
    default length (STATE_WINDOW): 20 steps (write-backs and a part window) stay with the plain state."""
    from retnet_train.inference.engine import STATE_WINDOW

    ours, ref, s_ref, ids = _real_heads_batch()
    s_win = _windowed(ours, s_ref, STATE_WINDOW)
    log_gamma = ref.layers[0].retention.log_decay
    with torch.no_grad():
        for _ in range(20):
            logits, _ = ours.step(ids, s_win)
            want, _ = ref.step(ids, s_ref)
            assert _rel(logits, want) < 2e-2
            s_win.offset += 1
            s_ref.offset += 1
            ids = want[:, -1].argmax(-1, keepdim=True)
    for ws, theirs in zip(s_win.layers, s_ref.layers):
        assert _rel(ws.materialize(s_win.offset, log_gamma), theirs) < 2e-2
