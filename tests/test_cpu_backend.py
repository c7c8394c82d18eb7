"""CPU backend (csrc/cpu: scalar, AVX2, AVX-512 and AMX levels) against the reference oracle.

The reference functions are called directly. Integer results must be identical; float
results are bit-identical where the kernels mirror the reference's operation order
(per-channel W8A8/W4A8) and within a dtype-tied tolerance elsewhere. Both the AVX2 and
the scalar path (KQUANT_CPU_ISA=scalar) run every case, and so do the AVX-512 and AMX-INT8
levels where the machine has them (KQUANT_CPU_ISA=avx2|avx512 caps the level).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kquant
from kquant.backends import reference as ref
from kquant.format import pack_int4, padded_k, quantize_weight, to_canonical
from kquant.spec import LinearSpec

cpu = pytest.importorskip("kquant.backends.cpu")
if not kquant.backends()["cpu"]["available"]:
    pytest.skip(f"cpu backend unavailable: {kquant.backends()['cpu']['reason']}", allow_module_level=True)

BEST = cpu.best_isa()
HAS_AVX2 = BEST != "scalar"
HAS_AVX512 = BEST in ("avx512", "amx")
HAS_AMX = BEST == "amx"
ISAS = [n for n, ok in (("amx", HAS_AMX), ("avx512", HAS_AVX512), ("avx2", HAS_AVX2), ("scalar", True)) if ok]
ISA_IDS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}


def set_isa(monkeypatch, name):
    if name == "amx":
        monkeypatch.delenv("KQUANT_CPU_ISA", raising=False)  # the default: the best there is
    else:
        monkeypatch.setenv("KQUANT_CPU_ISA", name)
    assert torch.ops.kquant._cpu_isa() == ISA_IDS[name]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tolerance of the float epilogue relative to the output's norm, tied to the output dtype
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
HSET = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    set_isa(monkeypatch, request.param)
    return request.param


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(m, k, n, bits, gs, dtype=torch.float32, symmetric=True, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g)
    pw = quantize_weight(w, bits, gs, symmetric=symmetric)
    kp = padded_k(k, bits, gs)
    xp = torch.nn.functional.pad(x, (0, kp - k))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return xp, pw, b


def blocked(pw):
    return (cpu.int8_to_blocked(pw.qweight), 1) if pw.bits == 8 else (cpu.int4_to_blocked(pw.qweight), 2)


def cpu_linear(pw, x, qweight, layout, bias=None, act_scale=None, zeros=None, int8_activations=True, k=None):
    """The cpu backend's kernel for a layer like ``pw`` on a padded x."""
    spec = LinearSpec(pw.bits, pw.group_size, zeros is None, int8_activations, k or pw.in_features, pw.out_features)
    return cpu.BACKEND.linear(spec, x, qweight, layout, pw.scales, zeros, bias, act_scale)


def run_act(pw, xp, b, act_scale=None, canonical=False):
    wq, lay = (pw.qweight, 0) if canonical else blocked(pw)
    y = cpu_linear(pw, xp, wq, lay, b, act_scale)
    r = ref.act_linear(xp, pw.qweight, pw.scales, b, act_scale, pw.group_size, pw.bits)
    return y, r


