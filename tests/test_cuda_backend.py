"""CUDA backend (csrc/cuda) vs the reference oracle on fresh random inputs.

GPU tests are marked ``cuda`` and skip cleanly without a GPU; the can_run / availability
tests at the bottom also run on CPU-only machines. Outputs are poisoned before each
kernel call (the caching allocator hands the NaN-filled block back to the op), so an
element the kernel never writes shows up as NaN or a sentinel.
"""
import functools

import pytest
import torch

from kquant.backends import cuda as C
from kquant.backends import reference as R
from kquant.backends.base import Backend
from kquant.format import PER_CHANNEL, quantize_weight
from kquant.spec import LinearSpec

OK, WHY = C.BACKEND.available()
gpu = pytest.mark.skipif(not OK, reason=f"CUDA backend unavailable: {WHY}")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# output dtype -> tolerance on max|err| / max|ref| (fp32 math, one rounding to the dtype)
TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DEV = "cuda"


def poison(numel, dtype):
    """Leave a block full of NaN (floats) or a sentinel (ints) in the caching allocator."""
    # int8: -128, which symmetric quantization never writes
    fill = float("nan") if dtype.is_floating_point else -128 if dtype == torch.int8 else -1234567
    t = torch.full((max(numel, 1),), fill, dtype=dtype, device=DEV)
    del t


def close(y, ref, dtype=None):
    dtype = dtype or ref.dtype
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, ref.dtype, y.shape, ref.shape)
    assert torch.isfinite(y.float()).all(), "unwritten (poisoned) or non-finite outputs"
    if ref.numel() == 0:
        return
    err = (y.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-6)
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs max|ref| {scale:.3g} ({dtype})"


def ref_act(op, x, qw, sw, bias, act, group):
    return R.act_linear(x, qw, sw, bias, act, group, 8 if op.startswith("w8") else 4)


def ref_wo(op, x, qw, sw, zw, bias, group):
    return R.weight_only_linear(x, qw, sw, zw, bias, group, 8 if op.startswith("w8") else 4)


def exact_rows(m, k, dtype):
    """Random x whose per-token quantization lands exactly on integers (integers times a power of
    two per row, each row holding +-127): GEMM checks then do not hinge on rounding ties."""
    q = torch.randint(-127, 128, (m, k))
    q[:, torch.randint(0, k, (m,))] = 127 * (1 - 2 * torch.randint(0, 2, (m, 1)))
    scale = torch.pow(2.0, torch.randint(-9, -3, (m, 1)).float())
    return (q.float() * scale).to(dtype).to(DEV)


# ----------------------------------------------------------------------------- quantize
@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 17), (5, 1024), (7, 1025), (64, 4096)])
def test_quantize_per_token_bit_identical(dtype, m, k):
    x = torch.randn(m, k, device=DEV).to(dtype) * 3
    if m > 2:
        x[1] = 0                                  # all-zero row: scale 1, q 0
        x[2, : k // 2 + 1] = x[2].abs().max()    # ties at amax -> +127
    poison(m * k, torch.int8)
    q, s = torch.ops.kquant._quantize_per_token_cuda(x, None)
    qr, sr = R.quantize_per_token(x)  # device-independent definition (IEEE reciprocal, then * 127)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_static_bit_identical(dtype):
    x = torch.randn(9, 520, device=DEV).to(dtype)
    act = torch.tensor([0.0123], device=DEV)
    q, s = torch.ops.kquant._quantize_per_token_cuda(x, act)
    qr, sr = R.quantize_static(x, act)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr.contiguous())


# ----------------------------------------------------------------------------- int8_mm
@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (17, 33, 48), (128, 128, 64), (129, 257, 1040),
                                   (300, 200, 4096), (1024, 384, 512), (1100, 260, 256)])
def test_int8_mm_exact(m, n, k):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    poison(m * n, torch.int32)
    y = torch.ops.kquant._int8_mm_cuda(a, b)
    assert torch.equal(y, R.int8_mm(a, b))


@gpu
@pytest.mark.cuda
def test_int8_mm_extremes():
    k = 4096
    a = torch.full((33, k), 127, dtype=torch.int8, device=DEV)
    a[1::2] = -127
    b = torch.full((65, k), -127, dtype=torch.int8, device=DEV)
    y = torch.ops.kquant._int8_mm_cuda(a, b)
    assert torch.equal(y, R.int8_mm(a, b))
    assert y.abs().max().item() == 127 * 127 * k


