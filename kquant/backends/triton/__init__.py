"""Triton backend: int8 GEMMs with fused epilogues and 8/4/3/2-bit weight-only GEMMs.

The portable GPU path. With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors
through Triton's interpreter (that is how CI tests them; configurations are then fixed,
never autotuned). Weights stay in the canonical layout (no ``prepare_weight``).

Kernel choice per call (:func:`default_config`, or the autotuner):

* ``quantize_per_token``: one program per row; int8 values bit-identical to the reference.
* ``int8_mm`` / ``w{8,4,3,2}a8_linear``: int8 x int8 ``tl.dot`` with int32
  accumulation; per-channel scales, per-token scales, bias and the output cast in the
  epilogue; group scales folded into an fp32 accumulator once per group (a K step is one
  group). Sub-byte weights are unpacked in the kernel from the canonical bytes (value =
  code - 2^(bits-1)); from M = ``LARGE_M`` on the GPU they are unpacked once to int8 and
  run through the int8 kernel. M <= 64 splits K when the grid would not fill the GPU.
* ``w{8,4,3,2}a16_linear``: M <= 4 a split-K GEMV kernel on CUDA cores; M <= 16
  a tensor-core kernel with BLOCK_M = 16 and split K; M <= 127 a tiled tensor-core kernel;
  from ``LARGE_M`` on the GPU one dequantize pass plus ``torch.mm``. Split K is
  deterministic: the last-arriving program of a tile sums the fp32 partials in slice order.

Environment knobs:

* ``KQUANT_TRITON_AUTOTUNE=1``: on the first call for a key (op kind, M bucket, N, K, group,
  dtype, GPU name) time the candidate configurations (:func:`candidate_configs`) with
  ``triton.testing.do_bench`` and keep the fastest for the process. Off by default
  (heuristic defaults measured on an H100) and always off under the interpreter.
* ``KQUANT_TRITON_VERBOSE=1``: print each tuned choice to stderr.
* ``KQUANT_TRITON_LARGE_M`` (default 128): where the unpack/dequantize-then-GEMM paths start.
* ``KQUANT_TRITON_FAST_LAUNCH=0``: always use Triton's generic launch path (see ``_launch``).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional, Tuple

import torch

from ..base import Backend
from ...format import PER_CHANNEL, SUPPORTED_BITS

_triton_module = None
_IMPORT_ERROR: Optional[str] = None


def _triton():
    """The triton package, imported on first use (it takes a while); None if it does not import."""
    global _triton_module, _IMPORT_ERROR
    if _triton_module is None and _IMPORT_ERROR is None:
        try:
            import triton
            _triton_module = triton
        except Exception as e:  # pragma: no cover - depends on the install
            _IMPORT_ERROR = f"triton does not import: {type(e).__name__}: {e}"
    return _triton_module


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _autotune_on() -> bool:
    return os.environ.get("KQUANT_TRITON_AUTOTUNE", "0") == "1" and not _interpret()


def _device_ok(device: torch.device) -> Tuple[bool, str]:
    interp = _interpret()
    if device.type == "cuda" and interp:
        return False, "TRITON_INTERPRET=1 runs on CPU tensors only"
    if device.type != "cuda" and not (interp and device.type == "cpu"):
        return False, f"tensors on {device.type} need CUDA (or TRITON_INTERPRET=1 for CPU)"
    return True, "triton kernels" + (" (interpreter)" if interp else "")


# ----------------------------------------------------------------------------- kernels module
_kernels_mod = None
_kernels_interp: Optional[bool] = None


def _k():
    """The kernels module, (re)imported so its @triton.jit matches TRITON_INTERPRET now."""
    global _kernels_mod, _kernels_interp
    interp = _interpret()
    if _kernels_mod is None or _kernels_interp != interp:
        name = __name__ + ".kernels"
        if name in sys.modules:
            _kernels_mod = importlib.reload(sys.modules[name])
        else:
            _kernels_mod = importlib.import_module(name)
        _kernels_interp = interp
    return _kernels_mod


# ----------------------------------------------------------------------------- configs
_SM_COUNT: Dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: pretend a tiny GPU so the split-K path is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped at 4096."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def _cfg(bm, bn, bk, warps, stages, split=1, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
            "SPLIT_K": split, "GROUP_M": group_m}


def _auto_split(cfg, m, n, k, device, min_steps: int = 4) -> Dict:
    """Split K until the grid covers ~4 waves of SMs, keeping >= min_steps K steps per slice."""
    tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
    steps = _cdiv(k, cfg["BLOCK_K"])
    target = 4 * _num_sms(device)
    split = 1
    while tiles * split < target and steps >= 2 * min_steps * split and split < 32:
        split *= 2
    return dict(cfg, SPLIT_K=split)


# From this M on, one unpack/dequantize pass over the weight plus a plain GEMM beats
# unpacking inside the GEMM's inner loop, which repeats the unpacking for every M tile.
LARGE_M = int(os.environ.get("KQUANT_TRITON_LARGE_M", "128"))


def _on_gpu(device) -> bool:
    # the interpreter keeps the fused kernels (they are what CI must exercise)
    return device.type == "cuda" and not _interpret()


def _block_k(group_size: int, default: int) -> int:
    # group-wise kernels apply one scale per K step, so a K step is one group
    return default if group_size == PER_CHANNEL else group_size


def _kind(bits: int, int8_activations: bool) -> str:
    """Config/autotune key: 'int8' | 'int4a8' | 'int3a8' | 'int2a8' | 'wo8' | 'wo4' | 'wo3' | 'wo2'."""
    if int8_activations:
        return "int8" if bits == 8 else f"int{bits}a8"
    return f"wo{bits}"


def _packed(kind: str) -> bool:
    """Sub-byte weights: codes unpacked in the kernel."""
    return kind not in ("int8", "wo8")


def _bits(bits) -> int:
    """8, 4, 3 or 2."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"triton kernels take weight bits {list(SUPPORTED_BITS)}, got {bits!r}")
    return int(bits)


