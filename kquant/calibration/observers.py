"""Observers: turn observed tensors into quantization ranges and (scale, zero) pairs.

Pure PyTorch, device-agnostic (everything stays on the observed tensor's device).

Granularity, for an observed tensor ``x`` (last dim = K):

* ``per_tensor``  one range; ``range()`` gives 0-d tensors.
* ``per_channel`` one range per index of dim ``ch_axis`` (default 0, the output channel
  of a ``[N, K]`` weight; use ``ch_axis=-1`` for activation input channels); shape ``[C]``.
* ``per_group``   the last dim is split into groups of ``group_size`` (zero-padded up to a
  multiple of it, like :func:`kquant.format.quantize_weight`), every leading index kept;
  shape ``[*x.shape[:-1], G]``. Meant for weights or other fixed-shape tensors.
* ``per_token``   one range per row of the last dim; shape ``[*x.shape[:-1], 1]`` so the
  scale broadcasts against ``x``. Only the last batch is kept (tokens differ per batch).

The first three accumulate across ``observe`` calls (the channel/row count must not change).
Internally every granularity becomes a 2-D ``[slices, values]`` view; each observer reduces
the values of a slice to ``(lo, hi)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..format import (PER_CHANNEL, check_bits, check_group_size, group_view, padded_k, qparams_from_range,
                      qrange)

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
OBSERVERS = ("minmax", "percentile", "mse", "moving_average")

# default clip ratios searched by the MSE observer; 1.0 (plain min-max) is always included
DEFAULT_RATIOS = tuple(round(0.5 + 0.025 * i, 4) for i in range(21))
# percentile / mse observers keep a uniform random sample of at most this many values
DEFAULT_MAX_SAMPLES = 1 << 18


# ----------------------------------------------------------------------------- shared math
def slice_minmax(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[S, n] -> per-slice (min, max), each [S]."""
    if v.shape[1] == 0:
        z = torch.zeros(v.shape[0], device=v.device)
        return z, z.clone()
    return v.amin(dim=1), v.amax(dim=1)


def slice_quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Per-slice quantile of [S, n] (linear interpolation between order statistics).

    ``torch.quantile`` refuses large inputs; a sort of the (already sampled) values is
    fast and exact for what it sees.
    """
    n = v.shape[1]
    if n == 0:
        return torch.zeros(v.shape[0], device=v.device)
    s = torch.sort(v, dim=1).values
    pos = q * (n - 1)
    i0 = int(math.floor(pos))
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    return s[:, i0] + (s[:, i1] - s[:, i0]) * frac


def fake_quant_error(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-slice sum of squared error of quantizing [S, n] with the range [lo, hi] ([S]),
    each of the n positions weighted by ``weight [n]`` when given.

    Uses exactly the arithmetic of :func:`kquant.format.quantize_weight` +
    ``PackedWeight.dequantize`` (divide by the scale, round half to even, clamp), so the
    error it reports is the reconstruction error those produce.
    """
    scale, zero = qparams_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    s = scale.unsqueeze(-1)
    q = torch.round(v / s)
    if zero is None:
        deq = torch.clamp(q, qmin, qmax) * s
    else:
        z = zero.unsqueeze(-1)
        deq = (torch.clamp(q + z, qmin, qmax) - z) * s
    err = (deq - v) ** 2
    return (err if weight is None else err * weight).sum(dim=1)


