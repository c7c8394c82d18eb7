"""The router: picks one backend per call from an ordered candidate list.

Each backend is a module exposing ``NAME``, ``available() -> (ok, reason)``,
``can_run(op, *args) -> (ok, reason)`` and ``OPS`` (op name -> function taking the
normalized arguments of :mod:`kquant.ops`). Optionally ``prepare_weight(...)`` derives
a kernel-friendly layout once per module.

``KQUANT_BACKEND=reference|cpu|triton|cuda`` forces one backend; a forced backend that
cannot run raises, it never falls back silently.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

from ..format import CANONICAL

ENV = "KQUANT_BACKEND"
# every backend module defines a function per op and OPS = backend_ops(globals())
OP_NAMES = ("quantize_per_token", "int8_mm", "w8a8_linear", "w4a8_linear", "w8a16_linear", "w4a16_linear")
_MODULES = {
    "reference": "kquant.backends.reference",
    "cpu": "kquant.backends.cpu",
    "triton": "kquant.backends.triton",
    "cuda": "kquant.backends.cuda",
}
# candidates per device type, in order of preference (reference always last)
_ORDER = {"cpu": ["cpu", "reference"], "cuda": ["cuda", "triton", "reference"]}

_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}


class BackendError(RuntimeError):
    """A forced backend cannot run a call, or no backend can."""


def backend_ops(namespace: dict) -> Dict[str, object]:
    """{op name: function} from a backend module's globals()."""
    return {op: namespace[op] for op in OP_NAMES}


def _module(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # a missing toolchain or library must not break the package
        _load_errors[name] = f"import failed: {type(e).__name__}: {e}"
        return None
    _loaded[name] = mod
    return mod


_available: Dict[str, str] = {}  # backends found usable: asked once, not on every call


def status(name: str) -> Tuple[bool, str]:
    """Whether backend ``name`` is usable in this process, and why (not)."""
    if name in _available:
        return True, _available[name]
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(_MODULES)}")
    mod = _module(name)
    if mod is None:
        return False, _load_errors[name]
    ok, why = mod.available()
    if ok:
        _available[name] = why
    return ok, why


def backends() -> Dict[str, Dict[str, object]]:
    """What is available and why not: {name: {"available": bool, "reason": str}}."""
    out = {}
    for name in _MODULES:
        ok, why = status(name)
        out[name] = {"available": ok, "reason": why}
    return out


def forced() -> Optional[str]:
    name = os.environ.get(ENV, "").strip().lower() or None
    if name is not None and name not in _MODULES:
        raise ValueError(f"{ENV}={name!r} is not a backend; choose from {sorted(_MODULES)}")
    return name


_PREFS_FILE = os.path.join(os.path.dirname(__file__), "gpu_prefs.json")
_prefs: Optional[Dict[str, Dict[str, str]]] = None


def gpu_prefs() -> Dict[str, Dict[str, str]]:
    """{op: {M: backend}}: which of cuda/triton bench/gpu_check.py measured faster, per M."""
    global _prefs
    if _prefs is None:
        try:
            with open(_PREFS_FILE) as f:
                _prefs = json.load(f).get("prefs", {})
        except (OSError, ValueError):
            _prefs = {}
    return _prefs


def _preferred_gpu(op: str, m: int) -> Optional[str]:
    table = gpu_prefs().get(op)
    if not table:
        return None
    # the measured M closest to this call's M (on a log scale)
    best = min(table, key=lambda k: abs(math.log2(max(int(k), 1)) - math.log2(max(m, 1))))
    return table[best]


def candidates(device_type: str, op: Optional[str] = None, m: Optional[int] = None) -> List[str]:
    name = forced()
    if name is not None:
        return [name]
    order = list(_ORDER.get(device_type, ["reference"]))
    if device_type == "cuda" and not any("cuda" in t.values() for t in gpu_prefs().values()):
        # CUDA kernels join the automatic order only once bench/gpu_check.py has checked them
        # against the reference on a GPU and measured them (gpu_prefs.json); until then
        # KQUANT_BACKEND=cuda runs them on request
        order.remove("cuda")
    if device_type == "cuda" and op is not None and m is not None:
        first = _preferred_gpu(op, m)
        if first in order:
            order.remove(first)
            order.insert(0, first)
    return order


def select(op: str, device_type: str, *args) -> Tuple[str, List[str]]:
    """Name of the backend that runs ``op``, and the reasons the others were passed over."""
    skipped = []
    m = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 else None
    for name in candidates(device_type, op, m):
        ok, why = status(name)
        if ok:
            ok, why = _module(name).can_run(op, *args)
        if ok:
            return name, skipped
        skipped.append(f"{name}: {why}")
    if forced():
        raise BackendError(f"{ENV}={forced()} cannot run kquant.{op} on {device_type}: {skipped[-1]}")
    raise BackendError(f"no backend can run kquant.{op} on {device_type}: {'; '.join(skipped)}")


def route(op: str, device_type: str, *args):
    """``(fn, True)``: the function select() picks for these arguments, which a caller may
    reuse; ``(None, False)`` when it may not.

    Reusable (for any dtype and M, while ``KQUANT_BACKEND`` and the device stay the same)
    when the candidate order cannot depend on M (it can on CUDA, through gpu_prefs) and
    every backend consulted, the chosen one and those passed over, sets ``ROUTE_STABLE``:
    its ``available``/``can_run`` answers depend only on the op, device type and layout.
    """
    if forced() is None and device_type == "cuda":
        return None, False  # known without a second select (it costs tens of us per call)
    name, skipped = select(op, device_type, *args)
    consulted = candidates(device_type)[:len(skipped) + 1]
    if all(getattr(_module(n), "ROUTE_STABLE", False) for n in consulted if _module(n) is not None):
        return _module(name).OPS[op], True
    return None, False


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def dispatch(op: str, *args):
    name, _ = select(op, _device_type(args), *args)
    return _module(name).OPS[op](*args)


def prepare_weight(qweight: torch.Tensor, bits: int, group_size: int, op: str) -> Tuple[torch.Tensor, int]:
    """Ask the preferred backend for ``qweight``'s device to derive its layout once.

    Returns ``(data, layout_id)``; the canonical tensor itself when no backend wants
    another layout. Callers drop the canonical tensor afterwards (never both resident).
    """
    for name in candidates(qweight.device.type):
        ok, _ = status(name)
        mod = _module(name) if ok else None
        if mod is not None and hasattr(mod, "prepare_weight"):
            out = mod.prepare_weight(qweight, bits, group_size, op)
            if out is not None:
                return out
        if ok:
            break
    return qweight, CANONICAL


class _CallableModule(type(os)):
    """Lets ``kquant.backends()`` list the backends while ``kquant.backends`` stays this module."""

    def __call__(self) -> Dict[str, Dict[str, object]]:
        return backends()


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