def _plane_off(qweight: torch.Tensor, bits: int) -> int:
    """Bytes from a 3-bit row's start to its high-bit plane (Kp/4 of the 3 Kp/8 bytes)."""
    return qweight.shape[1] * 2 // 3 if bits == 3 else 0


def default_config(kind: str, m: int, n: int, k: int, group_size: int, device) -> Dict:
    """Heuristic configuration (no autotuning); kind as :func:`_kind` names it."""
    if not kind.startswith("wo"):
        if m <= 16:
            cfg = _cfg(16, 64, _block_k(group_size, 128), 4, 4)
            return _auto_split(cfg, m, n, k, device)
        if m <= 64:
            cfg = _cfg(64, 128, _block_k(group_size, 128), 4, 4)
            return _auto_split(cfg, m, n, k, device)
        # the autotuner's pick on an H100 at M = N = K = 4096
        cfg = _cfg(128, 128, _block_k(group_size, 128), 8, 3)
        if _packed(kind) and m >= LARGE_M and _on_gpu(device):
            cfg["UNPACK"] = True
        return cfg
    # weight-only
    if m <= GEMV_MAX_M:
        # 16-byte loads per thread: int4 packs BLOCK_K=256 into 128 bytes per row; one
        # configuration close to the best of a sweep on an H100 for int4 and int8 alike
        cfg = dict(_cfg(1, 32, 256, 4, 3), KERNEL="gemv")
        if _packed(kind):
            cfg["FAST_CVT"] = True  # bit tricks instead of int -> float conversions: fewer instructions
        if group_size != PER_CHANNEL:
            cfg["BLOCK_K"] = max(cfg["BLOCK_K"], group_size)
        return _auto_split(cfg, m, n, k, device, min_steps=2)
    if m <= 16:
        cfg = _cfg(16, 64, _block_k(group_size, 128), 4, 4)
        if kind == "wo4" and group_size != PER_CHANNEL:
            cfg["SPLIT_AB"] = True  # even/odd activation planes: no interleaving of the weight tile
        return _auto_split(cfg, m, n, k, device)
    if m <= 64:
        cfg = _cfg(64, 128, _block_k(group_size, 64), 4, 4)
        return _auto_split(cfg, m, n, k, device)
    cfg = _cfg(128, 128, _block_k(group_size, 64), 8, 3)
    if m >= LARGE_M and _on_gpu(device):
        cfg["KERNEL"] = "dequant_mm"
    return cfg