def mse_search(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
               ratios: Sequence[float] = DEFAULT_RATIOS, weight: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per slice, the clipped range ``r * [lo, hi]`` (r in ``ratios``) with the least error
    (weighted per position by ``weight [n]``, e.g. a Hessian diagonal, when given).

    The full range (r = 1) is the starting point and a smaller ratio must beat it by a
    relative margin, so the result is never worse than min-max, even after float
    summation-order noise.
    """
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = fake_quant_error(v, lo, hi, bits, symmetric, weight)
    for r in sorted(set(float(r) for r in ratios), reverse=True):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"clip ratios must be in (0, 1], got {r}")
        if r == 1.0:
            continue
        err = fake_quant_error(v, lo * r, hi * r, bits, symmetric, weight)
        better = err < best_err * (1.0 - 1e-6)
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * r, best_lo)
        best_hi = torch.where(better, hi * r, best_hi)
    return best_lo, best_hi


# ----------------------------------------------------------------------------- observers
class Observer:
    """Base class: collects statistics of observed tensors and answers ``range()``/``qparams()``.

    Subclasses implement ``_update(v, fresh)`` on the 2-D ``[slices, values]`` view and
    ``_range(bits, symmetric)`` returning ``(lo, hi)`` of shape ``[slices]``.
    """

    name = "observer"

    def __init__(self, granularity: str = "per_tensor", *, ch_axis: int = 0, group_size: int = 128):
        if granularity not in GRANULARITIES:
            raise ValueError(f"unsupported granularity {granularity!r}; supported: {list(GRANULARITIES)}")
        if granularity == "per_group" and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive int for per_group, got {group_size!r}")
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.group_size = group_size
        self._out_shape: Optional[Tuple[int, ...]] = None
        self._slices: Optional[int] = None
        self.num_batches = 0

    # -- public
    def has_data(self) -> bool:
        return self.num_batches > 0

    def reset(self) -> None:
        self._out_shape = None
        self._slices = None
        self.num_batches = 0
        self._reset()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``; returns ``x`` unchanged so it can sit inside a forward."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{self.name} observer: x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.numel() == 0:
            return x  # nothing to learn from an empty batch
        v, out_shape = self._slices_of(x.detach().float())
        # min/max propagate NaN and Inf: a cheap finiteness check without a full bool mask
        if not (torch.isfinite(v.amin()) & torch.isfinite(v.amax())):
            raise ValueError(f"{self.name} observer: observed tensor {list(x.shape)} holds NaN or Inf")
        fresh = self.granularity == "per_token" or self._slices is None
        if not fresh and v.shape[0] != self._slices:
            raise ValueError(f"{self.name} observer ({self.granularity}): tensor {list(x.shape)} gives "
                             f"{v.shape[0]} slices but earlier batches gave {self._slices}; "
                             f"{self.granularity} ranges need the same channel/row count every batch")
        if fresh:
            self._reset()
            self.num_batches = 0
        self._slices, self._out_shape = v.shape[0], out_shape
        self._update(v, fresh)
        self.num_batches += 1
        return x

    forward = observe
    __call__ = observe

    def range(self, bits: Optional[int] = None, symmetric: Optional[bool] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` shaped per the granularity (see module docstring)."""
        if not self.has_data():
            raise ValueError(f"{self.name} observer: no data observed yet")
        lo, hi = self._range(bits, symmetric)
        return lo.reshape(self._out_shape), hi.reshape(self._out_shape)

    def qparams(self, bits: int = 8, symmetric: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(scale, zero | None)`` covering ``range()``; scales are never 0 or NaN."""
        lo, hi = self.range(bits, symmetric)
        return qparams_from_range(lo, hi, bits, symmetric)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(granularity={self.granularity!r}, batches={self.num_batches})"

    # -- internals
    def _slices_of(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        g = self.granularity
        if g == "per_tensor":
            return x.reshape(1, -1), ()
        if x.dim() == 0:
            raise ValueError(f"{self.name} observer: {g} needs a tensor with at least one dim")
        if g == "per_channel":
            axis = self.ch_axis
            if not -x.dim() <= axis < x.dim():
                raise ValueError(f"{self.name} observer: ch_axis={axis} out of range for tensor {list(x.shape)}")
            c = x.shape[axis]
            return x.movedim(axis, 0).reshape(c, -1), (c,)
        k = x.shape[-1]
        lead = tuple(x.shape[:-1])
        if g == "per_token":
            return x.reshape(-1, k), lead + (1,)
        gs = self.group_size
        kp = -(-k // gs) * gs
        xp = torch.nn.functional.pad(x.reshape(-1, k), (0, kp - k))
        return xp.reshape(-1, gs), lead + (kp // gs,)

    def _reset(self) -> None:
        raise NotImplementedError

    def _update(self, v: torch.Tensor, fresh: bool) -> None:
        raise NotImplementedError

    def _range(self, bits, symmetric) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything observed."""

    name = "minmax"

    def __init__(self, granularity: str = "per_tensor", **kw):
        super().__init__(granularity, **kw)
        self._reset()

    def _reset(self):
        self.lo = self.hi = None

    def _update(self, v, fresh):
        lo, hi = slice_minmax(v)
        if fresh or self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _range(self, bits, symmetric):
        return self.lo, self.hi


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max:
    ``lo <- (1 - c) * lo + c * batch_lo`` (the first batch sets the range)."""

    name = "moving_average"

    def __init__(self, granularity: str = "per_tensor", *, averaging_constant: float = 0.01, **kw):
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)
        super().__init__(granularity, **kw)

    def _update(self, v, fresh):
        lo, hi = slice_minmax(v)
        if fresh or self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo = self.lo + c * (lo - self.lo)
            self.hi = self.hi + c * (hi - self.hi)


class _SamplingObserver(MinMaxObserver):
    """Keeps exact running min/max plus a uniform random sample of the observed values
    (per slice, at most ``max_samples`` values in all): every value gets a random key and
    the largest keys are kept (reservoir sampling), so across batches every observed value
    is equally likely to be in the sample."""

    def __init__(self, granularity: str = "per_tensor", *, max_samples: int = DEFAULT_MAX_SAMPLES,
                 seed: int = 0, **kw):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = int(max_samples)
        self.seed = seed
        self._gen: Optional[torch.Generator] = None
        self._gen_device: Optional[torch.device] = None
        super().__init__(granularity, **kw)

    def _reset(self):
        super()._reset()
        self.sample = None
        self._keys = None

    def _rand(self, shape, device) -> torch.Tensor:
        if self._gen is None or self._gen_device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
            self._gen_device = device
        return torch.rand(shape, generator=self._gen, device=device, dtype=torch.float64)

    def _cpu_gen(self) -> torch.Generator:
        if getattr(self, "_cpu", None) is None:
            self._cpu = torch.Generator()
            self._cpu.manual_seed(self.seed + 1)
        return self._cpu

    def _update(self, v, fresh):
        super()._update(v, fresh)
        if fresh:
            self.sample = self._keys = None
        s, n = v.shape
        cap = max(self.max_samples // max(s, 1), 64)
        if n > cap:
            # keep a random subset of cap values and give them the cap largest of n iid
            # U(0,1) keys (order statistics, in log space: log U_(n-j) = sum_i<=j log(V_i)/(n-i)),
            # exactly what a key per value would have kept, without drawing n keys
            if n <= 4 * cap:
                idx = torch.randperm(n, generator=self._cpu_gen())[:cap].to(v.device)
            else:  # with replacement: cheap, and still an unbiased sample
                idx = (self._rand((cap,), v.device) * n).long().clamp_(max=n - 1)
            v = v[:, idx]
            steps = n - torch.arange(cap, device=v.device, dtype=torch.float64)
            keys = torch.cumsum(torch.log(self._rand(v.shape, v.device).clamp_(min=1e-300)) / steps,
                                dim=1)
        else:
            keys = torch.log(self._rand(v.shape, v.device).clamp_(min=1e-300))
        if self.sample is not None:
            v = torch.cat([self.sample, v], dim=1)
            keys = torch.cat([self._keys, keys], dim=1)
        if v.shape[1] > cap:
            top = torch.topk(keys, cap, dim=1).indices
            v, keys = torch.gather(v, 1, top), torch.gather(keys, 1, top)
        self.sample, self._keys = v, keys


class PercentileObserver(_SamplingObserver):
    """Range = the ``percentile`` / ``100 - percentile`` quantiles of the observed values
    (on the reservoir sample), so rare outliers are clipped."""

    name = "percentile"

    def __init__(self, granularity: str = "per_tensor", *, percentile: float = 99.99, **kw):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)
        super().__init__(granularity, **kw)

    def _range(self, bits, symmetric):
        return percentile_range(self.sample, self.percentile)


class MSEObserver(_SamplingObserver):
    """Range = min-max range scaled by the clip ratio (searched in ``ratios``) that minimizes
    the quantization MSE of the observed values for the requested bits. ``range()`` without
    arguments uses the ``bits``/``symmetric`` given at construction (default 8, symmetric)."""

    name = "mse"

    def __init__(self, granularity: str = "per_tensor", *, ratios: Sequence[float] = DEFAULT_RATIOS,
                 bits: int = 8, symmetric: bool = True, **kw):
        self.ratios = tuple(ratios)
        if not self.ratios:
            raise ValueError("ratios must not be empty")
        self.bits, self.symmetric = bits, symmetric
        super().__init__(granularity, **kw)

    def _range(self, bits, symmetric):
        bits = self.bits if bits is None else bits
        symmetric = self.symmetric if symmetric is None else symmetric
        return mse_search(self.sample, self.lo, self.hi, bits, symmetric, self.ratios)


def percentile_range(v: torch.Tensor, percentile: float) -> Tuple[torch.Tensor, torch.Tensor]:
    p = percentile / 100.0
    return slice_quantile(v, 1.0 - p), slice_quantile(v, p)


_CLASSES = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver,
            "moving_average": MovingAverageObserver}


def make_observer(name: str, granularity: str = "per_tensor", **kw) -> Observer:
    """An observer by name: ``minmax``, ``percentile``, ``mse`` or ``moving_average``.

    Keyword arguments: ``ch_axis`` (per_channel), ``group_size`` (per_group),
    ``percentile`` (default 99.99), ``averaging_constant`` (default 0.01), ``ratios``,
    ``bits`` and ``symmetric`` (mse), ``max_samples`` and ``seed`` (percentile, mse).
    """
    try:
        cls = _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown observer {name!r}; supported: {list(OBSERVERS)}") from None
    try:
        return cls(granularity, **kw)
    except TypeError as e:
        raise TypeError(f"observer {name!r}: {e}") from None


# ----------------------------------------------------------------------------- weights
WEIGHT_METHODS = ("minmax", "percentile", "mse")


@torch.no_grad()
def weight_qparams(w: torch.Tensor, bits: int, group_size: int = PER_CHANNEL, symmetric: bool = True,
                   method: str = "minmax", *, percentile: float = 99.9,
                   ratios: Sequence[float] = DEFAULT_RATIOS, name: str = "weight"
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(scales [N, G], zeros [N, G] | None)`` for weight ``w [N, K]``, ready to pass as
    ``scales``/``zeros`` to :func:`kquant.format.quantize_weight` (same K padding and groups).

    method: ``minmax`` (what quantize_weight does by default), ``percentile`` (per-group
    quantiles) or ``mse`` (clip ratio per group minimizing the reconstruction error; never
    worse than minmax).
    """
    where = f"{name}: "
    check_bits(bits, where)
    check_group_size(group_size, where)
    if method not in WEIGHT_METHODS:
        raise ValueError(f"{where}unsupported weight method {method!r}; supported: {list(WEIGHT_METHODS)}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"{where}weight must be a 2-D floating-point tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{where}weight {list(w.shape)} holds NaN or Inf")
    n, k = w.shape
    kp = padded_k(k, bits, group_size)
    wg = group_view(torch.nn.functional.pad(w.detach().float(), (0, kp - k)), group_size)
    v = wg.reshape(-1, wg.shape[-1])
    if method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"{where}percentile must be in (50, 100], got {percentile}")
        lo, hi = percentile_range(v, percentile)
    else:
        lo, hi = slice_minmax(v)
        if method == "mse":
            lo, hi = mse_search(v, lo, hi, bits, symmetric, ratios)
    scale, zero = qparams_from_range(lo, hi, bits, symmetric)
    shape = wg.shape[:2]
    return scale.reshape(shape), None if zero is None else zero.reshape(shape)
