"""CPU backend: the C++ kernels of ``kquant._C`` (csrc/cpu), AMX, AVX-512, AVX2 or scalar.

Weights are re-laid out once per layer (:meth:`CpuBackend.prepare`) into blocks of output
channels:

* layout 1 ``cpu_int8_n16k4``: int8 ``[ceil(N/16), Kq, 16, 4]``, 4 consecutive k of one
  channel per 32-bit lane. A 64-byte k-quad row of 16 channels is one full-width AMX B
  row and one AVX-512 register; the AVX2 kernels read its 8-channel halves (one load feeds
  vpmaddubsw or two vpmovsxbw).
* layout 2 ``cpu_int4_n8k8``: uint8 ``[ceil(N/8), Kq/2, 8, 4]``; byte (c, j) of k-octet
  o holds nibble k = 8o + j (low) and k = 8o + 4 + j (high), so ``v & 15`` and ``v >> 4`` are
  two ready blocks.
* layout 3 ``cpu_int2_n8k16``: uint8 ``[ceil(N/8), Kq/4, 8, 4]``; byte (c, j) of unit o holds
  the 2-bit codes of k = 16o + 4t + j in bits 2t..2t+1, so ``(v >> 2t) & 3`` is a ready block.
* layout 4 ``cpu_int3_n8k32``: uint8 ``[ceil(N/8), 3 Kq/8, 8, 4]``; a 32-k unit is three such
  rows A, B, C whose byte (c, j) holds the codes of k = 32o + 4t + j: A t = 0 and 1 (bits 0-2,
  3-5) and the low bits of t = 6 (bits 6-7), B t = 2, 3 and the low bits of t = 7, C t = 4, 5
  and the third bits of t = 6, 7 (bits 6, 7): six whole codes per byte triple.

K is zero-padded to a multiple of 64 (Kq = 16 * ceil(Kp / 64)): whole AMX tiles. All four
convert back to the exact canonical bytes (padding is dropped). The 2- and 3-bit kernels read
layouts 3 and 4 directly, a pair of rows at a time; where the AMX tiles (from a few rows) or
at::mm (float activations, hundreds of rows) are faster, a chunk of channels at a time is
unpacked into layout 1 and run by the int8 / weight-only kernels (csrc/cpu/lowbit.cpp).

The kernels check the CPU at run time and use the best level it has;
``KQUANT_CPU_ISA=scalar|avx2|avx512|amx`` caps the level (read on every call).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from ..format import CANONICAL, Layout, pack_codes, pack_int4, register_layout, unpack_codes, unpack_int4
from .base import Backend

LAYOUT_INT8 = 1
LAYOUT_INT4 = 2
LAYOUT_INT2 = 3
LAYOUT_INT3 = 4

_C = _native.load("_C", warn=False)
_HAS_KERNELS = _C is not None and hasattr(torch.ops.kquant, "_w8a8_linear_cpu")
_HAS_LOWBIT = _HAS_KERNELS and hasattr(torch.ops.kquant, "_w2a8_linear_cpu")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- layouts
def _swap_middle(t: torch.Tensor) -> torch.Tensor:
    """[A, B, C, 4] bytes -> [A, C, B, 4], moving each 4-byte group as one int32 (a byte-wise
    permuted copy is several times slower)."""
    a, b, c = t.shape[:3]
    return t.contiguous().view(torch.int32).view(a, b, c).permute(0, 2, 1).contiguous().view(t.dtype).view(a, c, b, 4)


def int8_to_blocked(q: torch.Tensor, bits: int = 8, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical int8 [N, Kp] -> layout 1."""
    n, kp = q.shape[0], q.shape[1] if kp is None else kp
    nb, kq = _cdiv(n, 16), _cdiv(kp, 64) * 16
    p = torch.zeros(nb * 16, kq * 4, dtype=torch.int8, device=q.device)
    p[:n, :kp] = q
    return _swap_middle(p.view(nb, 16, kq, 4))


def int8_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    nb, kq = d.shape[0], d.shape[1]
    return _swap_middle(d).reshape(nb * 16, kq * 4)[:n, :kp].contiguous()


