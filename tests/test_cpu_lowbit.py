"""2- and 3-bit weights on the CPU backend (csrc/cpu/lowbit*) against the reference oracle, and
the 4-bit weight-only calls that run on the same float decode kernels (layout 2).

The reference functions are called directly. Every case runs at the scalar level and at AVX2
where the CPU has it (KQUANT_CPU_ISA, read per call), and through both ways a call can run
(the private ops' ``path``: 1 the decode kernels on layouts 3/4 (and 2), 2 unpacked into
layout 1, or for 4 bits the weight-only kinds of plan.cpp).

* int8 activations: the int32 group sums are checked exactly with x whose per-token scale is
  exactly 1 (integers, largest |x| = 127) and unit weight scales, so y equals the sums; random
  inputs match the reference within the fp32 epilogue's rounding.
* float activations: within a dtype-tied tolerance, and the products are x * (u - z) (no
  cancellation from applying the zero point afterwards).
* the two levels and any thread count give the same bits.
"""

import itertools

import pytest
import torch

import kquant
from kquant.backends import reference as ref
from kquant.format import pack_codes, pack_int4, padded_k, quantize_weight, symmetric_zero, to_canonical
from kquant.spec import LinearSpec

cpu = pytest.importorskip("kquant.backends.cpu")
if not kquant.backends()["cpu"]["available"]:
    pytest.skip(f"cpu backend unavailable: {kquant.backends()['cpu']['reason']}", allow_module_level=True)
if not hasattr(torch.ops.kquant, "_w2a8_linear_cpu"):
    pytest.skip("kquant._C was built without the 2/3-bit kernels", allow_module_level=True)

ISAS = (["avx2"] if cpu.best_isa() != "scalar" else []) + ["scalar"]
BITS = [2, 3]
GROUPS = [-1, 32, 64, 128]
PATHS = [1, 2]  # decode kernels, unpacked into layout 1
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # weight-only, relative to the output's norm


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("KQUANT_CPU_ISA", request.param)
    return request.param


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def op(bits, a8):
    return getattr(torch.ops.kquant, f"_w{bits}a{8 if a8 else 16}_linear_cpu")


def run(pw, x, bias=None, zeros=None, a8=True, path=0, act_scale=None):
    """The cpu kernel for a canonical PackedWeight on a padded 2-D x."""
    data = cpu._blocked(pw.qweight, pw.bits, x.shape[1])
    if a8:
        return op(pw.bits, True)(x, data, pw.scales, bias, act_scale, pw.group_size, path)
    return op(pw.bits, False)(x, data, pw.scales, zeros, bias, pw.group_size, path)


def make(m, k, n, bits, gs, symmetric=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pw = quantize_weight(torch.randn(n, k, generator=g), bits, gs, symmetric=symmetric)
    x = torch.nn.functional.pad(torch.randn(m, k, generator=g), (0, pw.padded_in_features - k)).to(dtype)
    return x, pw, torch.randn(n, generator=g).to(dtype)


def with_codes(codes, bits, gs, k, scales=None):
    """A symmetric PackedWeight of unsigned codes [N, Kp] (unit scales unless given)."""
    n, kp = codes.shape
    groups = 1 if gs == -1 else kp // gs
    s = torch.ones(n, groups) if scales is None else scales
    return kquant.format.PackedWeight(pack_codes(codes.to(torch.uint8), bits), s, None, bits, gs, k)


def int_sums(x, pw):
    """Exact sum_k x[m, k] * (u - z)[n, k] in float64 (x integer-valued)."""
    codes = pw.stored_codes().double() - symmetric_zero(pw.bits)
    return x.double() @ codes.T


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,gs", [(1, 1, -1), (17, 17, -1), (9, 1025, -1), (8, 64, 32), (33, 256, 128),
                                    (5, 96, 32), (16, 200, 64)])
