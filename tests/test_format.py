"""The canonical packed format: golden bytes, round trips, padding, bad input."""
import struct

import numpy as np
import pytest
import torch

from kquant.format import (PER_CHANNEL, PackedWeight, pack_codes, pack_int4, padded_k, qparams_from_range,
                           quantize_weight, unpack_codes, unpack_int4)

GOLDEN_W = torch.tensor([[1.27, -0.5, 0.3, -1.27],
                         [0.0, 0.0, 0.0, 0.0]])


def f32_bytes(values):
    return b"".join(struct.pack("<f", float(np.float32(v))) for v in values)


def test_golden_bytes_int8_per_channel():
    p = quantize_weight(GOLDEN_W, 8, PER_CHANNEL)
    assert p.qweight.dtype == torch.int8 and list(p.qweight.shape) == [2, 4]
    assert p.qweight.numpy().tobytes() == bytes([0x7F, 0xCE, 0x1E, 0x81, 0, 0, 0, 0])
    # row 0: 1.27 / 127; row 1 is all zero: a safe scale of exactly 1.0
    assert p.scales.numpy().tobytes() == f32_bytes([np.float32(1.27) / np.float32(127), 1.0])
    assert p.zeros is None


def test_golden_bytes_int4_per_channel():
    p = quantize_weight(GOLDEN_W, 4, PER_CHANNEL)
    # values [7, -3, 2, -7] -> nibbles (+8) [15, 5, 10, 1]; low nibble = even k
    assert p.qweight.dtype == torch.uint8 and list(p.qweight.shape) == [2, 2]
    assert p.qweight.numpy().tobytes() == bytes([0x5F, 0x1A, 0x88, 0x88])
    assert p.scales.numpy().tobytes() == f32_bytes([np.float32(1.27) / np.float32(7), 1.0])


def test_golden_bytes_int4_asymmetric():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.75]])
    p = quantize_weight(w, 4, PER_CHANNEL, symmetric=False)
    # range [0, 3] -> scale 0.2, zero 0, codes [0, 7.5->8 (half-even), 15, 3.75->4]
    assert p.zeros.tolist() == [[0.0]]
    assert p.qweight.numpy().tobytes() == bytes([0 | (8 << 4), 15 | (4 << 4)])


def test_golden_bytes_ternary_2bit_symmetric():
    p = quantize_weight(GOLDEN_W, 2, PER_CHANNEL)
    # values round(w / (1.27 / 1)) = [1, 0, 0, -1] -> codes (+2) [3, 2, 2, 1], k = 4i + j in bits 2j
    assert p.qweight.dtype == torch.uint8 and list(p.qweight.shape) == [2, 1]
    assert p.qweight.numpy().tobytes() == bytes([3 | 2 << 2 | 2 << 4 | 1 << 6, 0b10101010])
    assert p.scales.numpy().tobytes() == f32_bytes([1.27, 1.0])
    assert torch.equal(p.codes(), torch.tensor([[1, 0, 0, -1], [0, 0, 0, 0]], dtype=torch.int32))


def test_golden_bytes_2bit_asymmetric_padded_tail():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.0]])
    p = quantize_weight(w, 2, PER_CHANNEL, symmetric=False)
    # range [0, 3] -> scale 1, zero 0, codes [0, 1, 2, 3, 1]; K = 5 pads to 8 with the zero point (0)
    assert p.zeros.tolist() == [[0.0]] and p.scales.tolist() == [[1.0]]
    assert p.qweight.numpy().tobytes() == bytes([0 | 1 << 2 | 2 << 4 | 3 << 6, 1])


