"""The backend contract, and the kernel a QuantLinear prepares once.

A backend is a :class:`Backend` subclass instance (``BACKEND`` in its module). The router
asks, in order of preference:

* ``available()`` -- once per process (the router's one cache; ``availability_key`` names
  the environment the answer depends on, e.g. ``TRITON_INTERPRET``);
* ``can_implement(spec)`` -- when a layer is prepared: everything known per layer (bits,
  group size, symmetry, activations, shapes, device), never the input;
* ``can_run(spec, x)`` -- per call, only for backends with ``per_call_checks`` (limits on M,
  alignment, dtype). Everything else was decided when the layer was prepared.

Arguments reach a backend validated (:mod:`kquant.spec`); backends do not check them again.
``x`` arrives 2-D ``[M, Kp]``, padded to the packed width and contiguous.
"""
from __future__ import annotations

from typing import Callable, Hashable, List, Optional, Sequence, Tuple

from torch import Tensor

from ..format import CANONICAL
from ..spec import LinearSpec

Reason = Tuple[bool, str]
# kernel(x, qweight, scales, zeros, bias, act_scale) -> y, for one prepared layer
LinearKernel = Callable[..., Tensor]


class Backend:
    """Base class of every backend; the defaults describe a canonical-layout backend."""

    name: str = ""
    per_call_checks: bool = False

    # -------------------------------------------------------------- availability
    def available(self) -> Reason:
        return True, ""

    def availability_key(self) -> Hashable:
        """What the availability answer depends on besides the process (cache key)."""
        return None

    def detail(self) -> str:
        """Live detail for reports (e.g. the CPU level running now); not cached."""
        return ""

    # -------------------------------------------------------------- linear layers
    def can_implement(self, spec: LinearSpec) -> Reason:
        raise NotImplementedError

    def can_run(self, spec: LinearSpec, x: Tensor) -> Reason:
        """Per-call limits (asked only when ``per_call_checks``)."""
        return True, ""

    def reads(self, layout: int) -> bool:
        """Whether the kernels read weights in ``layout``."""
        return layout == CANONICAL

    def prepare(self, spec: LinearSpec, qweight: Tensor) -> Tuple[Tensor, int]:
        """Derive the kernel's weight layout from the canonical one, once per layer."""
        return qweight, CANONICAL

    def linear(self, spec: LinearSpec, x: Tensor, qweight: Tensor, layout: int, scales: Tensor,
               zeros: Optional[Tensor], bias: Optional[Tensor], act_scale: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def kernel(self, spec: LinearSpec, layout: int) -> LinearKernel:
        """A function of (x, qweight, scales, zeros, bias, act_scale) for one prepared layer;
        backends override it to bind what is fixed per layer and save work per call."""
        return lambda x, q, s, z, b, a: self.linear(spec, x, q, layout, s, z, b, a)

    # -------------------------------------------------------------- other ops
    def can_run_op(self, op: str, *args) -> Reason:
        """quantize_per_token(x) / int8_mm(a, b), asked per call."""
        raise NotImplementedError

    def quantize_per_token(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def int8_mm(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


class PreparedLinear:
    """A layer's kernel choice, made once: the layout its weight is stored in and the
    backends (in order) that read it. It holds no tensors, so reassigned buffers are used
    as they are; it is made again after a device move, a load or a new ``KQUANT_BACKEND``.
    """

    __slots__ = ("spec", "layout", "names", "env", "error", "_call")

    def __init__(self, spec: LinearSpec, layout: int, choices: Sequence[Tuple[Backend, LinearKernel]],
                 env: Optional[str], error: Optional[Exception] = None, order: Optional[Callable] = None):
        self.spec = spec
        self.layout = layout
        self.names: List[str] = [b.name for b, _ in choices]
        self.env = env
        self.error = error
        if error is not None:
            self._call = self._raise
        elif len(choices) == 1 and not choices[0][0].per_call_checks:
            self._call = choices[0][1]  # the common case: one backend, nothing to check per call
        else:
            self._call = _PerCall(spec, list(choices), order)

    @property
    def backend(self) -> str:
        if self.error is not None:
            return f"none ({self.error})"
        return "|".join(self.names)

    def __call__(self, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                 bias: Optional[Tensor], act_scale: Optional[Tensor]) -> Tensor:
        return self._call(x, qweight, scales, zeros, bias, act_scale)

    def _raise(self, *args):
        raise self.error


class _PerCall:
    """Several candidates (GPU): the first, in the order for this M, whose per-call checks pass."""

    def __init__(self, spec, choices, order):
        self.spec, self.choices, self.order = spec, choices, order

    def __call__(self, x, *tensors):
        choices = self.order(self.choices, x.shape[0]) if self.order is not None else self.choices
        skipped = []
        for backend, fn in choices:
            if backend.per_call_checks:
                ok, why = backend.can_run(self.spec, x)
                if not ok:
                    skipped.append(f"{backend.name}: {why}")
                    continue
            return fn(x, *tensors)
        from . import BackendError
        raise BackendError(f"no prepared backend can run this call of kquant.{self.spec.op} "
                           f"(M={x.shape[0]}): {'; '.join(skipped)}")
