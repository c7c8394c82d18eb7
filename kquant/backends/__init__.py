"""The router: which backend runs a layer or an op.

Candidates per device type, in order of preference: CPU tensors ``cpu`` then
``reference``; CUDA tensors ``cuda`` and ``triton`` (in the order bench/gpu_check.py
measured faster for the op and M, ``gpu_prefs.json``) then ``reference``.
``KQUANT_BACKEND=reference|cpu|triton|cuda`` forces one; a forced backend that cannot run
raises :class:`BackendError`, it never falls back silently.

A ``QuantLinear`` asks :func:`prepare_linear` once (again after a device move, a load or a
new ``KQUANT_BACKEND``) and keeps the :class:`~kquant.backends.base.PreparedLinear`; the
public ops, which see arbitrary tensors, ask :func:`run_linear` / :func:`run_op` per call.
The backend contract is :class:`~kquant.backends.base.Backend`.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from typing import Dict, Hashable, List, Optional, Tuple

from torch import Tensor

from ..format import CANONICAL
from ..spec import LinearSpec
from .base import Backend, PreparedLinear

ENV = "KQUANT_BACKEND"
PREFS_ENV = "KQUANT_GPU_PREFS"  # another gpu_prefs.json (e.g. one measured on your GPU)
_MODULES = {
    "reference": "kquant.backends.reference",
    "cpu": "kquant.backends.cpu",
    "triton": "kquant.backends.triton",
    "cuda": "kquant.backends.cuda",
}
_ORDER = {"cpu": ["cpu", "reference"], "cuda": ["cuda", "triton", "reference"]}


class BackendError(RuntimeError):
    """A forced backend cannot run a call, or no backend can."""


# ----------------------------------------------------------------------------- backends
_loaded: Dict[str, Backend] = {}
_load_errors: Dict[str, str] = {}
_status: Dict[Tuple[str, Hashable], Tuple[bool, str]] = {}  # the one availability cache


def get(name: str) -> Optional[Backend]:
    """The backend object ``name`` (imported on first use); None if its module fails to import."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(_MODULES)}")
    if name not in _loaded and name not in _load_errors:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except Exception as e:  # a missing toolchain or library must not break the package
            _load_errors[name] = f"import failed: {type(e).__name__}: {e}"
    return _loaded.get(name)


def status(name: str) -> Tuple[bool, str]:
    """Whether backend ``name`` is usable in this process, and why (not)."""
    backend = get(name)
    if backend is None:
        return False, _load_errors[name]
    key = (name, backend.availability_key())
    if key not in _status:
        try:
            _status[key] = backend.available()
        except Exception as e:  # a broken driver or toolchain: unavailable, with the reason
            _status[key] = False, f"its availability check raised {type(e).__name__}: {e}"
    return _status[key]


def backends() -> Dict[str, Dict[str, object]]:
    """What is available and why not: {name: {"available": bool, "reason": str}}."""
    out = {}
    for name in _MODULES:
        ok, why = status(name)
        try:
            detail = get(name).detail() if ok else ""
        except Exception as e:  # e.g. an unknown KQUANT_CPU_ISA value
            detail = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        out[name] = {"available": ok, "reason": f"{why}; {detail}" if detail else why}
    return out


def forced() -> Optional[str]:
    name = os.environ.get(ENV, "").strip().lower() or None
    if name is not None and name not in _MODULES:
        raise ValueError(f"{ENV}={name!r} is not a backend; choose from {sorted(_MODULES)}")
    return name


# ----------------------------------------------------------------------------- order
_prefs: Dict[str, Dict[str, Dict[str, str]]] = {}


def gpu_prefs() -> Dict[str, Dict[str, str]]:
    """{op: {M: backend}}: which of cuda/triton bench/gpu_check.py measured faster, per M."""
    path = os.environ.get(PREFS_ENV) or os.path.join(os.path.dirname(__file__), "gpu_prefs.json")
    if path not in _prefs:
        try:
            with open(path) as f:
                _prefs[path] = json.load(f).get("prefs", {})
        except (OSError, ValueError):
            _prefs[path] = {}
    return _prefs[path]


def _preferred_gpu(op: str, m: int) -> Optional[str]:
    table = gpu_prefs().get(op)
    if not table:
        return None
    # the measured M closest to this call's M (on a log scale)
    best = min(table, key=lambda k: abs(math.log2(max(int(k), 1)) - math.log2(max(m, 1))))
    return table[best]


def order(device_type: str, op: Optional[str] = None, m: Optional[int] = None) -> List[str]:
    """Candidate backend names for a device type, in order of preference (op and M decide
    between cuda and triton); ``[name]`` when ``KQUANT_BACKEND`` forces one."""
    name = forced()
    if name is not None:
        return [name]
    names = list(_ORDER.get(device_type, ["reference"]))
    if device_type == "cuda" and not any("cuda" in t.values() for t in gpu_prefs().values()):
        # CUDA kernels join the automatic order only once bench/gpu_check.py has checked them
        # against the reference on a GPU and measured them (gpu_prefs.json); until then
        # KQUANT_BACKEND=cuda runs them on request
        names.remove("cuda")
    if device_type == "cuda" and op is not None and m is not None:
        names = _measured_first(names, op, m)
    return names