@gpu
@pytest.mark.cuda
def test_int8_mm_both_gemm_kernels(monkeypatch):
    # mma.sync by default; with KQUANT_CUDA_WGMMA=1, on sm_90 per-channel int8 GEMMs use the
    # wgmma kernel once it passed its self-check against mma.sync. Both must be exact.
    dev = torch.cuda.current_device()
    monkeypatch.delenv("KQUANT_CUDA_WGMMA", raising=False)
    assert not torch.ops.kquant._cuda_wgmma_enabled(dev)
    monkeypatch.setenv("KQUANT_CUDA_WGMMA", "1")
    enabled = torch.ops.kquant._cuda_wgmma_enabled(dev)
    if torch.cuda.get_device_capability() == (9, 0):
        assert enabled, "the sm_90a wgmma GEMM failed its self-check (see the warning)"
    else:
        assert not enabled
    a = torch.randint(-127, 128, (333, 1104), dtype=torch.int8, device=DEV)
    b = torch.randint(-127, 128, (250, 1104), dtype=torch.int8, device=DEV)
    ref = R.int8_mm(a, b)
    for flag in ("1", "0"):
        monkeypatch.setenv("KQUANT_CUDA_WGMMA", flag)
        poison(333 * 250, torch.int32)
        assert torch.equal(torch.ops.kquant._int8_mm_cuda(a, b), ref), f"KQUANT_CUDA_WGMMA={flag}"


@gpu
@pytest.mark.cuda
def test_int8_mm_empty():
    a = torch.zeros(0, 32, dtype=torch.int8, device=DEV)
    b = torch.randint(-127, 128, (8, 32), dtype=torch.int8, device=DEV)
    assert torch.ops.kquant._int8_mm_cuda(a, b).shape == (0, 8)


# ----------------------------------------------------------------------------- W8A8 / W4A8
@functools.lru_cache(maxsize=6)  # LLM-sized weights are quantized once per module, not per test
def _weights(n, k, bits, group, symmetric=True):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 131 + k * 7 + bits + group)) * 0.05
    pw = quantize_weight(w, bits, group, symmetric=symmetric)
    return (pw.qweight.to(DEV), pw.scales.to(DEV), None if pw.zeros is None else pw.zeros.to(DEV),
            pw.padded_in_features)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("op,bits", [("w8a8_linear", 8), ("w4a8_linear", 4)])
@pytest.mark.parametrize("group", (PER_CHANNEL, 32, 64, 128))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (37, 130, 384), (256, 512, 1024)])
def test_act_linear_vs_reference(op, bits, group, dtype, m, n, k):
    qw, sw, _, kp = _weights(n, k, bits, group)
    x = exact_rows(m, kp, dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if m % 2 else None
    poison(m * n * 4, torch.float32)
    y = getattr(torch.ops.kquant, f"_{op}_cuda")(x, qw, sw, bias, None, group)
    ref = ref_act(op, x, qw, sw, bias, None, group)
    close(y, ref)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("op,bits", [("w8a8_linear", 8), ("w4a8_linear", 4)])
def test_act_linear_random_inputs_and_static_scale(op, bits):
    # fully random activations: a rare q tie may flip by one step, so compare by norm
    qw, sw, _, kp = _weights(384, 2048, bits, 128)
    x = torch.randn(70, kp, device=DEV, dtype=torch.bfloat16)
    fn = getattr(torch.ops.kquant, f"_{op}_cuda")
    for act in (None, torch.tensor([0.02], device=DEV)):
        y = fn(x, qw, sw, None, act, 128).float()
        ref = ref_act(op, x, qw, sw, None, act, 128).float()
        assert torch.isfinite(y).all()
        assert ((y - ref).norm() / ref.norm()).item() < 1e-2


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 14336)])
def test_w4a8_llm_shapes(n, k):
    qw, sw, _, kp = _weights(n, k, 4, 128)
    x = exact_rows(33, kp, torch.float16)
    y = torch.ops.kquant._w4a8_linear_cuda(x, qw, sw, None, None, 128)
    close(y, ref_act("w4a8_linear", x, qw, sw, None, None, 128))


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("group", (PER_CHANNEL, 128))
@pytest.mark.parametrize("wgmma", ("1", "0"))
def test_w8a8_large_m(group, wgmma, monkeypatch):
    # 17 row tiles: the grouped raster's last group holds a single row tile; N has a partial tile
    monkeypatch.setenv("KQUANT_CUDA_WGMMA", wgmma)
    qw, sw, _, kp = _weights(520, 1024, 8, group)
    x = exact_rows(2100, kp, torch.bfloat16)
    bias = torch.randn(520, device=DEV, dtype=torch.bfloat16)
    poison(2100 * 520, torch.bfloat16)
    y = torch.ops.kquant._w8a8_linear_cuda(x, qw, sw, bias, None, group)
    close(y, ref_act("w8a8_linear", x, qw, sw, bias, None, group))


