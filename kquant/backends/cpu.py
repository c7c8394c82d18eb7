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

K is zero-padded to a multiple of 64 (Kq = 16 * ceil(Kp / 64)): whole AMX tiles. Both
convert back to the exact canonical bytes (padding is dropped).

The kernels check the CPU at run time and use the best level it has;
``KQUANT_CPU_ISA=scalar|avx2|avx512|amx`` caps the level (read on every call).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from ..format import CANONICAL, Layout, pack_int4, register_layout, unpack_int4
from .base import Backend

LAYOUT_INT8 = 1
LAYOUT_INT4 = 2

_C = _native.load("_C", warn=False)
_HAS_KERNELS = _C is not None and hasattr(torch.ops.kquant, "_w8a8_linear_cpu")


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


register_layout(Layout(LAYOUT_INT8, "cpu_int8_n16k4", int8_to_blocked, int8_from_blocked))
register_layout(Layout(LAYOUT_INT4, "cpu_int4_n8k8", int4_to_blocked, int4_from_blocked))


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
_OP_NAMES = {(8, True): "_w8a8_linear_cpu", (4, True): "_w4a8_linear_cpu",
             (8, False): "_w8a16_linear_cpu", (4, False): "_w4a16_linear_cpu"}


def isa() -> str:
    """The level the kernels run at now (KQUANT_CPU_ISA applied)."""
    return ISA_NAMES[torch.ops.kquant._cpu_isa()]


def best_isa() -> str:
    """The best level this CPU has (KQUANT_CPU_ISA ignored)."""
    best = getattr(torch.ops.kquant, "_cpu_isa_best", None)
    return ISA_NAMES[best()] if best is not None else isa()


def _layout_of(bits: int) -> int:
    return LAYOUT_INT8 if bits == 8 else LAYOUT_INT4


def _blocked(qweight, bits, kp):
    return int8_to_blocked(qweight, 8, kp) if bits == 8 else int4_to_blocked(qweight, 4, kp)


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
        if spec.bits not in (8, 4):
            return False, f"no C++ kernel for {spec.bits}-bit weights yet"
        return True, "C++ kernels"

    def reads(self, layout):
        return layout in (CANONICAL, LAYOUT_INT8, LAYOUT_INT4)

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