def _measured_first(items: list, op: str, m: int, name=lambda item: item) -> list:
    """``items`` with the backend bench/gpu_check.py measured faster for ``op`` at this M first
    (gpu_prefs.json); ``name(item)`` is an item's backend name."""
    first = _preferred_gpu(op, m)
    return sorted(items, key=lambda item: name(item) != first)


# ----------------------------------------------------------------------------- linear layers
def _candidates(spec: LinearSpec, layout: Optional[int]):
    """(backends that can run ``spec`` reading ``layout`` (None: any; the first decides),
    reasons the others were passed over). Stops after the first backend with no per-call
    limits: nothing after it would ever run."""
    chosen, skipped = [], []
    for name in order(spec.device.type):
        ok, why = status(name)
        backend = get(name) if ok else None
        if ok:
            ok, why = backend.can_implement(spec)
        if ok and layout is not None and not backend.reads(layout):
            ok, why = False, f"does not read weight layout {layout}"
        if not ok:
            skipped.append(f"{name}: {why}")
            continue
        chosen.append(backend)
        if not backend.per_call_checks:
            break
    return chosen, skipped


def _no_backend(op: str, device_type: str, skipped: List[str]) -> BackendError:
    where = f"kquant.{op} on {device_type}"
    if forced():
        return BackendError(f"{ENV}={forced()} cannot run {where}: {skipped[-1].split(': ', 1)[-1]}")
    return BackendError(f"no backend can run {where}: {'; '.join(skipped)}")


def prepare_linear(spec: LinearSpec, qweight: Tensor) -> Tuple[Tensor, PreparedLinear]:
    """Choose the backends for a layer and let the first derive its weight layout.

    Returns ``(weight in that layout, prepared kernel)``; the caller drops the canonical
    tensor (never both resident). When no backend can run the layer, the weight stays
    canonical and calling the kernel raises the reason.
    """
    env = os.environ.get(ENV)
    chosen, skipped = _candidates(spec, None)
    if not chosen:
        return qweight, PreparedLinear(spec, CANONICAL, [], env, error=_no_backend(spec.op, spec.device.type, skipped))
    data, layout = chosen[0].prepare(spec, qweight)
    chosen = [b for b in chosen if b.reads(layout)]
    reorder = None
    if spec.device.type == "cuda" and not forced():
        def reorder(choices, m):
            return _measured_first(choices, spec.op, m, lambda choice: choice[0].name)
    return data, PreparedLinear(spec, layout, [(b, b.kernel(spec, layout)) for b in chosen], env, order=reorder)


def run_linear(spec: LinearSpec, layout: int, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
               bias: Optional[Tensor], act_scale: Optional[Tensor]) -> Tensor:
    """One call whose tensors arrive as they are (public ops, the compiled QuantLinear)."""
    chosen, skipped = _candidates(spec, layout)
    if spec.device.type == "cuda" and not forced():
        chosen = _measured_first(chosen, spec.op, x.shape[0], lambda backend: backend.name)
    for backend in chosen:
        if backend.per_call_checks:
            ok, why = backend.can_run(spec, x)
            if not ok:
                skipped.append(f"{backend.name}: {why}")
                continue
        return backend.linear(spec, x, qweight, layout, scales, zeros, bias, act_scale)
    raise _no_backend(spec.op, spec.device.type, skipped)


def choose(spec: LinearSpec) -> str:
    """The backend a layer with ``spec`` gets (for reports), or ``none (reason)``."""
    try:
        chosen, skipped = _candidates(spec, None)
    except ValueError as e:  # a bad KQUANT_BACKEND value
        return f"none ({e})"
    return chosen[0].name if chosen else f"none ({_no_backend(spec.op, spec.device.type, skipped)})"


# ----------------------------------------------------------------------------- other ops
def _op_backend(op: str, *args) -> Tuple[Optional[Backend], List[str]]:
    """The first backend that can run quantize_per_token(x) or int8_mm(a, b) on these
    tensors, and the reasons the others were passed over."""
    skipped = []
    for name in order(args[0].device.type, op, args[0].shape[0] if args[0].dim() == 2 else None):
        ok, why = status(name)
        if ok:
            ok, why = get(name).can_run_op(op, *args)
        if ok:
            return get(name), skipped
        skipped.append(f"{name}: {why}")
    return None, skipped


def run_op(op: str, *args):
    """quantize_per_token(x) or int8_mm(a, b) on the first backend that can run it."""
    backend, skipped = _op_backend(op, *args)
    if backend is None:
        raise _no_backend(op, args[0].device.type, skipped)
    return getattr(backend, op)(*args)


def choose_op(op: str, *args) -> str:
    """The backend run_op would use for these tensors (for reports), or ``none (reason)``."""
    try:
        backend, skipped = _op_backend(op, *args)
    except ValueError as e:  # a bad KQUANT_BACKEND value
        return f"none ({e})"
    return backend.name if backend else f"none ({_no_backend(op, args[0].device.type, skipped)})"


class _CallableModule(type(os)):
    """Lets ``kquant.backends()`` list the backends while ``kquant.backends`` stays this module."""

    def __call__(self) -> Dict[str, Dict[str, object]]:
        return backends()


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Backend", "BackendError", "PreparedLinear", "backends", "choose", "forced", "get", "gpu_prefs", "order",
           "prepare_linear", "run_linear", "run_op", "choose_op", "status", "ENV", "PREFS_ENV"]