# ----------------------------------------------------------------------------- weight-only GEMV
@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("op,bits", [("w8a16_linear", 8), ("w4a16_linear", 4)])
@pytest.mark.parametrize("group", (PER_CHANNEL, 32, 128))
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", (1, 3, 8, 16))
def test_weight_only_vs_reference(op, bits, group, symmetric, dtype, m):
    n, k = (300, 1088) if m % 2 else (97, 4160)
    qw, sw, zw, kp = _weights(n, k, bits, group, symmetric)
    x = torch.randn(m, kp, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if m != 8 else None
    poison(m * n * 4, torch.float32)
    y = getattr(torch.ops.kquant, f"_{op}_cuda")(x, qw, sw, zw, bias, group)
    ref = ref_wo(op, x, qw, sw, zw, bias, group)
    close(y, ref)


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("mma", ("1", "0"))
@pytest.mark.parametrize("group", (PER_CHANNEL, 128))
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("m", (1, 7, 16))
def test_w4a16_tensor_core_and_fma_paths(mma, group, symmetric, dtype, m, monkeypatch):
    # int4 + 16-bit x + one scale per 128 k runs on mma.sync unless KQUANT_CUDA_GEMV_MMA=0;
    # K = 640 gives a partial split-K slice, N = 200 a partial row block
    monkeypatch.setenv("KQUANT_CUDA_GEMV_MMA", mma)
    qw, sw, zw, kp = _weights(200, 640, 4, group, symmetric)
    x = torch.randn(m, kp, device=DEV).to(dtype)
    bias = torch.randn(200, device=DEV).to(dtype)
    poison(m * 200 * 2, dtype)
    y = torch.ops.kquant._w4a16_linear_cuda(x, qw, sw, zw, bias, group)
    close(y, ref_wo("w4a16_linear", x, qw, sw, zw, bias, group))


@gpu
@pytest.mark.cuda
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", (1, 5, 16))
def test_weight_only_llm_shapes(bits, n, k, m):
    qw, sw, zw, kp = _weights(n, k, bits, 128 if bits == 4 else PER_CHANNEL)
    x = torch.randn(m, kp, device=DEV, dtype=torch.bfloat16)
    op = "w8a16_linear" if bits == 8 else "w4a16_linear"
    fn = getattr(torch.ops.kquant, f"_{op}_cuda")
    y = fn(x, qw, sw, zw, None, 128 if bits == 4 else PER_CHANNEL)
    close(y, ref_wo(op, x, qw, sw, zw, None, 128 if bits == 4 else PER_CHANNEL))
    # split-K tickets reset themselves: a second call (and one on another stream) agrees bitwise
    assert torch.equal(fn(x, qw, sw, zw, None, 128 if bits == 4 else PER_CHANNEL), y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y2 = fn(x, qw, sw, zw, None, 128 if bits == 4 else PER_CHANNEL)
    s.synchronize()
    assert torch.equal(y2, y)


# ----------------------------------------------------------------------------- through the router
@gpu
@pytest.mark.cuda
def test_public_ops_forced_to_cuda(monkeypatch):
    from kquant import backends
    monkeypatch.setenv("KQUANT_BACKEND", "cuda")
    qw, sw, _, kp = _weights(256, 512, 4, 128)
    x = torch.randn(2, 3, kp, device=DEV, dtype=torch.float16)
    assert backends.choose(LinearSpec(4, 128, True, False, kp, 256, x.device)) == "cuda"
    y = torch.ops.kquant.w4a16_linear(x, qw, sw, None, None, 128)
    close(y, ref_wo("w4a16_linear", x.reshape(-1, kp), qw, sw, None, None, 128).reshape(2, 3, 256))
    y8 = torch.ops.kquant.w4a8_linear(x, qw, sw, None, None, 128)
    assert y8.shape == (2, 3, 256) and torch.isfinite(y8.float()).all()


@gpu
@pytest.mark.cuda
def test_unsupported_shapes_are_refused_with_reasons():
    dev = torch.device(DEV, torch.cuda.current_device())
    x = torch.randn(17, 48, device=DEV)   # K = 48: fine for int8
    ok, why = C.BACKEND.can_run(LinearSpec(8, PER_CHANNEL, True, False, 48, 64, dev), x)
    assert not ok and "M=17" in why
    assert C.BACKEND.can_implement(LinearSpec(8, PER_CHANNEL, True, True, 48, 64, dev))[0]
    assert C.BACKEND.can_run(LinearSpec(8, PER_CHANNEL, True, True, 48, 64, dev), x)[0]
    ok, why = C.BACKEND.can_implement(LinearSpec(4, PER_CHANNEL, True, False, 50, 64, dev))  # Kp = 50
    assert not ok and "multiple of 32" in why
    assert not C.BACKEND.reads(21)
    a = torch.randint(-127, 128, (4, 40), dtype=torch.int8, device=DEV)
    ok, why = C.BACKEND.can_run_op("int8_mm", a, a)
    assert not ok and "multiple of 16" in why


# ----------------------------------------------------------------------------- everywhere (no GPU needed)
def test_backend_contract():
    assert isinstance(C.BACKEND, Backend) and C.BACKEND.name == "cuda" and C.BACKEND.per_call_checks
    ok, why = C.BACKEND.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why


def test_cpu_tensors_are_refused():
    ok, why = C.BACKEND.can_implement(LinearSpec(8, PER_CHANNEL, True, False, 64, 8))
    assert not ok and "cpu" in why
    a = torch.zeros(2, 64, dtype=torch.int8)
    ok, why = C.BACKEND.can_run_op("int8_mm", a, a)
    assert not ok and "cpu" in why