def candidate_configs(kind: str, m: int, n: int, k: int, group_size: int, device):
    """Configurations tried by the autotuner (the default is always among them)."""
    out = [default_config(kind, m, n, k, group_size, device)]
    grouped = group_size != PER_CHANNEL
    if kind.startswith("wo") and m <= GEMV_MAX_M:
        bks = (256, 512) if _packed(kind) else (128, 256)
        for bn in (32, 64):
            for bk in bks:
                if grouped and bk % group_size:
                    continue
                for w, st in ((4, 3),) if _packed(kind) else ((4, 3), (8, 3)):
                    base = _auto_split(dict(_cfg(1, bn, bk, w, st), KERNEL="gemv"), m, n, k, device, min_steps=2)
                    for split in {base["SPLIT_K"], base["SPLIT_K"] * 2}:
                        out.append(dict(base, SPLIT_K=split))
                        if _packed(kind):
                            out.append(dict(base, SPLIT_K=split, FAST_CVT=True))
    else:
        bks = [group_size] if grouped else ([64, 128] if kind.startswith("wo") else [128, 256])
        if m <= 16:
            shapes = [(16, bn, 4, st) for bn in (64, 128) for st in (3, 5)]
        elif m <= 64:
            shapes = [(bm, bn, 4, 4) for bm in (32, 64) for bn in (64, 128)]
        else:
            shapes = [(128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 4), (256, 128, 8, 3),
                      (128, 64, 4, 4)]
        for bm, bn, w, st in shapes:
            for bk in bks:
                if bm * bn >= 128 * 256 and bk > 128:
                    continue  # would not fit shared memory with 3 stages
                base = _cfg(bm, bn, bk, w, st)
                if m <= 64:
                    base = _auto_split(base, m, n, k, device)
                    for split in {base["SPLIT_K"], base["SPLIT_K"] * 2}:
                        out.append(dict(base, SPLIT_K=split))
                        if kind in ("wo4", "int4a8") and bk >= 64:
                            out.append(dict(base, SPLIT_K=split, SPLIT_AB=True))
                else:
                    out.append(base)
        if m >= 64 and kind != "int8":
            base = dict(_cfg(128, 128, _block_k(group_size, 128), 8, 3))
            out.append(dict(base, KERNEL="dequant_mm") if kind.startswith("wo") else dict(base, UNPACK=True))
    uniq = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


def _legal(cfg: Dict, group_size: int) -> Dict:
    """Group-wise kernels need BLOCK_K == group (dot kernels) or a multiple of it (GEMV)."""
    if group_size != PER_CHANNEL:
        bk = cfg["BLOCK_K"]
        if cfg.get("KERNEL") == "gemv":
            cfg["BLOCK_K"] = max(bk, group_size)
        else:
            cfg["BLOCK_K"] = group_size
    return cfg


_TUNED: Dict[tuple, Dict] = {}
_DEFAULTS: Dict[tuple, Dict] = {}


def pick_config(kind, m, n, k, group_size, device, dtype, run, config=None) -> Dict:
    """``config`` (tests) > tuned cache > autotune (if enabled) > heuristic default."""
    if config is not None:
        return _legal(dict(default_config(kind, m, n, k, group_size, device), **config), group_size)
    if not _autotune_on() or device.type != "cuda":
        key = (kind, m, n, k, group_size, device)
        cfg = _DEFAULTS.get(key)
        if cfg is None:
            if len(_DEFAULTS) > 4096:  # many distinct prompt lengths: start over
                _DEFAULTS.clear()
            cfg = _DEFAULTS[key] = default_config(kind, m, n, k, group_size, device)
        return cfg
    key = (kind, m_bucket(m), n, k, group_size, str(dtype), torch.cuda.get_device_name(device))
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_t = None, float("inf")
        for cfg in candidate_configs(kind, m, n, k, group_size, device):
            try:
                t = do_bench(lambda: run(cfg), warmup=5, rep=25)
            except Exception:  # out of resources (shared memory, registers): skip it
                continue
            if t < best_t:
                best, best_t = cfg, t
        _TUNED[key] = best or default_config(kind, m, n, k, group_size, device)
        if os.environ.get("KQUANT_TRITON_VERBOSE") == "1":
            print(f"[kquant.triton] {key}: {_TUNED[key]} ({best_t * 1e3:.1f} us)", file=sys.stderr)
    return _TUNED[key]


