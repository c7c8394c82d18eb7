"""CPU backend: AVX2 integer kernels from ``kquant._C`` (csrc/cpu), scalar fallback inside.

Weights are re-laid out once (:func:`prepare_weight`) into blocks of output channels:

* layout 1 ``cpu_int8_n16k4``: int8 ``[ceil(N/16), Kq, 16, 4]``, 4 consecutive k of one
  channel per 32-bit lane. A 64-byte k-quad row of 16 channels is one full-width AMX B
  row and one AVX-512 register; the AVX2 kernels read its 8-channel halves (one load feeds
  vpmaddubsw or two vpmovsxbw).
* layout 2 ``cpu_int4_n8k8``: uint8 ``[ceil(N/8), Kq/2, 8, 4]``; byte (c, j) of k-octet
  o holds nibble k = 8o + j (low) and k = 8o + 4 + j (high), so ``v & 15`` and ``v >> 4`` are
  two ready blocks.

K is zero-padded to a multiple of 64 (Kq = 16 * ceil(Kp / 64)): whole AMX tiles. Both
convert back to the exact canonical bytes (padding is dropped).
``KQUANT_CPU_ISA=scalar`` (portable C++), ``avx2`` or ``avx512`` (no AMX) caps the kernels'
ISA; the default is the best the machine has.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backend_ops
from .. import _native
from ..format import CANONICAL, Layout, pack_int4, register_layout, unpack_int4

NAME = "cpu"
# available()/can_run() depend only on op, device type and layout: a layer may reuse the choice
ROUTE_STABLE = True
LAYOUT_INT8 = 1
LAYOUT_INT4 = 2

_C = _native.load("_C", warn=False)
_HAVE = _C is not None and hasattr(torch.ops.kquant, "_w8a8_linear_cpu")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- layouts
def int8_to_blocked(q: torch.Tensor, bits: int = 8, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical int8 [N, Kp] -> layout 1."""
    n, kp = q.shape[0], q.shape[1] if kp is None else kp
    nb, kq = _cdiv(n, 16), _cdiv(kp, 64) * 16
    p = torch.zeros(nb * 16, kq * 4, dtype=torch.int8, device=q.device)
    p[:n, :kp] = q
    return p.view(nb, 16, kq, 4).permute(0, 2, 1, 3).contiguous()


def int8_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    nb, kq = d.shape[0], d.shape[1]
    return d.permute(0, 2, 1, 3).reshape(nb * 16, kq * 4)[:n, :kp].contiguous()


def int4_to_blocked(q: torch.Tensor, bits: int = 4, kp: Optional[int] = None) -> torch.Tensor:
    """Canonical int4 uint8 [N, Kp/2] -> layout 2."""
    n = q.shape[0]
    kp = q.shape[1] * 2 if kp is None else kp
    nb, ko = _cdiv(n, 8), _cdiv(kp, 64) * 8
    u = torch.zeros(nb * 8, ko * 8, dtype=torch.uint8, device=q.device)
    u[:n, :kp] = unpack_int4(q)
    u = u.view(nb, 8, ko, 2, 4)
    b = u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)       # [nb, 8, ko, 4]
    return b.permute(0, 2, 1, 3).contiguous()            # [nb, ko, 8, 4]


def int4_from_blocked(d: torch.Tensor, bits: int, n: int, kp: int) -> torch.Tensor:
    nb, ko = d.shape[0], d.shape[1]
    b = d.permute(0, 2, 1, 3)                            # [nb, 8, ko, 4]
    u = torch.stack((b & 0x0F, b >> 4), dim=3)           # [nb, 8, ko, 2, 4]
    return pack_int4(u.reshape(nb * 8, ko * 8)[:n, :kp])


register_layout(Layout(LAYOUT_INT8, "cpu_int8_n16k4", int8_to_blocked, int8_from_blocked))
register_layout(Layout(LAYOUT_INT4, "cpu_int4_n8k8", int4_to_blocked, int4_from_blocked))


# ----------------------------------------------------------------------------- backend API
def available() -> Tuple[bool, str]:
    if _C is None:
        return False, f"native extension kquant._C not built ({_native.error('_C') or 'not found'})"
    if not _HAVE:
        return False, "kquant._C was built without the CPU kernels (csrc/cpu)"
    return True, f"C++ kernels, {_ISA_NAMES[torch.ops.kquant._cpu_isa()]}"


_ISA_NAMES = {0: "scalar (no AVX2/FMA, or KQUANT_CPU_ISA=scalar)",
              1: "AVX2+FMA",
              2: "AVX2+FMA, AVX-512 VNNI",
              3: "AVX2+FMA, AVX-512 VNNI, AMX (int8 GEMMs from 2 rows, W4A8 from 4; "
                 "weight-only from 16 rows where AMX-BF16 is present)"}


_WANT = {"w8a8_linear": LAYOUT_INT8, "w8a16_linear": LAYOUT_INT8,
         "w4a8_linear": LAYOUT_INT4, "w4a16_linear": LAYOUT_INT4}


def can_run(op: str, *args) -> Tuple[bool, str]:
    if op not in OPS:
        return False, f"cpu backend has no {op}"
    if args:
        x = args[0]
        if x.device.type != "cpu":
            return False, f"tensors are on {x.device}"
        if op in _WANT:
            layout = args[-1]
            if layout not in (CANONICAL, _WANT[op]):
                return False, f"weight layout {layout} is not a cpu layout"
    return True, "ok"


def prepare_weight(qweight: torch.Tensor, bits: int, group_size: int, op_name: str):
    """Blocked layout for this weight, derived once; None when another device holds it."""
    if qweight.device.type != "cpu" or op_name not in _WANT:
        return None
    if bits == 8:
        return int8_to_blocked(qweight), LAYOUT_INT8
    return int4_to_blocked(qweight), LAYOUT_INT4


def _blocked(qweight, bits, layout, kp):
    if layout == CANONICAL:  # direct op call with a canonical weight: block it for this call
        return int8_to_blocked(qweight, 8, kp) if bits == 8 else int4_to_blocked(qweight, 4, kp)
    return qweight


def quantize_per_token(x):
    return torch.ops.kquant._quantize_per_token_cpu(x)


def int8_mm(a, b):
    return torch.ops.kquant._int8_mm_cpu(a, b)


def w8a8_linear(x, qweight, scales, bias, act_scale, group_size, layout=CANONICAL):
    if layout != LAYOUT_INT8:
        qweight = _blocked(qweight, 8, layout, x.shape[1])
    return torch.ops.kquant._w8a8_linear_cpu(x, qweight, scales, bias, act_scale, group_size)


def w4a8_linear(x, qweight, scales, bias, act_scale, group_size, layout=CANONICAL):
    if layout != LAYOUT_INT4:
        qweight = _blocked(qweight, 4, layout, x.shape[1])
    return torch.ops.kquant._w4a8_linear_cpu(x, qweight, scales, bias, act_scale, group_size)


def w8a16_linear(x, qweight, scales, zeros, bias, group_size, layout=CANONICAL):
    if layout != LAYOUT_INT8:
        qweight = _blocked(qweight, 8, layout, x.shape[1])
    return torch.ops.kquant._w8a16_linear_cpu(x, qweight, scales, zeros, bias, group_size)


def w4a16_linear(x, qweight, scales, zeros, bias, group_size, layout=CANONICAL):
    if layout != LAYOUT_INT4:
        qweight = _blocked(qweight, 4, layout, x.shape[1])
    return torch.ops.kquant._w4a16_linear_cpu(x, qweight, scales, zeros, bias, group_size)


OPS = backend_ops(globals())
