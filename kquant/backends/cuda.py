"""CUDA backend: hand-written int8 tensor-core kernels in ``kquant._C_cuda`` (csrc/cuda).

* ``quantize_per_token``: one block per row, bit-identical to the reference definition.
* ``int8_mm`` / ``w8a8_linear`` / ``w4a8_linear``: ``mma.sync`` m16n8k32 s8 GEMM, 128x128x64
  tiles, 4-stage cp.async pipeline, ldmatrix; int4 weights (canonical layout) unpacked to
  int8 in registers; per-channel or per-group (32/64/128, folded per K-group into fp32)
  weight scales, per-token activation scale and bias fused in the epilogue. An sm_90a
  ``wgmma`` kernel for the per-channel int8 case is opt-in (``KQUANT_CUDA_WGMMA=1``; it
  runs once it reproduced the mma.sync result on the device): on an H100 it measured
  about 2x slower than mma.sync.
* ``w8a16_linear`` / ``w4a16_linear``: split-K GEMV for decode (M <= 16) streaming the
  canonical weights with 16-byte loads; group scales and optional zero points. int4 with
  fp16/bf16 activations and one scale per 128 k (group 128, or per channel with
  K % 128 == 0) runs on ``mma.sync`` m16n8k16 (``KQUANT_CUDA_GEMV_MMA=0``: FMA path).

Every kernel reads the canonical layout (nothing to convert back). ``can_implement``
refuses, with a reason, the layers the kernels do not cover (CPU tensors, devices older
than sm_80 or without machine code in the build, K alignment); ``can_run`` the calls
(M > 16 for weight-only, unaligned x), so that the router moves on to Triton or the reference.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import _native
from ..format import PER_CHANNEL
from .base import Backend

GEMV_MAX_M = 16  # weight-only kernels are decode GEMVs; larger M goes to Triton
_GROUPS = (32, 64, 128, PER_CHANNEL)


def _lib():
    return _native.load("_C_cuda", warn=False)


@functools.lru_cache(maxsize=None)
def built_archs() -> Tuple[int, ...]:
    """Architectures with machine code in the built library, e.g. (80, 90)."""
    lib = _lib()
    if lib is None:
        return ()
    text = getattr(lib, "CUDA_ARCH_LIST", "") or ""
    return tuple(int(a) // 10 for a in text.split(",") if a.strip().isdigit())


@functools.lru_cache(maxsize=None)
def _arch_ok(cap: Tuple[int, int]) -> Tuple[bool, str]:
    major, minor = cap
    if major < 8:
        return False, f"needs compute capability >= 8.0 (int8 mma.sync, cp.async), device has {major}.{minor}"
    archs = built_archs()
    # sm_XY machine code runs on the same major with minor >= Y (sm_90a only on 9.0)
    for a in archs:
        if a // 10 == major and a % 10 <= minor:
            return True, ""
    return False, (f"kquant._C_cuda holds machine code for sm_{'/'.join(map(str, archs)) or '-'}, not for "
                   f"this sm_{major}{minor} device; rebuild with KQUANT_CUDA_ARCHS={major}{minor}")


def _available() -> Tuple[bool, str]:
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if _lib() is None:
        return False, f"kquant._C_cuda is not built or does not load ({_native.error('_C_cuda') or 'unknown'})"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    ok, why = _arch_ok(tuple(torch.cuda.get_device_capability()))
    if not ok:
        return False, why
    return True, f"CUDA kernels for sm_{'/'.join(map(str, built_archs()))} on {torch.cuda.get_device_name()}"


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _capability(dev: torch.device) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(dev))  # a properties lookup: not per call


def _device_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"tensors on {device.type}; the CUDA kernels need CUDA tensors"
    ok, why = _arch_ok(_capability(device))
    return None if ok else why


# the C++ op per (weight bits, int8 activations)
_OP_NAMES = {(8, True): "_w8a8_linear_cuda", (4, True): "_w4a8_linear_cuda",
             (8, False): "_w8a16_linear_cuda", (4, False): "_w4a16_linear_cuda"}


class CudaBackend(Backend):
    name = "cuda"
    per_call_checks = True  # M and alignment limits

    def available(self):
        return _available()

    def can_implement(self, spec):
        bad = _device_reason(spec.device)
        if bad:
            return False, bad
        if spec.bits not in (8, 4):
            return False, f"the CUDA kernels read 8- and 4-bit weights; {spec.bits}-bit layers run on triton"
        if spec.group_size not in _GROUPS:
            return False, f"group_size {spec.group_size} not supported by the CUDA kernels"
        kp = spec.padded_in_features
        if spec.bits == 8 and kp % 16:
            return False, f"K={kp} is not a multiple of 16 (16-byte rows for cp.async)"
        if spec.bits == 4 and kp % 32:
            return False, f"K={kp} is not a multiple of 32 (16-byte rows of packed int4)"
        if max(spec.out_features, kp) >= 2 ** 30:
            return False, "shape too large for 32-bit tile indexing"
        return True, "int8 mma.sync GEMM" if spec.int8_activations else "split-K weight-only GEMV"

    def can_run(self, spec, x):
        if not spec.int8_activations:
            if x.shape[0] > GEMV_MAX_M:
                return False, f"M={x.shape[0]} > {GEMV_MAX_M}: the CUDA weight-only kernel is a decode GEMV"
            if not _aligned(x):
                return False, "x must be 16-byte aligned"
        if x.shape[0] >= 2 ** 30:
            return False, "shape too large for 32-bit tile indexing"
        return True, ""

    def kernel(self, spec, layout):
        op = getattr(torch.ops.kquant, _OP_NAMES[(spec.bits, spec.int8_activations)])
        gs = spec.group_size
        if spec.int8_activations:
            return lambda x, q, s, z, b, a: op(x, _ready(q), s.contiguous(), b, a, gs)
        return lambda x, q, s, z, b, a: op(x, _ready(q), s.contiguous(), z, b, gs)

    def linear(self, spec, x, qweight, layout, scales, zeros, bias, act_scale):
        return self.kernel(spec, layout)(x, qweight, scales, zeros, bias, act_scale)

    def can_run_op(self, op, *args):
        bad = _device_reason(args[0].device)
        if bad:
            return False, bad
        if op == "quantize_per_token":
            return True, "per-token quantization kernel"
        a = args[0]
        if a.shape[1] % 16:
            return False, f"K={a.shape[1]} is not a multiple of 16 (16-byte rows for cp.async)"
        if not (_aligned(a) and _aligned(args[1])):
            return False, "a and b must be 16-byte aligned"
        if max(a.shape[0], args[1].shape[0], a.shape[1]) >= 2 ** 30:
            return False, "shape too large for 32-bit tile indexing"
        return True, "int8 mma.sync GEMM"

    def quantize_per_token(self, x):
        return torch.ops.kquant._quantize_per_token_cuda(x, None)

    def int8_mm(self, a, b):
        return torch.ops.kquant._int8_mm_cuda(a, b)


def _ready(qweight: torch.Tensor) -> torch.Tensor:
    """The kernels read 16-byte aligned contiguous rows (a copy only for an odd view)."""
    if qweight.is_contiguous() and _aligned(qweight):
        return qweight
    return qweight.clone(memory_format=torch.contiguous_format)


BACKEND = CudaBackend()