def test_golden_bytes_3bit_planes():
    w = torch.arange(8, dtype=torch.float32).reshape(1, 8) * 0.5
    p = quantize_weight(w, 3, PER_CHANNEL, symmetric=False)
    # range [0, 3.5] -> scale 0.5, zero 0, codes 0..7: low two bits [0,1,2,3,0,1,2,3] in the 2-bit
    # plane (two bytes), then the third bits [0,0,0,0,1,1,1,1] (k at bit k % 8) in one byte
    assert list(p.qweight.shape) == [1, 3]
    assert p.qweight.numpy().tobytes() == bytes([0b11100100, 0b11100100, 0b11110000])
    sym = quantize_weight(torch.tensor([[-3.0, -1.0, 0.0, 3.0] * 2]), 3, PER_CHANNEL)
    # symmetric: values -3..3, codes +4 -> [1, 3, 4, 7] (twice): low bits [1,3,0,3], high bits [0,0,1,1]
    assert sym.qweight.numpy().tobytes() == bytes([1 | 3 << 2 | 0 << 4 | 3 << 6] * 2 + [0b11001100])


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("kp", [8, 24, 136])
def test_pack_codes_round_trip_and_plane_layout(bits, kp):
    u = torch.randint(0, 1 << bits, (5, kp), dtype=torch.uint8)
    packed = pack_codes(u, bits)
    assert packed.shape == (5, kp * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), u)
    if bits == 3:  # the first Kp/4 bytes are the 2-bit format of the low bits
        assert torch.equal(packed[:, :kp // 4], pack_codes(u & 3, 2))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group", [32, 64, 128, PER_CHANNEL])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_bound(bits, group, symmetric):
    w = torch.randn(37, 300) * 0.05
    p = quantize_weight(w, bits, group, symmetric).validate()
    deq = p.dequantize()
    assert deq.shape == w.shape
    # every element within half a quantization step of its group
    g = 300 if group == PER_CHANNEL else group
    kp = padded_k(300, bits, group)
    step = p.scales.repeat_interleave(kp // p.scales.shape[1] if group != PER_CHANNEL else kp, dim=1)[:, :300]
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()
    assert p.scales.shape == (37, kp // g if group != PER_CHANNEL else 1)


@pytest.mark.parametrize("k", [1, 17, 33, 1025])
def test_pack_unpack_round_trip(k):
    kp = k + (k % 2)
    u = torch.randint(0, 16, (5, kp), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (5, kp // 2)
    assert torch.equal(unpack_int4(packed), u)
    assert torch.equal(packed & 0x0F, u[:, 0::2])


@pytest.mark.parametrize("bits,group,k", [(8, 32, 17), (4, 128, 130), (4, PER_CHANNEL, 17), (8, 64, 1),
                                          (3, PER_CHANNEL, 17), (3, 32, 33), (2, PER_CHANNEL, 17), (2, 64, 65)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_padding_is_exact_zero(bits, group, k, symmetric):
    w = torch.randn(3, k)
    p = quantize_weight(w, bits, group, symmetric)
    kp = padded_k(k, bits, group)
    assert p.padded_in_features == kp and p.in_features == k
    full = PackedWeight(p.qweight, p.scales, p.zeros, bits, group, kp).dequantize()
    assert torch.equal(full[:, k:], torch.zeros(3, kp - k))


def test_all_zero_rows_and_groups_are_safe():
    w = torch.zeros(4, 64)
    w[1, :32] = torch.randn(32)
    for bits in (8, 4, 3, 2):
        for sym in (True, False):
            p = quantize_weight(w, bits, 32, sym)
            assert torch.isfinite(p.scales).all() and (p.scales > 0).all()
            deq = p.dequantize()
            assert torch.equal(deq[0], torch.zeros(64)) and torch.equal(deq[1, 32:], torch.zeros(32))


def test_qparams_never_zero_or_nan():
    lo = torch.tensor([0.0, -1e-45, float("nan"), -2.0])
    hi = torch.tensor([0.0, 1e-45, float("nan"), 2.0])
    for sym in (True, False):
        s, _ = qparams_from_range(lo, hi, 8, sym)
        assert torch.isfinite(s).all() and (s > 0).all()


def test_nan_inf_weights_name_the_layer():
    w = torch.randn(4, 8)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.fc1.*NaN or Inf.*\[2, 3\]"):
        quantize_weight(w, 8, name="encoder.fc1")
    w[2, 3] = float("inf")
    with pytest.raises(ValueError, match="encoder.fc1"):
        quantize_weight(w, 4, 32, name="encoder.fc1")


def test_unsupported_bits_and_groups_list_supported_values():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"supported: \[8, 4, 3, 2\]"):
        quantize_weight(w, 5)
    with pytest.raises(ValueError, match=r"32, 64, 128 or -1"):
        quantize_weight(w, 8, 48)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), 8)


def test_validate_catches_bad_codes_and_shapes():
    p = quantize_weight(torch.randn(4, 64), 8)
    bad = PackedWeight(p.qweight.clone(), p.scales, None, 8, PER_CHANNEL, 64)
    bad.qweight[0, 0] = -128
    with pytest.raises(ValueError, match=r"-128 is not used"):
        bad.validate()
    with pytest.raises(ValueError, match=r"qweight \[4, 32\] does not match K=64"):
        PackedWeight(p.qweight[:, :32], p.scales, None, 8, PER_CHANNEL, 64).validate()
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        PackedWeight(p.qweight, torch.zeros_like(p.scales), None, 8, PER_CHANNEL, 64).validate()
    p4 = quantize_weight(torch.randn(4, 64), 4, 32)
    bad4 = PackedWeight(p4.qweight.clone(), p4.scales, None, 4, 32, 64)
    bad4.qweight[0, 0] = 0x80  # low nibble 0 = value -8, not used by symmetric int4
    with pytest.raises(ValueError, match="1..15"):
        bad4.validate()
    for bits in (3, 2):
        p = quantize_weight(torch.randn(4, 64), bits, 32)
        bad = PackedWeight(p.qweight.clone(), p.scales, None, bits, 32, 64)
        bad.qweight[0, 0] &= 0xFC  # the low bits of k = 0
        if bits == 3:
            bad.qweight[0, 16] &= 0xFE  # its high bit (plane at Kp / 4 = 16): code 0, value -4
        with pytest.raises(ValueError, match=f"1..{(1 << bits) - 1}"):
            bad.validate()
