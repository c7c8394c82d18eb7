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

Every kernel reads the canonical layout (no prepare_weight: nothing to convert back).
``can_run`` refuses, with a reason, whatever the kernels do not cover (CPU tensors, devices
older than sm_80 or without machine code in the build, K alignment, M > 16 for
weight-only, other layouts) so that the router moves on to Triton or the reference.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import backend_ops
from .. import _native
from ..format import CANONICAL, PER_CHANNEL

NAME = "cuda"
GEMV_MAX_M = 16  # weight-only kernels are decode GEMVs; larger M goes to Triton
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
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


def available() -> Tuple[bool, str]:
    # asked on every dispatch: the answer cannot change within a process once it is yes
    global _AVAILABLE
    if _AVAILABLE is None or not _AVAILABLE[0]:
        _AVAILABLE = _available()
    return _AVAILABLE


_AVAILABLE: Optional[Tuple[bool, str]] = None


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


def _check_tensors(tensors) -> Optional[str]:
    dev = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"tensors on {t.device.type}; the CUDA kernels need CUDA tensors"
        if dev is None:
            dev = t.device
        elif t.device != dev:
            return f"tensors on {dev} and {t.device}"
    if dev is not None:
        ok, why = _arch_ok(_capability(dev))
        if not ok:
            return why
    return None


@functools.lru_cache(maxsize=None)
def _capability(dev: torch.device) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(dev))  # a properties lookup: not per call


def _linear_reason(op: str, args) -> Optional[str]:
    x, qweight, scales = args[0], args[1], args[2]
    bits = 8 if op.startswith("w8") else 4
    act = op in ("w8a8_linear", "w4a8_linear")
    extra, bias = (args[4], args[3]) if act else (args[3], args[4])   # act_scale | zeros
    group_size, layout = args[5], args[6]
    bad = _check_tensors([x, qweight, scales, extra, bias])
    if bad:
        return bad
    if layout != CANONICAL:
        return f"weight layout {layout} is not the canonical layout the CUDA kernels read"
    if x.dtype not in _FLOATS or x.dim() != 2 or not x.is_contiguous():
        return f"x must be a contiguous 2-D float32/float16/bfloat16 tensor, got {x.dtype} {list(x.shape)}"
    if group_size not in _GROUPS:
        return f"group_size {group_size} not supported by the CUDA kernels"
    m, kp = x.shape
    n = scales.shape[0]
    if bits == 8:
        if qweight.dtype != torch.int8 or list(qweight.shape) != [n, kp]:
            return f"qweight must be int8 [{n}, {kp}], got {qweight.dtype} {list(qweight.shape)}"
        if kp % 16:
            return f"K={kp} is not a multiple of 16 (16-byte rows for cp.async)"
    else:
        if qweight.dtype != torch.uint8 or list(qweight.shape) != [n, kp // 2]:
            return f"qweight must be packed uint8 [{n}, {kp // 2}], got {qweight.dtype} {list(qweight.shape)}"
        if kp % 32:
            return f"K={kp} is not a multiple of 32 (16-byte rows of packed int4)"
    if not qweight.is_contiguous() or not _aligned(qweight):
        return "qweight must be contiguous and 16-byte aligned"
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        return "scales must be contiguous float32"
    if not act:
        if m > GEMV_MAX_M:
            return f"M={m} > {GEMV_MAX_M}: the CUDA weight-only kernel is a decode GEMV"
        if not _aligned(x):
            return "x must be 16-byte aligned"
        if extra is not None and (extra.dtype != torch.float32 or extra.shape != scales.shape):
            return "zeros must be float32 shaped like scales"
    elif extra is not None and extra.numel() != 1:
        return "act_scale must hold one element"
    if bias is not None and (bias.dtype not in _FLOATS or bias.numel() != n):
        return f"bias must be a float tensor with {n} elements"
    if max(m, n, kp) >= 2 ** 30:
        return "shape too large for 32-bit tile indexing"
    return None


def can_run(op: str, *args) -> Tuple[bool, str]:
    if op not in OPS:
        return False, f"cuda backend has no op {op!r}"
    ok, why = available()
    if not ok:
        return False, why
    if not args:
        return True, "CUDA kernel available"
    if op == "quantize_per_token":
        x = args[0]
        bad = _check_tensors([x])
        if bad:
            return False, bad
        if x.dtype not in _FLOATS or x.dim() != 2 or not x.is_contiguous():
            return False, "x must be a contiguous 2-D float tensor"
        return True, "per-token quantization kernel"
    if op == "int8_mm":
        a, b = args[0], args[1]
        bad = _check_tensors([a, b])
        if bad:
            return False, bad
        if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
            return False, "a and b must be 2-D int8"
        if a.shape[1] % 16:
            return False, f"K={a.shape[1]} is not a multiple of 16 (16-byte rows for cp.async)"
        if not (a.is_contiguous() and b.is_contiguous() and _aligned(a) and _aligned(b)):
            return False, "a and b must be contiguous and 16-byte aligned"
        if max(a.shape[0], b.shape[0], a.shape[1]) >= 2 ** 30:
            return False, "shape too large for 32-bit tile indexing"
        return True, "int8 mma.sync GEMM"
    bad = _linear_reason(op, args)
    if bad:
        return False, bad
    return True, "int8 mma.sync GEMM" if op in ("w8a8_linear", "w4a8_linear") else "split-K weight-only GEMV"


# ----------------------------------------------------------------------------- ops
def quantize_per_token(x):
    return torch.ops.kquant._quantize_per_token_cuda(x, None)


def int8_mm(a, b):
    return torch.ops.kquant._int8_mm_cuda(a, b)


def w8a8_linear(x, qweight, scales, bias, act_scale, group_size, layout=CANONICAL):
    return torch.ops.kquant._w8a8_linear_cuda(x, qweight, scales, bias, act_scale, group_size)


def w4a8_linear(x, qweight, scales, bias, act_scale, group_size, layout=CANONICAL):
    return torch.ops.kquant._w4a8_linear_cuda(x, qweight, scales, bias, act_scale, group_size)


def w8a16_linear(x, qweight, scales, zeros, bias, group_size, layout=CANONICAL):
    return torch.ops.kquant._w8a16_linear_cuda(x, qweight, scales, zeros, bias, group_size)


def w4a16_linear(x, qweight, scales, zeros, bias, group_size, layout=CANONICAL):
    return torch.ops.kquant._w4a16_linear_cuda(x, qweight, scales, zeros, bias, group_size)


OPS = backend_ops(globals())
