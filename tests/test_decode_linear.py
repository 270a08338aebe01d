"""The decoding step's few-row linear kernel (kernels/decode_linear.py) against the torch layers it
replaces: norm before, GELU or a residual add after, any row count up to 16. CPU tests run it under
Triton's interpreter in fp32 and fp16 (the interpreter's bf16 matrix product is broken); the GPU
test runs bf16 with programmatic dependent launch and the L2 prefetch."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from retnet_train.model.kernels.decode_linear import LinearTiles, few_row_linear, pdl_supported  # noqa: E402
from retnet_train.model.layers import RMSNorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
K, N = 192, 80  # neither a multiple of the tiles below: the masks are exercised
TILES = LinearTiles(block_n=16, block_k=64)


def reference(x, w, b, norm, gelu, residual):
    """The unfused torch layers, rounding where they round."""
    if norm is not None:
        kind, nw, nb, eps = norm
        if kind == "layernorm":
            x = F.layer_norm(x, (x.shape[-1],), nw, nb, eps)
        else:
            rms = RMSNorm(x.shape[-1], eps).to(x.device)
            rms.weight.data = nw
            x = rms(x)
    y = F.linear(x, w, b)
    if gelu:
        y = F.gelu(y.float()).to(y.dtype)
    return y if residual is None else residual + y


def inputs(M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)

    return r(M, K, scale=3.0) + 1.0, r(N, K, scale=K ** -0.5), r(N), r(K), r(K), r(M, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("case", ["layernorm+gelu", "rmsnorm", "residual in place", "plain"])
def test_equals_torch_layers(dtype, M, case):
    x, w, b, nw, nb, r = inputs(M, dtype, seed=M)
    kw, ref_kw = {}, dict(norm=None, gelu=False, residual=None)
    if case == "layernorm+gelu":
        kw = dict(norm=("layernorm", nw, nb, 1e-5), gelu=True)
        ref_kw.update(norm=kw["norm"], gelu=True)
    elif case == "rmsnorm":
        kw = dict(norm=("rmsnorm", nw, None, 1e-6))
        ref_kw.update(norm=kw["norm"])
    elif case == "residual in place":
        out = r.clone()
        kw = dict(residual=out, out=out)
        ref_kw.update(residual=r)
    got = few_row_linear(x, w, b, tiles=TILES, **kw)
    want = reference(x, w, b, **ref_kw)
    if case == "residual in place":
        assert got.data_ptr() == kw["out"].data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < tol, f"{case}, M={M}, {dtype}: relative error {err:.2e}"


def test_rejects_bad_shapes():
    x, w, *_ = inputs(17, torch.float32)
    with pytest.raises(ValueError, match="M <= 16"):
        few_row_linear(x, w)
    x, w, *_ = inputs(2, torch.float32)
    with pytest.raises(ValueError, match="prefetch_k=100"):
        few_row_linear(x, w, prefetch_k=100)
    with pytest.raises(ValueError, match="prefetch_k=192"):  # 3 lines: not a power of two
        few_row_linear(x, w, prefetch_k=192)
    with pytest.raises(ValueError, match="weight"):
        few_row_linear(x, w[:, :64])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16])
def test_bf16_with_pdl_and_prefetch_on_gpu(M):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, 2048, device=dev, generator=g).bfloat16()
    w = (torch.randn(4096, 2048, device=dev, generator=g) * 2048 ** -0.5).bfloat16()
    nw, nb = torch.randn(2048, device=dev).bfloat16(), torch.randn(2048, device=dev).bfloat16()
    pdl = pdl_supported(dev)
    got = few_row_linear(x, w, None, norm=("layernorm", nw, nb, 1e-5), gelu=True, pdl=pdl,
                         prefetch_k=2048 if pdl else 0)
    want = reference(x, w, None, ("layernorm", nw, nb, 1e-5), True, None)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 1e-2, f"relative error {err:.2e}"
