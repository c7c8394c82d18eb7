"""The one canonical packed-weight format shared by every backend.

Layout (serialized exactly like this, identical for every backend):

* 8-bit: ``qweight int8 [N, Kp]``. Symmetric weights use [-127, 127] (never -128,
  so AVX2 ``madd`` paths cannot saturate); asymmetric weights use [-128, 127] with
  an integer-valued zero point in the same range.
* 4-bit: ``qweight uint8 [N, Kp // 2]``, two values per byte, the low nibble holds
  the even k. A nibble ``u`` is unsigned (0..15); the weight is ``(u - z) * s`` with
  ``z = 8`` for symmetric weights (so values are -7..7) or the stored zero point.
* 2-bit: ``qweight uint8 [N, Kp // 4]``, four codes per byte, low bits first: k = 4i + j
  sits in bits 2j..2j+1 of byte i. Codes ``u`` are 0..3; symmetric weights use ``z = 2``
  and codes 1..3, i.e. the ternary values {-1, 0, +1} x scale.
* 3-bit: ``qweight uint8 [N, 3 Kp // 8]``, two bit planes per row: bytes [0, Kp/4) hold
  the low two bits of every code exactly as the 2-bit format does, bytes [Kp/4, 3 Kp/8)
  hold the third bit, k at bit ``k % 8`` of byte ``Kp/4 + k // 8``. Codes are 0..7;
  symmetric weights use ``z = 4`` and codes 1..7 (values -3..3).
* ``scales fp32 [N, G]`` with ``G = Kp / group_size`` (``G = 1`` per channel).
* ``zeros fp32 [N, G]`` (integer-valued) only for asymmetric weights.

``Kp`` is ``K`` padded up to a multiple of the group size (per channel: of the codes one
byte holds, 2 for 4-bit, 4 for 2-bit, 8 for 3-bit). Padded weights dequantize to exactly 0
and the ops pad activations with zeros, so padding never changes a result.

Kernels that prefer another layout derive it once through :func:`register_layout`
and hand back the canonical form with :func:`to_canonical`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

FORMAT_VERSION = 1
SUPPORTED_BITS = (8, 4, 3, 2)
PER_CHANNEL = -1
SUPPORTED_GROUP_SIZES = (32, 64, 128, PER_CHANNEL)
CANONICAL = 0  # layout id of the canonical format


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bits(bits: int, where: str = "") -> int:
    if not _is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}unsupported weight bits {bits!r}; supported: {list(SUPPORTED_BITS)}")
    return int(bits)


def check_group_size(group_size: int, where: str = "") -> int:
    if not _is_int(group_size) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"{where}unsupported group size {group_size!r}; supported: 32, 64, 128 or -1 (per channel)")
    return int(group_size)


def qrange(bits: int, symmetric: bool) -> Tuple[int, int]:
    """Integer range of the *signed* value ``q - z`` domain before the zero point.

    Symmetric: [-(2^(b-1) - 1), 2^(b-1) - 1]. Asymmetric: the stored code range (8-bit:
    [-128, 127]; b bits otherwise, as quantization-aware training fakes them: [0, 2^b - 1]).
    """
    if symmetric:
        m = (1 << (bits - 1)) - 1
        return -m, m
    return (-128, 127) if bits == 8 else (0, (1 << bits) - 1)


# k per packed unit: one byte holds 2 nibbles or 4 2-bit codes; 3-bit planes cover 8 k in 3 bytes
_K_ALIGN = {8: 1, 4: 2, 3: 8, 2: 4}


def padded_k(k: int, bits: int, group_size: int) -> int:
    align = group_size if group_size != PER_CHANNEL else _K_ALIGN[bits]
    return -(-k // align) * align


def packed_row_bytes(kp: int, bits: int) -> int:
    """Bytes of one packed row of ``kp`` codes (qweight's second dimension)."""
    return kp * bits // 8


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of symmetric codes: 0 for int8, 2^(bits-1) for sub-byte codes."""
    return 0 if bits == 8 else 1 << (bits - 1)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace 0 / non-finite scales by 1: all-zero groups then quantize to exact 0."""
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (and integer zero point for asymmetric) covering [lo, hi]. Never 0 or NaN."""
    lo = lo.float()
    hi = hi.float()
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return safe_scale(amax / qmax), None
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = safe_scale((hi - lo) / (qmax - qmin))
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, Kp] -> [N, G, g] (per channel: G = 1)."""
    n, kp = w.shape
    g = kp if group_size == PER_CHANNEL else group_size
    return w.reshape(n, kp // g, g)


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, Kp] (Kp even) -> uint8 [N, Kp/2], low nibble = even k."""
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp/2] -> uint8 codes 0..15 [N, Kp]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def _pack_fields(u: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [R, m] fields of ``width`` bits (m a multiple of 8 / width) -> uint8 [R, m * width / 8],
    field j of each byte in bits width*j.. (low first)."""
    per = 8 // width
    out = u[:, 0::per].clone()
    for j in range(1, per):
        out |= u[:, j::per] << (width * j)
    return out.contiguous()


def _unpack_fields(p: torch.Tensor, width: int) -> torch.Tensor:
    per, mask = 8 // width, (1 << width) - 1
    return torch.stack([(p >> (width * j)) & mask for j in range(per)], dim=-1).reshape(p.shape[0], -1)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [N, Kp] (0 .. 2^bits - 1) -> the canonical bytes of 4, 3 or 2 bits
    (8-bit codes are a byte each: returned as they are)."""
    u = u.to(torch.uint8)
    if bits == 8:
        return u
    if bits == 4:
        return pack_int4(u)
    if bits == 2:
        return _pack_fields(u, 2)
    if bits == 3:
        return torch.cat((_pack_fields(u & 3, 2), _pack_fields(u >> 2, 1)), dim=1)
    raise ValueError(f"pack_codes packs 8, 4, 3 or 2 bits, got {bits!r}")


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical bytes of 4, 3 or 2 bits -> unsigned codes uint8 [N, Kp] (the inverse of
    :func:`pack_codes`); 8-bit qweight is returned as it is."""
    if bits == 8:
        return packed
    if bits == 4:
        return unpack_int4(packed)
    if bits == 2:
        return _unpack_fields(packed, 2)
    if bits == 3:
        lo_bytes = packed.shape[1] * 2 // 3  # Kp/4 of the 3 Kp/8 bytes
        return _unpack_fields(packed[:, :lo_bytes], 2) | (_unpack_fields(packed[:, lo_bytes:], 1) << 2)
    raise ValueError(f"unpack_codes unpacks 8, 4, 3 or 2 bits, got {bits!r}")


@dataclasses.dataclass
class PackedWeight:
    """A quantized weight in the canonical format (see module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def padded_in_features(self) -> int:
        return padded_k(self.in_features, self.bits, self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        t = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(x.numel() * x.element_size() for x in t)

    def stored_codes(self) -> torch.Tensor:
        """The stored codes as int32 [N, Kp], zero point not removed (sub-byte codes unsigned)."""
        return unpack_codes(self.qweight, self.bits).to(torch.int32)

    def codes(self) -> torch.Tensor:
        """Integer codes as int32 [N, Kp] with the zero point already removed."""
        if self.zeros is None:
            return self.stored_codes() - symmetric_zero(self.bits)
        raise ValueError("codes() is for symmetric weights; use dequantize() for asymmetric ones")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight [N, K] (padding removed)."""
        q = unpack_codes(self.qweight, self.bits).float()
        if self.zeros is None:
            qg = group_view(q - symmetric_zero(self.bits), self.group_size)
            w = qg * self.scales.unsqueeze(-1)
        else:
            qg = group_view(q, self.group_size)
            w = (qg - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.reshape(q.shape)[:, : self.in_features].to(dtype)

    def validate(self, where: str = "") -> "PackedWeight":
        """Check shapes, dtypes and value ranges; raise ValueError naming what is wrong."""
        from .spec import LinearSpec, check_weight  # spec builds on this module

        check_bits(self.bits, where)
        check_group_size(self.group_size, where)
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() != 2:
            raise ValueError(f"{where}qweight must be a 2-D tensor, got {getattr(self.qweight, 'shape', None)}")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"{where}a packed weight needs in_features and out_features >= 1, got "
                             f"[{self.out_features}, {self.in_features}]")
        spec = LinearSpec(self.bits, self.group_size, self.symmetric, False, self.in_features, self.out_features,
                          self.qweight.device)
        try:
            check_weight(spec, self.qweight, self.scales, self.zeros, where)
        except TypeError as e:  # a wrong dtype is a malformed packed weight like any other
            raise ValueError(str(e)) from None
        return self


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = PER_CHANNEL, symmetric: bool = True,
                    scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None,
                    name: str = "weight") -> PackedWeight:
    """Quantize a float weight [N, K] into the canonical format.

    ``scales``/``zeros`` ([N, G]) may come from a calibration observer; by default
    they cover each group's min-max range. Raises for NaN/Inf weights, naming ``name``.
    """
    where = f"{name}: "
    check_bits(bits, where)
    check_group_size(group_size, where)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"{where}weight must be a 2-D floating-point tensor, got "
                        f"{getattr(w, 'dtype', type(w))} {list(getattr(w, 'shape', []))}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"{where}weight {list(w.shape)} holds NaN or Inf (first at index {bad})")
    n, k = w.shape
    kp = padded_k(k, bits, group_size)
    wp = torch.nn.functional.pad(w.detach().float(), (0, kp - k))
    wg = group_view(wp, group_size)
    if scales is None:
        if k == 0:
            lo = hi = torch.zeros(wg.shape[:2], device=w.device)
        else:
            lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scales, zeros = qparams_from_range(lo, hi, bits, symmetric)
    else:
        scales = safe_scale(scales.float().reshape(wg.shape[:2]))
        if not symmetric:
            if zeros is None:
                raise ValueError(f"{where}asymmetric quantization with given scales also needs zeros")
            zeros = zeros.float().reshape(wg.shape[:2])
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(wg / scales.unsqueeze(-1))
    if not symmetric:
        q = q + zeros.unsqueeze(-1)
    q = torch.clamp(q, qmin, qmax).reshape(n, kp)
    if not symmetric:
        # padded columns must dequantize to exactly 0: store the zero point there
        pad_mask = torch.arange(kp, device=w.device) >= k
        zfull = zeros.repeat_interleave(kp // zeros.shape[1], dim=1)
        q = torch.where(pad_mask, zfull, q)
    if bits == 8:
        qweight = q.to(torch.int8)
    else:
        qweight = pack_codes((q + symmetric_zero(bits) if symmetric else q).to(torch.uint8), bits)
    return PackedWeight(qweight.contiguous(), scales.contiguous(),
                        None if symmetric else zeros.contiguous(), bits, group_size, k)


# ----------------------------------------------------------------------------- layouts
# A backend registers a kernel-friendly layout once; QuantLinear stores only that
# layout and converts back to canonical on save. Functions map tensors, nothing else.

@dataclasses.dataclass(frozen=True)
class Layout:
    id: int
    name: str
    from_canonical: Callable[[torch.Tensor, int, int], torch.Tensor]  # (qweight, bits, Kp)
    to_canonical: Callable[[torch.Tensor, int, int, int], torch.Tensor]  # (data, bits, N, Kp)


_LAYOUTS: Dict[int, Layout] = {}


def register_layout(layout: Layout) -> None:
    if layout.id == CANONICAL:
        raise ValueError("layout id 0 is the canonical format")
    _LAYOUTS[layout.id] = layout


def get_layout(layout_id: int) -> Layout:
    try:
        return _LAYOUTS[layout_id]
    except KeyError:
        raise ValueError(f"unknown weight layout id {layout_id}; registered: {sorted(_LAYOUTS)}") from None


def to_canonical(data: torch.Tensor, layout_id: int, bits: int, n: int, kp: int) -> torch.Tensor:
    if layout_id == CANONICAL:
        return data
    return get_layout(layout_id).to_canonical(data, bits, n, kp)