# ----------------------------------------------------------------------------- scratch buffers
_COUNTERS: Dict[Tuple[str, Optional[int]], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters for split-K; the kernel resets each one it uses to 0."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


_WORKSPACE: Dict[Tuple[str, Optional[int]], torch.Tensor] = {}


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """Persistent fp32 split-K partials buffer (saves an allocation per decode call).

    Shared by every call on the device: calls on one stream are ordered; concurrent split-K
    calls on different streams of one device are not supported (same for the counters).
    """
    key = (device.type, device.index)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 16), dtype=torch.float32, device=device)
        _WORKSPACE[key] = buf
    return buf


# Triton's generic launch path (argument binding, specialization key, cache lookup) costs
# tens of microseconds per call in Python, several times a decode GEMV's GPU time. After
# the first launch of a specialization we keep its CompiledKernel and call it directly,
# keyed by what Triton specializes on: tensor dtype and 16-byte alignment, and for ints
# whether they equal 1, are divisible by 16, or need 64 bits.
_FAST_CACHE: Dict[tuple, object] = {}
_fast_state = {"ok": os.environ.get("KQUANT_TRITON_FAST_LAUNCH", "1") == "1"}


def _spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    return a == 1, a % 16 == 0, a >= 2 ** 31


def _launch(kernel, grid, args, consts: Dict, opts: Dict):
    """kernel[grid](*args, **consts, **opts), through the cached CompiledKernel when possible."""
    if not _fast_state["ok"] or _interpret():
        kernel[grid](*args, **consts, **opts)
        return
    key = (kernel, args[0].device, tuple(map(_spec, args)), tuple(consts.items()), tuple(opts.items()))
    hit = _FAST_CACHE.get(key)
    if hit is not None:
        grid3 = grid + (1,) * (3 - len(grid))
        compiled, tail = hit
        try:
            compiled[grid3](*args, *tail)
            return
        except Exception as e:  # a Triton whose launcher signature differs: use the slow path
            _fast_state["ok"] = False
            _fast_state["why"] = f"{type(e).__name__}: {e}"
            kernel[grid](*args, **consts, **opts)
            return
    compiled = kernel[grid](*args, **consts, **opts)
    names = getattr(kernel, "arg_names", None)
    if compiled is not None and names is not None and hasattr(compiled, "__getitem__"):
        if len(_FAST_CACHE) > 4096:
            _FAST_CACHE.clear()
        _FAST_CACHE[key] = (compiled, tuple(consts[nm] for nm in names[len(args):]))


