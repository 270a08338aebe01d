"""bench/retention_host.py without a GPU (Triton's interpreter, small shapes): each layer it times
runs the forward + backward it names, and they compute the same gradients."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

from bench import retention_host as bench  # noqa: E402
from retnet_train.model.kernels import retention_triton as RT  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("keep", ["none", "both"])
def test_every_layer_computes_the_same_gradients(keep, monkeypatch):
    calls = bench.layer_calls(2, 64, keep, DEV, heads=2, dk=16, dv=32, dtype=torch.float32)
    assert tuple(calls) == bench.LAYERS
    op_calls = []
    op = torch.ops.retnet.retention_chunk
    monkeypatch.setattr(RT.torch.ops.retnet, "retention_chunk", lambda *a: op_calls.append(1) or op(*a))
    assert calls["plans"]() is None
    assert calls["forward"]() is None and len(op_calls) == 1  # the forward ran, through the op
    grads = {name: calls[name]() for name in ("launches", "ops", "autograd")}
    reference = grads["launches"]
    assert all(g is not None and g.abs().sum() > 0 for g in reference)
    for name, got in grads.items():
        for which, a, b in zip(("dq", "dk", "dv"), got, reference):
            assert torch.equal(a.reshape(b.shape), b), (name, which)


def test_per_call_us_times_the_host_before_the_gpu():
    waited = []
    host, with_gpu = bench.per_call_us(lambda: None, 4, lambda: waited.append(1))
    assert waited == [1, 1]  # after the warm-up and after the timed calls
    assert 0 <= host <= with_gpu