def int4_to_blocked(q: torch.Tensor, bits: int = 4, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical int4 uint8 [N, Kp/2] -> layout 2."""
    n = q.shape[0]
    kp = q.shape[1] * 2 if kp is None else kp
    nb, ko = _cdiv(n, 8), _cdiv(kp, 64) * 8
    u = torch.zeros(nb * 8, ko * 8, dtype=torch.uint8, device=q.device)
    u[:n, :kp] = unpack_int4(q)
    u = u.view(nb, 8, ko, 2, 4)
    b = u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)       # [nb, 8, ko, 4]
    return _swap_middle(b)                               # [nb, ko, 8, 4]


def int4_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    nb, ko = d.shape[0], d.shape[1]
    b = _swap_middle(d)                                  # [nb, 8, ko, 4]
    u = torch.stack((b & 0x0F, b >> 4), dim=3)           # [nb, 8, ko, 2, 4]
    return pack_int4(u.reshape(nb * 8, ko * 8)[:n, :kp])


def _low_codes(q: torch.Tensor, bits: int, kp: Optional[int]) -> torch.Tensor:
    """Canonical 2/3-bit bytes -> codes uint8 [ceil(N/8), 8, Kpad / 32, 8, 4] (block, channel,
    32-k unit, t, j: k = 32 unit + 4 t + j), zero-padded."""
    n = q.shape[0]
    kp = q.shape[1] * 8 // bits if kp is None else kp
    u = torch.zeros(_cdiv(n, 8) * 8, _cdiv(kp, 64) * 64, dtype=torch.uint8, device=q.device)
    u[:n, :kp] = unpack_codes(q, bits)
    return u.view(u.shape[0] // 8, 8, -1, 8, 4)


def _codes(t: torch.Tensor, n: int, kp: int, bits: int) -> torch.Tensor:
    """Codes [nb, 8, units, 8, 4] -> canonical bytes [n, Kp * bits / 8]."""
    return pack_codes(t.reshape(t.shape[0] * 8, -1)[:n, :kp], bits)


def int2_to_blocked(q: torch.Tensor, bits: int = 2, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical 2-bit uint8 [N, Kp/4] -> layout 3."""
    u = _low_codes(q, 2, kp)
    u = u.view(u.shape[0], 8, -1, 4, 4)                  # [nb, 8, 16-k units, t, j]
    return _swap_middle(u[..., 0, :] | (u[..., 1, :] << 2) | (u[..., 2, :] << 4) | (u[..., 3, :] << 6))


def int2_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    b = _swap_middle(d)                                  # [nb, 8, units, 4]
    return _codes(torch.stack([(b >> (2 * t)) & 3 for t in range(4)], dim=3), n, kp, 2)


def int3_to_blocked(q: torch.Tensor, bits: int = 3, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical 3-bit uint8 [N, 3 Kp/8] -> layout 4."""
    t = _low_codes(q, 3, kp)                             # [nb, 8, units, 8, 4]
    a = t[..., 0, :] | (t[..., 1, :] << 3) | ((t[..., 6, :] & 3) << 6)
    b = t[..., 2, :] | (t[..., 3, :] << 3) | ((t[..., 7, :] & 3) << 6)
    c = t[..., 4, :] | (t[..., 5, :] << 3) | ((t[..., 6, :] >> 2) << 6) | ((t[..., 7, :] >> 2) << 7)
    return _swap_middle(torch.stack((a, b, c), dim=3).flatten(2, 3))  # rows 3 unit + (A, B, C)


def int3_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    r = _swap_middle(d)
    r = r.view(r.shape[0], 8, -1, 3, 4)                  # [nb, 8, units, row, j]
    a, b, c = r[..., 0, :], r[..., 1, :], r[..., 2, :]
    t = torch.stack((a & 7, (a >> 3) & 7, b & 7, (b >> 3) & 7, c & 7, (c >> 3) & 7,
                     (a >> 6) | (((c >> 6) & 1) << 2), (b >> 6) | ((c >> 7) << 2)), dim=3)
    return _codes(t, n, kp, 3)


register_layout(Layout(LAYOUT_INT8, "cpu_int8_n16k4", int8_to_blocked, int8_from_blocked))
register_layout(Layout(LAYOUT_INT4, "cpu_int4_n8k8", int4_to_blocked, int4_from_blocked))
register_layout(Layout(LAYOUT_INT2, "cpu_int2_n8k16", int2_to_blocked, int2_from_blocked))
register_layout(Layout(LAYOUT_INT3, "cpu_int3_n8k32", int3_to_blocked, int3_from_blocked))


# ----------------------------------------------------------------------------- backend
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "amx"}
_ISA_DESCRIPTIONS = {
    "scalar": "scalar (portable C++)",
    "avx2": "AVX2+FMA",
    "avx512": "AVX2+FMA, AVX-512 VNNI",
    "amx": "AVX2+FMA, AVX-512 VNNI, AMX (int8 GEMMs from 2 rows, W4A8 from 4; weight-only from 16 rows "
           "where AMX-BF16 is present)",
}
# the C++ op per (weight bits, int8 activations)
_OP_NAMES = {(bits, a8): f"_w{bits}a{8 if a8 else 16}_linear_cpu" for bits in (8, 4, 3, 2) for a8 in (True, False)}


def isa() -> str:
    """The level the kernels run at now (KQUANT_CPU_ISA applied)."""
    return ISA_NAMES[torch.ops.kquant._cpu_isa()]


def best_isa() -> str:
    """The best level this CPU has (KQUANT_CPU_ISA ignored)."""
    best = getattr(torch.ops.kquant, "_cpu_isa_best", None)
    return ISA_NAMES[best()] if best is not None else isa()


def cache_sizes(detected: bool = False) -> dict:
    """The cache sizes (bytes) the kernels' blocking comes from: {"l1": L1 data, "l2": L2 per
    core, "l3": L3}. ``KQUANT_CPU_CACHE="l2=512K,l3=32M"`` overrides what the CPU reports, so a
    machine with large caches can run a small-cache CPU's blocking; ``detected=True`` ignores it."""
    l1, l2, l3 = torch.ops.kquant._cpu_caches(detected)
    return {"l1": l1, "l2": l2, "l3": l3}


_LAYOUTS = {8: LAYOUT_INT8, 4: LAYOUT_INT4, 3: LAYOUT_INT3, 2: LAYOUT_INT2}
_TO_BLOCKED = {8: int8_to_blocked, 4: int4_to_blocked, 3: int3_to_blocked, 2: int2_to_blocked}


def _layout_of(bits: int) -> int:
    return _LAYOUTS[bits]


def _blocked(qweight, bits, kp):
    return _TO_BLOCKED[bits](qweight, bits, kp)


class CpuBackend(Backend):
    name = "cpu"

    def available(self):
        if _C is None:
            return False, f"native extension kquant._C not built ({_native.error('_C') or 'not found'})"
        if not _HAS_KERNELS:
            return False, "kquant._C was built without the CPU kernels (csrc/cpu)"
        return True, "C++ kernels"

    def detail(self):
        return f"running {_ISA_DESCRIPTIONS[isa()]}"

    def can_implement(self, spec):
        if spec.device.type != "cpu":
            return False, f"tensors are on {spec.device}"
        if spec.bits in (3, 2) and not _HAS_LOWBIT:
            return False, f"kquant._C was built without the {spec.bits}-bit kernels (rebuild it)"
        return True, "C++ kernels"

    def reads(self, layout):
        return layout in (CANONICAL, LAYOUT_INT8, LAYOUT_INT4, LAYOUT_INT2, LAYOUT_INT3)

    def prepare(self, spec, qweight):
        return _blocked(qweight, spec.bits, spec.padded_in_features), _layout_of(spec.bits)

    def kernel(self, spec, layout):
        op = getattr(torch.ops.kquant, _OP_NAMES[(spec.bits, spec.int8_activations)])
        gs = spec.group_size
        if layout == CANONICAL:
            return lambda x, q, s, z, b, a: self.linear(spec, x, q, layout, s, z, b, a)
        if spec.int8_activations:
            return lambda x, q, s, z, b, a: op(x, q, s, b, a, gs)
        return lambda x, q, s, z, b, a: op(x, q, s, z, b, gs)

    def linear(self, spec, x, qweight, layout, scales, zeros, bias, act_scale):
        if layout == CANONICAL:  # a direct op call with a canonical weight: block it for this call
            qweight, layout = _blocked(qweight, spec.bits, x.shape[1]), _layout_of(spec.bits)
        return self.kernel(spec, layout)(x, qweight, scales, zeros, bias, act_scale)

    def can_run_op(self, op, *args):
        if args[0].device.type != "cpu":
            return False, f"tensors are on {args[0].device}"
        return True, "C++ kernels"

    def quantize_per_token(self, x):
        return torch.ops.kquant._quantize_per_token_cpu(x)

    def int8_mm(self, a, b):
        return torch.ops.kquant._int8_mm_cpu(a, b)


BACKEND = CpuBackend()
quantize_per_token = BACKEND.quantize_per_token
int8_mm = BACKEND.int8_mm