def run_wo(pw, xp, b):
    wq, lay = blocked(pw)
    y = cpu_linear(pw, xp, wq, lay, b, zeros=pw.zeros, int8_activations=False)
    r = ref.weight_only_linear(xp, pw.qweight, pw.scales, pw.zeros, b, pw.group_size, pw.bits)
    return y, r


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k,gs", [(1, 1, -1), (17, 17, -1), (9, 1025, -1), (8, 64, 32), (33, 256, 128), (5, 96, 32)])
def test_layout_round_trip_is_exact(bits, n, k, gs):
    pw = quantize_weight(torch.randn(n, k), bits, gs, symmetric=(bits == 8))
    data, lay = blocked(pw)
    kp = pw.padded_in_features
    width = 16 if bits == 8 else 8  # output channels per block
    assert data.shape[:3] == (-(-n // width), -(-kp // 64) * (16 if bits == 8 else 8), width)  # K padded to 64
    back = to_canonical(data, lay, bits, n, kp)
    assert back.dtype == pw.qweight.dtype and torch.equal(back, pw.qweight)


def test_prepare_weight_through_quantlinear_keeps_one_copy():
    from kquant.nn import QuantLinear
    lin = torch.nn.Linear(70, 19)
    for cfg, lay in (("w8a8", 1), ("w4a16", 2), ("w8a16", 1), ("w4a8", 2)):
        q = QuantLinear.from_linear(lin, cfg)
        if q.backend() != "cpu":
            pytest.skip("router does not pick cpu (KQUANT_BACKEND set?)")
        assert q.layout == lay and q.qweight.dim() == 4
        sd = q.state_dict()
        assert torch.equal(sd["qweight"], q.packed_weight().qweight)
        assert sd["qweight"].dim() == 2
        x = torch.randn(3, 5, 70)
        y = q(x)
        r = torch.nn.functional.linear(x, q.dequantize_weight(), lin.bias)
        assert y.shape == (3, 5, 19) and rel_err(y, r) < 0.05


# ----------------------------------------------------------------------------- quantize / int8_mm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(0, 8), (1, 1), (3, 17), (4, 100), (5, 1025), (33, 64)])
def test_quantize_per_token_bit_identical(isa, dtype, m, k):
    x = (torch.randn(m, k) * 3).to(dtype)
    if m > 2:
        x[1] = 0
        x[2, : k // 2 + 1] = torch.tensor([0.5, -1.5, 2.5]).repeat(k)[: k // 2 + 1].to(dtype)  # ties
    q, s = cpu.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@given(m=st.integers(0, 9), n=st.integers(1, 40), k=st.integers(1, 300), mode=st.sampled_from(["rand", "max", "min"]))
@HSET
def test_int8_mm_exact(isa, m, n, k, mode):
    if mode == "rand":
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    else:  # the saturation trap: every pair at the extreme
        v = 127 if mode == "max" else -128
        a = torch.full((m, k), v, dtype=torch.int8)
        b = torch.full((n, k), v, dtype=torch.int8)
    y = cpu.int8_mm(a, b)
    assert y.dtype == torch.int32 and torch.equal(y, ref.int8_mm(a, b))


def test_int8_mm_large_k_and_noncontiguous(isa):
    a = torch.randint(-128, 128, (7, 4100), dtype=torch.int8)
    b = torch.randint(-128, 128, (4100, 19), dtype=torch.int8).t()  # non-contiguous [19, 4100]
    assert torch.equal(cpu.int8_mm(a, b), ref.int8_mm(a, b.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [5, 64, 100])
def test_quantize_nonfinite_and_tiny_rows(isa, dtype, k):
    # rows 0-2 hold NaN, +Inf, -Inf among ordinary values: q = 0 and scale NaN, so every
    # output of theirs is NaN; rows 3-6 are subnormal or tiny (amax < 2^-64: x and amax are
    # lifted by 2^64 before the reciprocal, which would overflow); rows 7-8 are ordinary
    x = torch.randn(9, k)
    x[0, k // 2] = float("nan")
    x[1, 0] = float("inf")
    x[2, k - 1] = -float("inf")
    for i, size in zip(range(3, 7), (1e-40, 1e-38, 1e-30, 3e-37)):
        x[i] = torch.randn(k) * size
    x = x.to(dtype)
    bad = torch.arange(9) < 3
    rq, rs = ref.quantize_per_token(x)
    assert (rq[bad] == 0).all() and rs[bad].isnan().all() and not rs[~bad].isnan().any()
    for q, s in (cpu.quantize_per_token(x), cpu.BACKEND.quantize_per_token(x)):
        assert torch.equal(q, rq)
        torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)
    # through W8A8 / W4A8, per token and with a static scale (which has no amax pass), on
    # the int16 GEMM (9 rows), the sign-trick GEMM (3 rows) and one row
    clean = x.clone()
    clean[bad] = torch.randn(3, k).to(dtype)
    for bits in (8, 4):
        pw = quantize_weight(torch.randn(40, k), bits, -1)
        kp = padded_k(k, bits, -1)
        xp, cp = (torch.nn.functional.pad(t, (0, kp - k)) for t in (x, clean))
        b = torch.randn(40).to(dtype)
        for act in (None, torch.tensor([0.02])):
            for rows in (slice(0, 9), slice(0, 3), slice(1, 2)):
                y, r = run_act(pw, xp[rows], b, act)
                yc, _ = run_act(pw, cp[rows], b, act)
                nan = bad[rows]
                assert y[nan].isnan().all() and not y[~nan].isnan().any(), (bits, act, rows)
                assert torch.equal(y[~nan], yc[~nan]), (bits, act, rows)  # the other rows are unchanged
                torch.testing.assert_close(y, r, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- W8A8 / W4A8
@given(m=st.integers(0, 14), n=st.integers(1, 40), k=st.integers(1, 300), gs=st.sampled_from([-1, 32, 64, 128]),
       bits=st.sampled_from([8, 4]), static=st.booleans())
@HSET
def test_act_linear_matches_reference(isa, m, n, k, gs, bits, static):
    xp, pw, b = make(m, k, n, bits, gs)
    act = torch.tensor([0.02]) if static else None
    y, r = run_act(pw, xp, b, act)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if gs == -1 or pw.scales.shape[1] == 1:
        assert torch.equal(y, r)  # same int32, same fp32 operations in the same order
    else:
        torch.testing.assert_close(y, r, rtol=2e-6, atol=2e-6 * (r.abs().max().item() if r.numel() else 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
def test_act_linear_every_dtype_and_group(isa, dtype, bits, gs):
    for m in (1, 2, 3, 4, 7):  # sign-trick rows (<= 3) and int16 GEMM tiles
        xp, pw, b = make(m, 300, 21, bits, gs, dtype)
        y, r = run_act(pw, xp, b)
        assert y.dtype == dtype
        if gs == -1:
            assert torch.equal(y, r)
        else:
            assert rel_err(y, r) <= TOL[dtype]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sign", [1, -1])
def test_saturation_extremes_are_exact(isa, bits, sign):
    # every activation quantizes to +-127 and every weight to +-127 (int4: +-7): the
    # naive vpmaddubsw pair sum would saturate at 32767
    k, n = 1024 + 8, 40  # 4 channel blocks (the M = 1 kernels' unit) and a tail block
    for m in (1, 3, 8):
        x = torch.full((m, k), 1.0)
        x[:, 1::2] = -1.0 if sign < 0 else 1.0
        w = torch.full((n, k), float(sign))
        w[1::2] = -float(sign)
        pw = quantize_weight(w, bits, -1)
        assert pw.codes().abs().max() == (127 if bits == 8 else 7)
        y, r = run_act(pw, x, None)
        assert torch.equal(y, r)
        if bits == 8:
            qx, _ = ref.quantize_per_token(x)
            assert torch.equal(cpu.int8_mm(qx, pw.qweight), ref.int8_mm(qx, pw.qweight))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [25, 64, 100])
def test_single_row_four_block_path(isa, bits, n):
    # M = 1 runs 4 channel blocks per pass; tails of 1..3 blocks and partial blocks
    for gs in (-1, 64):
        xp, pw, b = make(1, 320, n, bits, gs)
        y, r = run_act(pw, xp, b)
        if gs == -1:
            assert torch.equal(y, r)
        else:
            torch.testing.assert_close(y, r, rtol=2e-6, atol=2e-6 * r.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
def test_single_row_every_op(isa, bits, gs):
    # decode (M = 1) kernels work on 4 channel blocks (32 channels) per pass: N not a multiple
    # of 8/16/32/64, K tails (padded to 64), every group size and input dtype, both weight-only
    # zero-point modes
    for i, (k, n, dtype) in enumerate(((200, 37, torch.float32), (320, 100, torch.float16),
                                       (130, 64, torch.bfloat16), (1000, 72, torch.float32))):
        xp, pw, b = make(1, k, n, bits, gs, dtype, seed=i)
        y, r = run_act(pw, xp, b)
        if gs == -1 or pw.scales.shape[1] == 1:
            assert torch.equal(y, r), (k, n, dtype)
        else:
            assert rel_err(y, r) <= TOL[dtype], (k, n, dtype)
        for sym in (True, False):
            xp, pw, b = make(1, k, n, bits, gs, dtype, symmetric=sym, seed=10 + i)
            y, r = run_wo(pw, xp, b)
            assert y.dtype == dtype and rel_err(y, r) <= TOL[dtype] + 1e-5, (k, n, dtype, sym)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
def test_tile_tails_and_tasks(isa, bits, gs):
    # AMX works on 32-row x 32-channel tile blocks, 256 x 256 tasks and 512-k chunks (W4A8
    # from 4 rows): rows and channels that end mid-tile, a lone last 8-channel block, K
    # padded to 64, several tasks and chunks, a task whose last 32-channel block is half empty
    for m, k, n in ((5, 128, 40), (16, 64, 8), (17, 200, 13), (31, 128, 24), (33, 320, 40), (129, 96, 17),
                    (200, 256, 72), (70, 1100, 300), (257, 576, 520)):
        xp, pw, b = make(m, k, n, bits, gs, seed=m)
        y, r = run_act(pw, xp, b)
        if gs == -1 or pw.scales.shape[1] == 1:
            assert torch.equal(y, r), (m, k, n)
        else:
            torch.testing.assert_close(y, r, rtol=2e-6, atol=2e-6 * r.abs().max().item())


@pytest.mark.parametrize("m", [4, 16, 40, 130])
def test_int8_mm_extremes_on_tiles(isa, m):
    for v in (127, -128):  # -128 x -128 too: AMX's tdpbssd takes every int8 exactly
        a = torch.full((m, 333), v, dtype=torch.int8)
        b = torch.full((21, 333), v, dtype=torch.int8)
        assert torch.equal(cpu.int8_mm(a, b), ref.int8_mm(a, b))


def test_canonical_weight_and_noncontiguous_x(isa):
    xp, pw, b = make(5, 96, 24, 8, 32)
    xt = torch.randn(96 * 2, 5).t()[:, ::2]  # non-contiguous [5, 96]
    for x in (xp, xt):
        y, r = run_act(pw, x, b, canonical=True)
        torch.testing.assert_close(y, r, rtol=2e-6, atol=1e-5)


def test_bias_dtype_may_differ_from_x(isa):
    xp, pw, _ = make(4, 64, 16, 8, -1, torch.bfloat16)
    b = torch.randn(16, dtype=torch.float16)
    y, r = run_act(pw, xp, b)
    assert torch.equal(y, r)


# ----------------------------------------------------------------------------- weight-only
@given(m=st.integers(0, 20), n=st.integers(1, 33), k=st.integers(1, 260), gs=st.sampled_from([-1, 32, 64, 128]),
       bits=st.sampled_from([8, 4]), sym=st.booleans())
@HSET
def test_weight_only_matches_reference(isa, m, n, k, gs, bits, sym):
    xp, pw, b = make(m, k, n, bits, gs, symmetric=sym)
    y, r = run_wo(pw, xp, b)
    assert y.shape == (m, n)
    if m:
        assert rel_err(y, r) <= 1e-5


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_weight_only_tiles_and_chunks(isa, bits, gs, sym):
    # the AMX-BF16 path (M >= 16): K chunks of 64..256 that must end at the padded K, row
    # and channel tails, several tasks, zero points applied per group
    for m, k, n in ((16, 260, 9), (33, 700, 40), (300, 384, 264), (17, 1000, 17), (1100, 64, 24)):
        xp, pw, b = make(m, k, n, bits, gs, symmetric=sym, seed=k)
        y, r = run_wo(pw, xp, b)
        assert rel_err(y, r) <= 1e-6, (m, k, n)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_zero_points_whole_and_fractional(isa, bits):
    # x all of one sign makes sum(x q) and z sum(x) large and close: whole zero points go
    # into the codes exactly (no cancellation); fractional ones take the x-sum correction.
    # M = 1 is the decode GEMV (AVX-512: per-lane z subtracted before the FMA), M = 40 the
    # AMX-BF16 / AVX2 GEMMs.
    for m in (1, 40):
        xp, pw, b = make(m, 512, 24, bits, 128, symmetric=False, seed=3)
        xp = xp.abs() + 1.0
        y, r = run_wo(pw, xp, b)
        assert rel_err(y, r) <= 1e-6, m
        frac = pw.zeros + 0.25
        y = cpu_linear(pw, xp, *blocked(pw), b, zeros=frac, int8_activations=False)
        r = ref.weight_only_linear(xp, pw.qweight, pw.scales, frac, b, pw.group_size, bits)
        assert rel_err(y, r) <= 1e-5, m


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_decode_cancellation(isa, bits):
    # one row (the decode GEMVs; 32 channels = one 4-block pass) whose true outputs (~0.2
    # before scaling) are tiny next to sum(x) * (8 - z) (~1e5): x near 100, codes
    # alternating z + 1, z - 1 around zero points far from 8. fp32 sums of +-100 terms lose
    # ~1e-3 of such a result in any order (the reference: 1.7e-3); applying the int4 zero
    # point as (8 - z) * sum(x) after the fact lost 5e-2.
    k, n = 256, 32
    x = 100.0 + 0.01 * torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    z = torch.tensor([1.0, 2.0, 3.0, 13.0] * (n // 4)).view(n, 1) if bits == 4 else torch.full((n, 1), -90.0)
    q = (z + torch.tensor([1, -1] * (k // 2))).to(torch.int32)
    qweight = pack_int4(q.to(torch.uint8)) if bits == 4 else q.to(torch.int8)
    scales = torch.full((n, 1), 0.01)
    data = (cpu.int4_to_blocked if bits == 4 else cpu.int8_to_blocked)(qweight)
    spec = LinearSpec(bits, -1, False, False, k, n)
    y = cpu.BACKEND.linear(spec, x, data, cpu.LAYOUT_INT4 if bits == 4 else cpu.LAYOUT_INT8, scales, z, None, None)
    exact = (x.double() @ (q - z).double().T) * scales.double().T
    assert rel_err(y, exact) <= 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_dtypes_small_and_large_m(isa, dtype, bits):
    for m, sym in ((1, True), (2, False), (40, True), (40, False), (130, False)):  # every M strategy
        xp, pw, b = make(m, 256, 40, bits, 64, dtype, symmetric=sym)
        y, r = run_wo(pw, xp, b)
        assert y.dtype == dtype and rel_err(y, r) <= TOL[dtype] + 1e-5


# ----------------------------------------------------------------------------- determinism
def _all_outputs(xp8, pw8, xp4, pw4, b):
    outs = [run_act(pw8, xp8, b)[0], run_act(pw4, xp4, b)[0], run_wo(pw8, xp8, b)[0], run_wo(pw4, xp4, b)[0]]
    return outs


# each shape splits across threads
@pytest.mark.parametrize("m,k,n", [(1, 4096, 512), (3, 2048, 1024), (50, 384, 200), (300, 256, 72)])
def test_threads_and_isa_give_identical_bits(monkeypatch, m, k, n):
    xp8, pw8, b = make(m, k, n, 8, 64, seed=m)
    xp4, pw4, _ = make(m, k, n, 4, 128, seed=m + 1)
    old = torch.get_num_threads()
    results = {}
    try:
        for isa_name in ISAS:
            set_isa(monkeypatch, isa_name)
            for t in (1, 2):
                torch.set_num_threads(t)
                results[(isa_name, t)] = _all_outputs(xp8, pw8, xp4, pw4, b)
    finally:
        torch.set_num_threads(old)
    # W8A8/W4A8: the same bits everywhere. Weight-only: the same bits for any thread count
    # at one ISA level; across levels the fp32 sums run in different orders (the AVX-512
    # M = 1 kernels sum 16 channels per vector), so they agree to rounding
    base = results[(ISAS[0], 1)]
    for key, outs in results.items():
        for i, (a, c) in enumerate(zip(outs, base)):
            if i < 2:
                assert torch.equal(a, c), key
            else:
                assert torch.equal(a, results[(key[0], 1)][i]), key
                assert rel_err(a, c) <= 1e-6, key


# ----------------------------------------------------------------------------- cache blocking
# small caches (many K chunks, few rows per task), this machine's, and a large-cache Xeon's
CACHES = ["l1=4K,l2=64K,l3=1M", "l1=32K, l2=512K, l3=32M", "L1=48KiB,L2=2M,L3=105M", None]


@pytest.mark.parametrize("m,k,n", [(5, 2112, 72), (40, 1000, 48), (300, 384, 40)])
def test_cache_override_gives_identical_bits(monkeypatch, isa, m, k, n):
    xp8, pw8, b = make(m, k, n, 8, -1, seed=m)  # per channel: the chunked int16 GEMM
    xp4, pw4, _ = make(m, k, n, 4, 128, symmetric=False, seed=m + 1)
    qx = torch.randint(-128, 128, (m, xp8.shape[1]), dtype=torch.int8)
    old = torch.get_num_threads()
    results = []
    try:
        for caches in CACHES:
            if caches is None:
                monkeypatch.delenv("KQUANT_CPU_CACHE", raising=False)
            else:
                monkeypatch.setenv("KQUANT_CPU_CACHE", caches)
            for t in (1, 2):
                torch.set_num_threads(t)
                y8, r8 = run_act(pw8, xp8, b)
                assert torch.equal(y8, r8), (caches, t)
                results.append((caches, t, [y8, run_act(pw4, xp4, b)[0], run_wo(pw8, xp8, b)[0],
                                            run_wo(pw4, xp4, b)[0], cpu.int8_mm(qx, pw8.qweight)]))
    finally:
        torch.set_num_threads(old)
    for caches, t, outs in results:
        for i, (a, c) in enumerate(zip(outs, results[0][2])):
            assert torch.equal(a, c), (caches, t, i)


def test_cache_sizes_and_env_values(monkeypatch):
    monkeypatch.delenv("KQUANT_CPU_CACHE", raising=False)
    found = cpu.cache_sizes()
    assert found == cpu.cache_sizes(detected=True) and found["l1"] >= 4096 and found["l2"] >= found["l1"]
    monkeypatch.setenv("KQUANT_CPU_CACHE", " l2 = 256 KiB ,l3=32m")
    assert cpu.cache_sizes() == {"l1": found["l1"], "l2": 256 << 10, "l3": 32 << 20}
    assert cpu.cache_sizes(detected=True) == found
    for bad in ("l2=abc", "l4=1M", "l2=1K", "l2", "l1=2T"):
        monkeypatch.setenv("KQUANT_CPU_CACHE", bad)
        with pytest.raises(RuntimeError, match=r"KQUANT_CPU_CACHE=.*not a cache size.*l1=, l2= or l3="):
            cpu.cache_sizes()
    monkeypatch.setenv("KQUANT_CPU_CACHE", "")
    assert cpu.cache_sizes() == found


# ----------------------------------------------------------------------------- errors
def test_bad_layout_is_rejected():
    xp, pw, b = make(2, 128, 16, 8, -1)
    with pytest.raises(RuntimeError, match="blocked layout"):
        torch.ops.kquant._w8a8_linear_cpu(xp, pw.qweight, pw.scales, b, None, -1)
    data, _ = blocked(pw)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.kquant._w8a8_linear_cpu(xp[:, :32], data, pw.scales, b, None, -1)


def test_env_avx2_turns_amx_off(monkeypatch):
    monkeypatch.setenv("KQUANT_CPU_ISA", "avx2")
    assert torch.ops.kquant._cpu_isa() == (1 if HAS_AVX2 else 0)
    assert cpu.isa() == ("avx2" if HAS_AVX2 else "scalar") and "AMX" not in kquant.backends()["cpu"]["reason"]


def test_env_forced_scalar_reports_in_backends(monkeypatch):
    monkeypatch.setenv("KQUANT_CPU_ISA", "scalar")
    assert cpu.isa() == "scalar"
    assert "scalar" in kquant.backends()["cpu"]["reason"]
    monkeypatch.delenv("KQUANT_CPU_ISA")
    assert cpu.isa() == BEST and "scalar" not in kquant.backends()["cpu"]["reason"] or BEST == "scalar"


def test_env_isa_values(monkeypatch, capfd):
    best = torch.ops.kquant._cpu_isa_best()
    assert best == max(ISA_IDS[n] for n in ISAS)
    monkeypatch.setenv("KQUANT_CPU_ISA", "avx3")
    with pytest.raises(RuntimeError, match=r"KQUANT_CPU_ISA='avx3'.*scalar, avx2, avx512, amx"):
        torch.ops.kquant._cpu_isa()
    monkeypatch.setenv("KQUANT_CPU_ISA", " Scalar ")
    assert torch.ops.kquant._cpu_isa() == 0
    monkeypatch.setenv("KQUANT_CPU_ISA", "amx")
    assert torch.ops.kquant._cpu_isa() == best  # capped at the best level there is
    if best >= ISA_IDS["avx512"]:
        return
    # below AVX-512 (an AVX2 machine): avx512 warns once and runs the best level (the
    # weight-only decode GEMV would sum in another order at the AVX-512 level)
    xp, pw, b = make(1, 256, 40, 8, -1)
    monkeypatch.setenv("KQUANT_CPU_ISA", "avx2" if best == 1 else "scalar")
    y_best = run_wo(pw, xp, b)[0]
    capfd.readouterr()
    monkeypatch.setenv("KQUANT_CPU_ISA", "AVX512")
    assert torch.ops.kquant._cpu_isa() == best
    assert torch.equal(run_wo(pw, xp, b)[0], y_best)
    err = capfd.readouterr().err
    assert err.count("KQUANT_CPU_ISA='AVX512' asks for avx512, above this CPU's best level") == 1, err