def test_layout_round_trip_is_exact(bits, n, k, gs):
    pw = quantize_weight(torch.randn(n, k), bits, gs, symmetric=False)
    kp = pw.padded_in_features
    data = cpu._blocked(pw.qweight, bits, kp)
    kpad = -(-kp // 64) * 64
    assert data.dtype == torch.uint8 and data.is_contiguous()
    assert data.shape == (-(-n // 8), kpad // 16 if bits == 2 else 3 * kpad // 32, 8, 4)
    assert cpu._layout_of(bits) == (cpu.LAYOUT_INT2 if bits == 2 else cpu.LAYOUT_INT3)
    assert torch.equal(to_canonical(data, cpu._layout_of(bits), bits, n, kp), pw.qweight)


def test_layout_bit_positions():
    # layout 3: byte (c, j) of row o holds k = 16 o + 4 t + j in bits 2t. Layout 4, rows A, B, C
    # of unit o, k = 32 o + 4 t + j: t = 0..5 in bits 3 (t % 2) of row t / 2; t = 6, 7: the low
    # bits in bits 6-7 of row A / B, the third bit in bit t of row C
    for bits, k, c in ((2, 37, 5), (3, 37, 45), (3, 90, 2), (3, 27, 33), (3, 62, 7)):
        codes = torch.zeros(48, 128, dtype=torch.uint8)
        codes[c, k] = (1 << bits) - 1
        d = cpu._blocked(pack_codes(codes, bits), bits, 128)
        nz = {tuple(i): d[tuple(i)].item() for i in d.nonzero().tolist()}
        t, j, g = (k >> 2) & (3 if bits == 2 else 7), k & 3, c // 8
        if bits == 2:
            want = {(g, k // 16, c % 8, j): 3 << (2 * t)}
        elif t < 6:
            want = {(g, 3 * (k // 32) + t // 2, c % 8, j): 7 << (3 * (t % 2))}
        else:
            want = {(g, 3 * (k // 32) + t - 6, c % 8, j): 3 << 6, (g, 3 * (k // 32) + 2, c % 8, j): 1 << t}
        assert nz == want, (bits, k, c)


# ----------------------------------------------------------------------------- int8 activations
def integer_x(m, kp, k, seed):
    """Integer x in [-127, 127] with 127 in every row (a per-token scale of exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (m, kp), generator=g).float()
    x[:, k:] = 0
    if k:
        x[:, 0] = 127.0
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("path", PATHS)
def test_int8_sums_are_exact(isa, bits, gs, path):
    for m, k, n in ((1, 1, 3), (2, 17, 9), (3, 33, 8), (17, 100, 24), (1, 1025, 40), (2, 260, 33)):
        kp = padded_k(k, bits, gs)
        g = torch.Generator().manual_seed(k)
        codes = torch.randint(1, 1 << bits, (n, kp), generator=g)  # symmetric codes: 1 .. 2^b - 1
        pw = with_codes(codes, bits, gs, k)
        x = integer_x(m, kp, k, k)
        y = run(pw, x, path=path)
        assert torch.equal(y.double(), int_sums(x, pw)), (m, k, n)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gs", [-1, 32])
def test_int8_sums_at_the_extremes(isa, bits, path, gs):
    # the largest products in every lane: the int16 partial sums sit closest to overflow
    k, n = 1024, 16
    top = (1 << bits) - 1
    for code, sign in ((top, 1), (top, -1), (1, 1), (1, -1)):
        pw = with_codes(torch.full((n, k), code), bits, gs, k)
        x = torch.full((2, k), 127.0 * sign)
        y = run(pw, x, path=path)
        want = (code - symmetric_zero(bits)) * 127.0 * sign * k
        assert torch.equal(y, torch.full_like(y, want)), (code, sign)


def epilogue_bound(x, pw, bias, act_scale=None):
    """|y - reference| allowed by the fp32 fold and epilogue: a few ulps of the sum of the
    magnitudes of the per-group terms, times the token scale, plus the bias' rounding."""
    qx, sx = ref.quantize_per_token(x) if act_scale is None else ref.quantize_static(x, act_scale)
    codes = pw.stored_codes().double() - symmetric_zero(pw.bits)
    g = x.shape[1] if pw.group_size == -1 else pw.group_size
    xg = qx.double().reshape(x.shape[0], -1, g).transpose(0, 1)
    wg = codes.reshape(codes.shape[0], -1, g).transpose(0, 1)
    terms = (torch.bmm(xg, wg.transpose(1, 2)).abs() * pw.scales.double().T.unsqueeze(1)).sum(0)
    b = 0 if bias is None else bias.double().abs()
    return (terms * sx.double().abs() + b) * 2.0 ** -20 + 1e-30


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("path", PATHS)
def test_int8_activations_match_reference(isa, bits, gs, path):
    for m, k, n in ((0, 64, 8), (1, 1, 5), (1, 100, 33), (2, 1025, 24), (3, 33, 16), (17, 256, 20)):
        x, pw, b = make(m, k, n, bits, gs, seed=k + m)
        y = run(pw, x, b, path=path)
        r = ref.act_linear(x, pw.qweight, pw.scales, b, None, gs, bits)
        assert y.shape == r.shape == (m, n) and y.dtype == torch.float32
        if m:
            assert ((y.double() - r.double()).abs() <= epilogue_bound(x, pw, b)).all(), (m, k, n)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("path", PATHS)
def test_int8_activations_bf16_and_static_scale(isa, bits, path):
    x, pw, b = make(5, 300, 24, bits, 64, dtype=torch.bfloat16, seed=1)
    y = run(pw, x, b, path=path)
    r = ref.act_linear(x, pw.qweight, pw.scales, b, None, 64, bits)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - r.double()).abs() <= epilogue_bound(x, pw, b) + r.double().abs() * 2.0 ** -7).all()
    x, pw, b = make(3, 200, 16, bits, -1, seed=2)
    s = torch.tensor([x.abs().max().item() / 100])
    y = run(pw, x, b, path=path, act_scale=s)
    r = ref.act_linear(x, pw.qweight, pw.scales, b, s, -1, bits)
    assert ((y.double() - r.double()).abs() <= epilogue_bound(x, pw, b, s)).all()


@pytest.mark.parametrize("bits", BITS)
def test_int8_activations_per_channel_are_bit_identical(isa, bits):
    # one group: y = (acc * s) * sx + bias in the reference's order
    for path in PATHS:
        x, pw, b = make(3, 500, 40, bits, -1, seed=4)
        assert torch.equal(run(pw, x, b, path=path), ref.act_linear(x, pw.qweight, pw.scales, b, None, -1, bits))


def test_nan_rows_give_nan(isa):
    for bits in BITS:
        for path in PATHS:
            x, pw, _ = make(3, 70, 12, bits, 32, seed=5)
            x[1, 3] = float("nan")
            y = run(pw, x, path=path)
            assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
            y = run(pw, x, a8=False, path=path)
            assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ----------------------------------------------------------------------------- float activations
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_matches_reference(isa, bits, gs, symmetric):
    for path in PATHS:
        for m, k, n in ((0, 64, 8), (1, 1, 5), (1, 100, 33), (2, 1025, 24), (3, 33, 16), (17, 256, 20)):
            x, pw, b = make(m, k, n, bits, gs, symmetric, seed=k + m)
            y = run(pw, x, b, pw.zeros, a8=False, path=path)
            r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, gs, bits)
            assert y.shape == r.shape == (m, n)
            if m:
                assert rel_err(y, r) <= TOL[torch.float32], (path, m, k, n)


@pytest.mark.parametrize("bits", BITS)
def test_weight_only_many_rows(isa, bits):
    # the decode kernels (path 1) and unpacked layout 1 (path 2, and what path 0 picks above 8
    # rows at the scalar and AVX2 levels, above 256 at AVX-512)
    for symmetric, m in itertools.product((True, False), (12, 300)):
        x, pw, b = make(m, 100, 40, bits, 32, symmetric, seed=8)
        r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, 32, bits)
        for path in (0, 1, 2):
            assert rel_err(run(pw, x, b, pw.zeros, a8=False, path=path), r) <= TOL[torch.float32]


@pytest.mark.parametrize("bits", BITS)
def test_weight_only_bf16_and_extreme_codes(isa, bits):
    for path in PATHS:
        x, pw, b = make(4, 300, 24, bits, 128, False, torch.bfloat16, seed=6)
        y = run(pw, x, b, pw.zeros, a8=False, path=path)
        r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, 128, bits)
        assert y.dtype == torch.bfloat16 and rel_err(y, r) <= TOL[torch.bfloat16]
        for code in (0, (1 << bits) - 1):  # every code at either end, zero points at the other
            n, k = 16, 256
            zeros = torch.full((n, 2), float((1 << bits) - 1 - code))
            pw = kquant.format.PackedWeight(pack_codes(torch.full((n, k), code, dtype=torch.uint8), bits),
                                            torch.rand(n, 2) + 0.5, zeros, bits, 128, k)
            x = torch.randn(2, k)
            y = run(pw, x, None, zeros, a8=False, path=path)
            r = ref.weight_only_linear(x, pw.qweight, pw.scales, zeros, None, 128, bits)
            assert rel_err(y, r) <= TOL[torch.float32], code


@pytest.mark.parametrize("bits", BITS)
def test_weight_only_products_do_not_cancel(isa, bits):
    # x near 100, codes alternating z + 1, z - 1: the true outputs (~0.2 before scaling) are
    # tiny next to sum(x) * z; applying z after the sums would lose them
    k, n = 256, 32
    x = 100.0 + 0.01 * torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    top = (1 << bits) - 1
    z = torch.tensor([1.0, float(top - 1)] * (n // 2)).view(n, 1)
    q = (z + torch.tensor([1, -1] * (k // 2))).to(torch.int32)
    pw = kquant.format.PackedWeight(pack_codes(q.to(torch.uint8), bits), torch.full((n, 1), 0.01), z, bits, -1, k)
    exact = (x.double() @ (q - z).double().T) * 0.01
    for path in PATHS:
        y = run(pw, x, None, z, a8=False, path=path)
        assert rel_err(y, exact) <= 0.02, path


@pytest.mark.parametrize("bits", BITS)
def test_weight_only_fractional_zero_points(isa, bits):
    # zero points that are not whole numbers take the unpacked path (float z) on every path
    x, pw, b = make(2, 200, 24, bits, 64, False, seed=7)
    frac = pw.zeros + 0.25
    for path in (0, 1, 2):
        y = run(pw, x, b, frac, a8=False, path=path)
        r = ref.weight_only_linear(x, pw.qweight, pw.scales, frac, b, 64, bits)
        assert rel_err(y, r) <= TOL[torch.float32], path


# ----------------------------------------------------------------------------- determinism
@pytest.mark.skipif(len(ISAS) < 2, reason="one ISA level on this CPU")
@pytest.mark.parametrize("bits", BITS)
def test_levels_and_threads_give_identical_bits(monkeypatch, bits):
    threads = torch.get_num_threads()
    try:
        for a8, sym in ((True, True), (False, True), (False, False)):
            # the first splits the decode kernels' blocks across threads, the others the chunks
            for m, gs, k, n in ((1, 128, 1024, 2304), (2, -1, 512, 72), (5, 32, 512, 72)):
                x, pw, b = make(m, k, n, bits, gs, sym, seed=m)
                outs = []
                for level in ISAS:
                    monkeypatch.setenv("KQUANT_CPU_ISA", level)
                    for nt in {1, max(2, threads)}:
                        torch.set_num_threads(nt)
                        for path in PATHS:
                            outs.append((level, nt, path, run(pw, x, b, pw.zeros, a8=a8, path=path)))
                for level, nt, path, y in outs:
                    same = [o[3] for o in outs if o[2] == path][0]
                    assert torch.equal(y, same), (a8, sym, m, gs, level, nt, path)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 4-bit weight-only decode
# _w4a16_linear_cpu on the float decode kernels (path 1; path 0 takes them at the scalar and AVX2
# levels up to 8 rows) against the reference and against the plan's kinds (path 2), which the
# calls the decode kernels cannot take must fall back to bit for bit.
def run4(pw, x, bias=None, zeros=None, path=0):
    data = cpu._blocked(pw.qweight, 4, x.shape[1])
    return torch.ops.kquant._w4a16_linear_cpu(x, data, pw.scales, zeros, bias, pw.group_size, path)


@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_w4_decode_matches_reference(isa, gs, symmetric):
    # K tails (K not a multiple of 64), one and two rows (the decode calls), more rows (path 1,
    # and path 0 up to 8 rows), channel tails
    for path in (0, 1):
        for m, k, n in ((1, 1, 5), (1, 100, 33), (2, 1025, 24), (2, 64, 8), (1, 4096, 40), (2, 700, 17),
                        (3, 33, 16), (17, 256, 20), (0, 64, 8)):
            x, pw, b = make(m, k, n, 4, gs, symmetric, seed=k + m + n)
            y = run4(pw, x, b, pw.zeros, path)
            r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, gs, 4)
            assert y.shape == r.shape == (m, n)
            if m:
                assert rel_err(y, r) <= TOL[torch.float32], (path, m, k, n)


def test_w4_decode_dtypes_and_extreme_zero_points(isa):
    for dtype in (torch.bfloat16, torch.float16):
        x, pw, b = make(2, 300, 24, 4, 128, False, dtype, seed=6)
        y = run4(pw, x, b, pw.zeros, 1)
        r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, 128, 4)
        assert y.dtype == dtype and rel_err(y, r) <= TOL[torch.bfloat16]
    n, k = 16, 256
    for code in (0, 15):
        # every code at one end, whole zero points at the other end and far beyond (|z| <= 1024
        # is exact in the kernels), and just beyond what they take (1025: the plan's kinds)
        for z in (15 - code, 1024.0, -1024.0, 1025.0):
            zeros = torch.full((n, 2), float(z))
            pw = kquant.format.PackedWeight(pack_int4(torch.full((n, k), code, dtype=torch.uint8)),
                                            torch.rand(n, 2) + 0.5, zeros, 4, 128, k)
            x = torch.randn(2, k)
            y = run4(pw, x, None, zeros, 1)
            r = ref.weight_only_linear(x, pw.qweight, pw.scales, zeros, None, 128, 4)
            assert rel_err(y, r) <= TOL[torch.float32], (code, z)
            if z == 1025.0:
                assert torch.equal(y, run4(pw, x, None, zeros, 2))


def test_w4_decode_products_do_not_cancel(isa):
    # x near 100, codes alternating z + 1, z - 1 around zero points far from 8
    k, n = 256, 32
    x = 100.0 + 0.01 * torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    z = torch.tensor([1.0, 2.0, 3.0, 14.0] * (n // 4)).view(n, 1)
    q = (z + torch.tensor([1, -1] * (k // 2))).to(torch.int32)
    pw = kquant.format.PackedWeight(pack_int4(q.to(torch.uint8)), torch.full((n, 1), 0.01), z, 4, -1, k)
    exact = (x.double() @ (q - z).double().T) * 0.01
    for m in (1, 2):
        assert rel_err(run4(pw, x.expand(m, k).contiguous(), None, z, 1), exact.expand(m, n)) <= 0.02


def test_w4_fractional_zero_points_fall_back(isa):
    # zero points that are not whole numbers: the plan's kinds on every path, bit for bit
    for m in (1, 2):
        x, pw, b = make(m, 200, 24, 4, 64, False, seed=7)
        frac = pw.zeros + 0.25
        want = run4(pw, x, b, frac, 2)
        assert rel_err(want, ref.weight_only_linear(x, pw.qweight, pw.scales, frac, b, 64, 4)) <= TOL[torch.float32]
        for path in (0, 1):
            assert torch.equal(run4(pw, x, b, frac, path), want), (m, path)


@pytest.mark.parametrize("bits", BITS + [4])
def test_huge_and_tiny_x_fall_back(isa, bits):
    # x the decode kernels' scaling by 2^(7 - p) would not keep exact (|x| >= 2^120 overflows, 0 <
    # |x| < 2^-119 loses bits): those calls take the other kernels (path 2's), bit for bit, and give
    # no inf / NaN the reference does not
    fn = run4 if bits == 4 else (lambda pw, x, b, z, path: run(pw, x, b, z, a8=False, path=path))
    for sym in (True, False):
        for case in ("huge", "-huge", "tiny", "subnormal", "tiny row", "inf", "nan"):
            x, pw, b = make(2, 300, 24, bits, 64, sym, seed=9)
            if case == "tiny row":
                x[1] *= 2.0 ** -122
            else:
                x[0, 5] = {"huge": 2.0 ** 121, "-huge": -(2.0 ** 125), "tiny": 2.0 ** -126, "subnormal": 1e-40,
                           "inf": float("inf"), "nan": float("nan")}[case]
            want = fn(pw, x, b, pw.zeros, 2)
            for path in (0, 1):
                torch.testing.assert_close(fn(pw, x, b, pw.zeros, path), want, rtol=0, atol=0, equal_nan=True)
            if case not in ("inf", "nan"):
                r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, 64, bits)
                assert torch.isfinite(want).all() and torch.isfinite(r).all(), case
                assert rel_err(want[0], r[0]) <= TOL[torch.float32], case
        # in range at both ends: the decode kernels, still within tolerance
        x, pw, b = make(2, 300, 24, bits, 64, sym, seed=10)
        x[0] *= 2.0 ** 100
        x[1] *= 2.0 ** -100
        r = ref.weight_only_linear(x, pw.qweight, pw.scales, pw.zeros, b, 64, bits)
        assert rel_err(fn(pw, x, b, pw.zeros, 1)[0], r[0]) <= TOL[torch.float32]
        assert rel_err(fn(pw, x, b, pw.zeros, 1)[1], r[1]) <= TOL[torch.float32]


@pytest.mark.skipif(len(ISAS) < 2, reason="one ISA level on this CPU")
def test_w4_levels_and_threads_give_identical_bits(monkeypatch):
    threads = torch.get_num_threads()
    try:
        # the first two split their blocks across threads
        for m, gs, k, n, sym in ((1, 128, 4096, 2304, True), (2, -1, 1000, 2304, False), (2, 32, 512, 72, True),
                                 (5, 64, 512, 72, False), (1, -1, 100, 33, True)):
            x, pw, b = make(m, k, n, 4, gs, sym, seed=m + k)
            outs = []
            for level in ISAS:
                monkeypatch.setenv("KQUANT_CPU_ISA", level)
                for nt in {1, max(2, threads)}:
                    torch.set_num_threads(nt)
                    for path in (0, 1):
                        outs.append((level, nt, path, run4(pw, x, b, pw.zeros, path)))
            for level, nt, path, y in outs:
                assert torch.equal(y, outs[0][3]), (m, gs, level, nt, path)
    finally:
        torch.set_num_threads(threads)


def test_w4_bad_path_is_rejected():
    x, pw, _ = make(1, 64, 8, 4, 32)
    with pytest.raises(RuntimeError, match="path"):
        run4(pw, x, None, None, 3)


# ----------------------------------------------------------------------------- the backend
def test_backend_takes_low_bit_layers_and_public_ops(isa):
    from kquant.nn import QuantLinear
    lin = torch.nn.Linear(70, 19)
    for cfg, lay in (("w2a16", cpu.LAYOUT_INT2), ("w3a16", cpu.LAYOUT_INT3), ("ternary", cpu.LAYOUT_INT2),
                     ("w3a8", cpu.LAYOUT_INT3)):
        q = QuantLinear.from_linear(lin, cfg)
        if q.backend() != "cpu":
            pytest.skip("router does not pick cpu (KQUANT_BACKEND set?)")
        assert q.layout == lay and q.qweight.dim() == 4
        sd = q.state_dict()
        assert sd["qweight"].dim() == 2 and torch.equal(sd["qweight"], q.packed_weight().qweight)
        x = torch.randn(3, 5, 70)
        y = q(x)
        r = torch.nn.functional.linear(x, q.dequantize_weight(), lin.bias)
        assert y.shape == (3, 5, 19) and rel_err(y, r) < 0.2, cfg
    # public ops with canonical weights, 3-D x
    for bits in BITS:
        for a8 in (True, False):
            spec = LinearSpec(bits, 64, True, a8, 100, 12)
            assert kquant.backends.choose(spec) == "cpu"
            pw = quantize_weight(torch.randn(12, 100), bits, 64)
            x = torch.randn(2, 3, 100)
            fn = getattr(torch.ops.kquant, f"w{bits}a{8 if a8 else 16}_linear")
            y = fn(x, pw.qweight, pw.scales, group_size=64)
            xp = torch.nn.functional.pad(x.reshape(6, 100), (0, pw.padded_in_features - 100))
            r = (ref.act_linear(xp, pw.qweight, pw.scales, None, None, 64, bits) if a8 else
                 ref.weight_only_linear(xp, pw.qweight, pw.scales, None, None, 64, bits))
            assert y.shape == (2, 3, 12) and rel_err(y.reshape(6, 12), r) <= 1e-5


def test_bad_weight_is_rejected():
    x, pw, _ = make(1, 64, 8, 2, 32)
    data = cpu._blocked(pw.qweight, 2, 64)
    with pytest.raises(RuntimeError, match="layout 3"):
        op(2, True)(x, data[:, :-1].contiguous(), pw.scales, None, None, 32)
    with pytest.raises(RuntimeError, match="layout 4"):
        op(3, False)(x, data, pw.scales, None, None, 32)
    with pytest.raises(RuntimeError, match="path"):
        op(2, True)(x, data, pw.scales, None, None, 32, 3)
