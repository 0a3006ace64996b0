"""The fast path's Triton kernels (tasks/train/kernels.py): on a GPU as they run in training, without one
in Triton's CPU interpreter (conftest switches it on). The NF4 dequantization is compared bit for
bit with bitsandbytes', the dropout mask for reproducibility and its rate, and the fused LoRA
function and the frozen-linear function, with the kernels on, with the same math written out."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from tasks.train import fastpath, kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# triton is a dependency on linux x86_64 (pyproject.toml): missing there, these tests fail; on other
# platforms it has no build, the fast path runs its torch fallbacks, and these tests skip
TRITON_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(kernels.triton is None and not TRITON_PLATFORM,
                                reason=f"no Triton build for this platform ({sys.platform} {platform.machine()})")


@pytest.fixture(autouse=True)
def _triton_runs_here():
    if kernels.triton is None:
        pytest.fail("triton is not installed, but it is a dependency on linux x86_64 (pyproject.toml): "
                    "pip install the project again", pytrace=False)
    if not (DEV == "cuda" or kernels.INTERPRET):
        pytest.fail("no CUDA device and TRITON_INTERPRET is not 1: tests/conftest.py sets it where "
                    "/dev/nvidiactl is absent; set TRITON_INTERPRET=1 to run the kernels on the CPU", pytrace=False)


def _quantized(shape, nested=True, quant_type="nf4", dtype=torch.bfloat16, seed=0, storage=torch.uint8):
    import bitsandbytes.functional as F

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype).to(DEV)
    return F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type, quant_storage=storage)


@pytest.mark.parametrize("shape,nested,quant_type,dtype,storage", [
    ((96, 320), True, "nf4", torch.bfloat16, torch.uint8),   # the production layout: NF4, double quant, bf16
    ((64, 192), False, "nf4", torch.bfloat16, torch.uint8),  # plain float32 absmax
    ((96, 128), True, "fp4", torch.bfloat16, torch.uint8),
    ((80, 64), True, "nf4", torch.float16, torch.uint8),
    ((40, 128), True, "nf4", torch.float32, torch.uint8),    # (bnb's own CPU kernel mis-scales rows not a multiple of 64)
    ((3, 65), True, "nf4", torch.bfloat16, torch.uint8),     # an odd element count: the last byte holds one value
    ((64, 128), True, "nf4", torch.bfloat16, torch.bfloat16),  # FSDP-QLoRA's bf16 storage of the same bytes
])
def test_dequant_equals_bitsandbytes_bit_for_bit(shape, nested, quant_type, dtype, storage):
    import bitsandbytes.functional as F

    q, qs = _quantized(shape, nested, quant_type, dtype, storage=storage)
    assert kernels.dequant_supported(q, qs)
    ref = F.dequantize_4bit(q, qs).view(shape)
    got = kernels.dequantize_nf4(q, qs, rows=4)  # several programs, the last one partly masked
    assert got.shape == shape and got.dtype == dtype
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # bits: torch.equal takes -0.0 for 0.0
    assert torch.equal(got.view(bits), ref.view(bits)), (got.float() - ref.float()).abs().max()


def test_dequant_keeps_nan_and_follows_a_replaced_state():
    """A NaN scale dequantizes to NaN as in bitsandbytes (not to a rounded -0.0), and a quant state
    whose tensors are swapped on the same object (QuantState.to, a reload) is read afresh."""
    import bitsandbytes.functional as F

    q, qs = _quantized((64, 128), nested=False)
    kernels.dequantize_nf4(q, qs)  # caches the arguments
    qs.absmax = qs.absmax.clone()
    qs.absmax[1] = float("nan")
    got, ref = kernels.dequantize_nf4(q, qs), F.dequantize_4bit(q, qs).view(64, 128)
    assert torch.equal(got.isnan(), ref.isnan()) and int(got.isnan().sum()) == 64
    q2, qs2 = _quantized((64, 128), seed=1)
    _, qs1 = _quantized((64, 128), seed=2)
    kernels.dequantize_nf4(q2, qs2)
    qs2.absmax, qs2.state2, qs2.offset = qs1.absmax, qs1.state2, qs1.offset
    assert torch.equal(kernels.dequantize_nf4(q2, qs2).view(torch.int16),
                       F.dequantize_4bit(q2, qs2).view(64, 128).view(torch.int16))


def test_dequant_falls_back_where_the_kernel_does_not_apply():
    q, qs = _quantized((32, 64))
    assert not kernels.dequant_supported(q.float().requires_grad_(True), qs)  # a trainable float: not packed bytes
    assert not kernels.dequant_supported(q.view(-1, 2).t(), qs)  # not contiguous
    qs.quant_type = "int4"
    assert not kernels.dequant_supported(q, qs)


def test_dropout_mask_is_a_function_of_seed_and_index():
    x = torch.randn(64, 100, device=DEV).to(torch.bfloat16)
    a = kernels.dropout_keep(x, 0.05, 1234, block=512)
    assert torch.equal(a, kernels.dropout_keep(x, 0.05, 1234, block=1024))  # not of the launch shape
    assert not torch.equal(a, kernels.dropout_keep(x, 0.05, 1235, block=512))
    kept = a != 0
    assert torch.equal(a[kept], x[kept])  # kept elements unchanged (rescaling is the caller's)
    y = x.clone()
    assert kernels.dropout_keep(y, 0.05, 1234, out=y, block=512) is y and torch.equal(y, a)  # in place
    # another tensor of the same shape loses the same elements: how the backward finds the mask again
    z = kernels.dropout_keep(torch.ones_like(x), 0.05, 1234, block=512)
    assert torch.equal(z == 0, (a == 0) | (x == 0))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_rate_and_independence(p):
    n = 1 << 18
    ones = torch.ones(n, device=DEV)
    d1 = kernels.dropout_keep(ones, p, 7) == 0
    d2 = kernels.dropout_keep(ones, p, 8) == 0
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(float(d1.float().mean()) - p) < 5 * sd
    # two seeds are independent: both drop an element with probability p^2
    assert abs(float((d1 & d2).float().mean()) - p * p) < 5 * (p * p / n) ** 0.5 + 1e-4
    # and neighbours too (8 elements share one Philox call)
    assert abs(float((d1[1:] & d1[:-1]).float().mean()) - p * p) < 5 * (p * p / n) ** 0.5 + 1e-4
    assert kernels.keep_threshold(0.05) == 3277  # p rounded to a multiple of 1/65536
    with pytest.raises(ValueError):
        kernels.keep_threshold(1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.dropout_keep(torch.ones(8, 8, device=DEV).t(), 0.1, 1)


def test_qlora_function_with_kernels_equals_the_math_with_its_mask():
    """QLoraLinear with the kernels: y = x·Wᵀ + s/(1-p)·(drop(x)·Aᵀ)·Bᵀ, the backward regenerating the
    forward's mask. Output and all three gradients equal autograd over the written-out math."""
    import bitsandbytes.functional as F

    p, seed, scaling = 0.3, 99, 2.0
    q, qs = _quantized((48, 64), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g).to(DEV).requires_grad_(True)
    a = (torch.randn(8, 64, generator=g) * 0.1).to(DEV).requires_grad_(True)
    b = (torch.randn(48, 8, generator=g) * 0.1).to(DEV).requires_grad_(True)
    y = fastpath.QLoraLinear.apply(x, a, b, q, qs, scaling, p, seed, True)
    y.backward(torch.ones_like(y))
    keep = kernels.dropout_keep(torch.ones_like(x.detach()), p, seed)
    assert 0.2 < float((keep == 0).float().mean()) < 0.4
    w = F.dequantize_4bit(q, qs).view(48, 64)
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    yr = xr @ w.t() + scaling / (1 - p) * ((xr * keep) @ ar.t()) @ br.t()
    yr.backward(torch.ones_like(yr))
    for got, ref in ((y, yr), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_nf4_linear_equals_bitsandbytes_matmul():
    import bitsandbytes as bnb

    q, qs = _quantized((48, 64), dtype=torch.float32)
    x = torch.randn(2, 7, 64, device=DEV, requires_grad=True)
    y = fastpath.NF4Linear.apply(x, q, qs)
    y.backward(torch.ones_like(y))
    xr = x.detach().clone().requires_grad_(True)
    yr = bnb.matmul_4bit(xr, q.t(), quant_state=qs)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU: host syncs exist on a GPU only")
def test_kernels_never_wait_for_the_gpu():
    """No host sync in the kernels' calls or the fused functions around them (one per layer would
    leave the GPU idle while Python catches up: an early version read the nested offset with float())."""
    q, qs = _quantized((256, 512))
    x = torch.randn(4, 16, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(8, 512, device=DEV, requires_grad=True)
    b = torch.randn(256, 8, device=DEV, requires_grad=True)
    kernels.dequantize_nf4(q, qs)  # compile, and make the cached arguments, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.dequantize_nf4(q, qs)
        y = fastpath.QLoraLinear.apply(x, a, b, q, qs, 2.0, 0.1, 5, True) + fastpath.NF4Linear.apply(x, q, qs)
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(DEV == "cuda", reason="CPU only: the tiny CPU model; tests/test_gpu.py covers the GPU")
def test_kernel_dropout_survives_recomputation(tiny_model_dir, monkeypatch):
    """With gradient checkpointing the recomputed forward must drop the same elements as the first
    one (the seed comes from the CPU generator, which checkpointing restores): gradients with and
    without recomputation are equal, and differ from another draw's."""
    from test_fastpath import _grads, _nf4_peft

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    grads, draws = [], []
    real = kernels.dropout_keep
    monkeypatch.setattr(kernels, "dropout_keep", lambda *a, **kw: draws.append(1) or real(*a, **kw))
    for recompute, seed in ((False, 11), (True, 11), (False, 12)):
        m = _nf4_peft(tiny_model_dir, dropout=0.3)
        fp = fastpath.FastPath(attention="sdpa", liger=False, fast_lora=True, recompute=recompute,
                               recompute_layers=None, offload=False, kernels=True)
        fastpath.prepare_base(m.base_model.model, fp)
        fastpath.prepare_peft(m, fp)
        m.train()
        torch.manual_seed(seed)
        draws.clear()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append(_grads(m))
        # 6 LoRA layers: a draw in the forward and one for A's gradient in the backward, one for the input
        # gradient where the input needs one (not in the first layer unless recomputation makes the
        # embeddings require grad), and with recomputation the forward's again
        assert len(draws) == (6 + 6 + 6 + 6 if recompute else 6 + 6 + 3)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(grads[2][k], grads[0][k]) for k in grads[0] if "lora_A" in k)


@pytest.mark.skipif(DEV == "cuda", reason="CPU only: the tiny CPU model; tests/test_gpu.py covers the GPU")
def test_fast_path_with_kernels_matches_plain_peft(tiny_model_dir):
    """The whole tiny NF4 model with every frozen 4-bit linear on the kernels (LoRA'd q/k/v through
    QLoraLinear, o/gate/up/down through NF4Linear): loss and gradients equal plain PEFT's."""
    import bitsandbytes as bnb
    from test_fastpath import _grads, _nf4_peft

    plain, fast = _nf4_peft(tiny_model_dir), _nf4_peft(tiny_model_dir)
    fp = fastpath.FastPath(attention="sdpa", liger=False, fast_lora=True, recompute=False, recompute_layers=None,
                           offload=False, kernels=True)
    assert fastpath.prepare_peft(fast, fp) == 6
    patched = [m for m in fast.modules() if isinstance(m, bnb.nn.Linear4bit) and "forward" in m.__dict__]
    assert len(patched) == 2 * 7  # every frozen 4-bit linear of both layers
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    res = {}
    for name, m in (("plain", plain), ("fast", fast)):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        res[name] = (loss.detach(), _grads(m))
    torch.testing.assert_close(res["fast"][0], res["plain"][0], rtol=1e-5, atol=1e-6)
    for k, v in res["plain"][1].items():
        assert v.abs().max() > 0, k
        torch.testing.assert_close(res["fast"][1][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert fastpath.disable_fast_lora(fast) == 6
    assert not any("forward" in m.__dict__ for m in fast.modules())