def _launch_opts(cfg) -> Dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# ----------------------------------------------------------------------------- launchers
def _quantize(x: torch.Tensor, act_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block = min(4096, max(16, _triton().next_power_of_2(k)))
    static = act_scale is not None
    _launch(_k().quantize_rows_kernel, (m,), (x, q, s, act_scale if static else s, k, x.stride(0), q.stride(0)),
            {"STATIC": static, "BLOCK_K": block, "INTERPRET": _interpret()},
            {"num_warps": 4 if block <= 1024 else 8})
    return q, s


_BROKEN: Dict[str, str] = {}


def _broken(path: str, e: Exception) -> None:
    """Disable an optional fast path for the process, once, with a visible reason."""
    import warnings

    _BROKEN[path] = f"{type(e).__name__}: {e}"
    warnings.warn(f"kquant triton: disabling the {path} path ({_BROKEN[path][:300]}); using the fused kernel")


def _run_with_fallback(run, cfg, out, path: str, optional: bool, fused_cfg):
    """run(cfg) where cfg takes the optional fast ``path``; on its first failure (e.g. a Triton
    that cannot compile it) disable the path for the process and run the fused kernel."""
    if optional and path not in _BROKEN:
        try:
            run(cfg)
            return out
        except Exception as e:  # noqa: BLE001
            _broken(path, e)
    run(fused_cfg if optional else cfg)
    return out


def _dequant(qweight, scales, zeros, group_size, bits, n, k, dtype, to_int8=False) -> torch.Tensor:
    """[N, K] weight: int8 values (to_int8, symmetric sub-byte input) or dequantized floats in ``dtype``."""
    out = torch.empty((n, k), dtype=torch.int8 if to_int8 else dtype, device=qweight.device)
    bn, bk = (128, 1024) if _interpret() else (32, 256)  # the interpreter pays per program
    _launch(_k().dequant_kernel, (_cdiv(n, bn), _cdiv(k, bk)),
            (qweight, scales, zeros if zeros is not None else scales, out, n, k, qweight.stride(0),
             scales.stride(0), _plane_off(qweight, bits)),
            dict(BITS=bits, GROUP=0 if group_size == PER_CHANNEL else group_size, HAS_ZEROS=zeros is not None,
                 TO_INT8=to_int8, BLOCK_N=bn, BLOCK_K=bk), {"num_warps": 4})
    return out


def quantize_per_token(x: torch.Tensor, config=None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _quantize(x.contiguous(), None)


def grad_quantize(x: torch.Tensor, u: torch.Tensor, bits: int, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradient chunks for kquant.distributed: fp32 ``x`` and uniforms ``u`` ``[R, C * chunk]``
    (chunk a power of two) -> (packed codes uint8 ``[R, C * chunk * bits / 8]``, scales ``[R, C]``)."""
    x, u = x.contiguous(), u.contiguous()
    rows, n = x.shape
    codes = torch.empty((rows, n * bits // 8), dtype=torch.uint8, device=x.device)
    s = torch.empty((rows, n // chunk), dtype=torch.float32, device=x.device)
    _launch(_k().grad_quantize_kernel, (rows * n // chunk,), (x, u, codes, s, ((1 << bits) - 1) / 2),
            {"CHUNK": chunk, "BITS": bits}, {"num_warps": 4})
    return codes, s


def _int_gemm(a, sx, b, sw, bias, out, bits, group_size, scaled, config):
    m, k = a.shape
    n = b.shape[0]
    kind = _kind(bits, True)
    device = a.device

    def run(cfg):
        if bits != 8 and cfg.get("UNPACK"):
            # large M: unpack the sub-byte weight to int8 once and run the int8 kernel on it
            w8 = _dequant(b, sw, None, group_size, bits, n, k, None, to_int8=True)
            _int_gemm(a, sx, w8, sw, bias, out, 8, group_size, scaled, None)
            return
        split = cfg["SPLIT_K"] if scaled else 1  # int8_mm stays exact int32: no fp partials
        bk = cfg["BLOCK_K"]
        k_per = _cdiv(_cdiv(k, bk), split) * bk
        tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
        ws = _workspace(device, split * m * n) if split > 1 else out
        cnt = _counters(device, tiles) if split > 1 else out
        _launch(_k().int8_gemm_kernel, (tiles, split),
                (a, sx if scaled else a, b, sw if scaled else a, bias if bias is not None else out, out, ws, cnt,
                 m, n, k, k_per, a.stride(0), b.stride(0), sw.stride(0) if scaled else 0, out.stride(0),
                 _plane_off(b, bits)),
                dict(BITS=bits, GROUP=0 if group_size == PER_CHANNEL else group_size, SCALED=scaled,
                     HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=(k % bk == 0),
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                     # int8 MMAs need K >= 32 per dot, and SPLIT_AB halves K
                     SPLIT_AB=bits == 4 and bk >= 64 and cfg.get("SPLIT_AB", False)), _launch_opts(cfg))

    cfg = pick_config(kind, m, n, k, group_size, device, out.dtype, run, config)
    return _run_with_fallback(run, cfg, out, "unpack", cfg.get("UNPACK"), dict(cfg, UNPACK=False))


def int8_mm(a: torch.Tensor, b: torch.Tensor, config=None) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    if a.shape[1] == 0:
        return out.zero_()
    return _int_gemm(a, None, b, None, None, out, 8, PER_CHANNEL, False, config)


def _output(x, scales, bias) -> Tuple[torch.Tensor, bool]:
    """(y [M, N] in x.dtype, done): done when there is nothing to compute (empty M, N or K)."""
    m, k = x.shape
    n = scales.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out, True
    if k == 0:
        return (out.copy_(bias.to(x.dtype).expand(m, n)) if bias is not None else out.zero_()), True
    return out, False


def act_linear(x, qweight, scales, bias, act_scale, group_size, bits, config=None):
    """W{8,4,3,2}A8 (``bits``, symmetric weights) on int8 tensor cores; ``config`` overrides the
    kernel choice."""
    bits = _bits(bits)
    out, done = _output(x, scales, bias)
    if done:
        return out
    qx, sx = _quantize(x.contiguous(), act_scale)
    return _int_gemm(qx, sx, qweight.contiguous(), scales.contiguous(),
                     bias.contiguous() if bias is not None else None, out, bits, group_size, True, config)


GEMV_MAX_M = 4  # above this, CUDA-core FMAs cost more than the tensor-core dot path


def wo_linear(x, qweight, scales, zeros, bias, group_size, bits, config=None):
    """W{8,4,3,2}A16 (``bits``), zeros optional; ``config`` overrides the kernel choice."""
    bits = _bits(bits)
    x = x.contiguous()
    out, done = _output(x, scales, bias)
    if done:
        return out
    m, k = x.shape
    n = scales.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    bias = bias.contiguous() if bias is not None else None
    kind = _kind(bits, False)
    device = x.device
    group = 0 if group_size == PER_CHANNEL else group_size

    def run(cfg):
        if cfg.get("KERNEL") == "dequant_mm":
            # large M: dequantize once ([N, K] in x.dtype, one pass over the weight) and let
            # the vendor GEMM run at full tensor-core speed; the fused kernel re-dequantizes
            # every weight tile once per M tile
            w = _dequant(qweight, scales, zeros, group_size, bits, n, k, x.dtype)
            if bias is not None:
                torch.addmm(bias.to(x.dtype), x, w.t(), out=out)
            else:
                torch.mm(x, w.t(), out=out)
            return
        split = cfg["SPLIT_K"]
        bk = cfg["BLOCK_K"]
        k_per = _cdiv(_cdiv(k, bk), split) * bk
        gemv = cfg.get("KERNEL") == "gemv"
        tiles = (m if gemv else _cdiv(m, cfg["BLOCK_M"])) * _cdiv(n, cfg["BLOCK_N"])
        ws = _workspace(device, split * m * n) if split > 1 else out
        cnt = _counters(device, tiles) if split > 1 else out
        args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else out,
                out, ws, cnt, m, n, k, k_per, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
                _plane_off(qweight, bits))
        common = dict(BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None, NEED_SUM=bits != 8 or zeros is not None,
                      HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=(k % bk == 0),
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk)
        if gemv:
            _launch(_k().wo_gemv_kernel, (tiles, split), args,
                    dict(common, GPB=bk // group if group else 1, GS=group or bk,
                         SPLIT_X=bits == 4 and cfg.get("SPLIT_X", False), FAST_CVT=cfg.get("FAST_CVT", False)),
                    _launch_opts(cfg))
        else:
            _launch(_k().wo_gemm_kernel, (tiles, split), args,
                    dict(common, IEEE=x.dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], GROUP_M=cfg["GROUP_M"],
                         INTERPRET=_interpret(), SPLIT_AB=bits == 4 and cfg.get("SPLIT_AB", False)),
                    _launch_opts(cfg))

    cfg = pick_config(kind, m, n, k, group_size, device, x.dtype, run, config)
    return _run_with_fallback(run, cfg, out, "dequant_mm", cfg.get("KERNEL") == "dequant_mm",
                              dict(cfg, KERNEL="tiled"))


class TritonBackend(Backend):
    """The portable GPU path; on CPU tensors under TRITON_INTERPRET=1 (how CI runs it)."""

    name = "triton"

    def availability_key(self):
        return _interpret()

    def available(self):
        interp = _interpret()
        if not interp and not torch.cuda.is_available():  # known without importing triton
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        triton = _triton()
        if triton is None:
            return False, _IMPORT_ERROR
        if interp:
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
        cap = torch.cuda.get_device_capability()
        if cap < (8, 0):  # int8 tl.dot and bf16 need Ampere or newer
            return False, f"{torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; the triton kernels need sm_80+"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"

    def can_implement(self, spec):
        return _device_ok(spec.device)

    def linear(self, spec, x, qweight, layout, scales, zeros, bias, act_scale):
        if spec.int8_activations:
            return act_linear(x, qweight, scales, bias, act_scale, spec.group_size, spec.bits)
        return wo_linear(x, qweight, scales, zeros, bias, spec.group_size, spec.bits)

    def can_run_op(self, op, *args):
        return _device_ok(args[0].device)

    def quantize_per_token(self, x):
        return quantize_per_token(x)

    def int8_mm(self, a, b):
        return int8_mm(a, b)


BACKEND = TritonBackend()
