"""Per-input-channel equalization scales (AWQ, SmoothQuant) and folding them upstream.

For layers sharing an input ``x`` with weights ``W_i``, a scale ``s > 0`` per input channel
rewrites ``x @ W_i.T`` as ``(x / s) @ (W_i * s).T``: the same float function, but the
weights (AWQ) or the activations (SmoothQuant) become easier to quantize. ``x / s`` is
folded into the module that produced ``x`` when that is a LayerNorm/RMSNorm or a float
Linear (see :func:`fold_into`); otherwise the quantized layers hold ``input_scale = 1 / s``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..backends import reference
from ..config import QuantConfig
from ..format import quantize_weight
from ..nn import is_conv1d
from .methods import AWQ, SmoothQuant


def fake_quant_weight(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``w`` through the canonical format with min-max scales (RTN), back to float."""
    return quantize_weight(w, cfg.weight_bits, cfg.group_size, cfg.symmetric).dequantize()


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 activations, as the kernels quantize them, back to float."""
    q, s = reference.quantize_per_token(x)  # the definition every kernel matches bit for bit
    return q.float() * s


def _output_error(x: Optional[torch.Tensor], h: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                  refs: Sequence[Optional[torch.Tensor]], cfgs: Sequence[QuantConfig], s: torch.Tensor) -> float:
    """Summed squared output error of the layers with scale ``s``: on the rows ``x`` when a
    layer quantizes its activations, else through the Hessian ``h = x^T x`` of all the rows
    (``tr(D h D^T)`` with ``D`` the weight error in the original basis)."""
    err = 0.0
    for w, ref, cfg in zip(weights, refs, cfgs):
        wq = fake_quant_weight(w * s, cfg)
        if cfg.int8_activations:
            out = fake_quant_act(x / s) @ wq.T
            err += float(((out - ref) ** 2).sum())
        else:
            d = wq / s - w
            err += float(((d @ h) * d).sum())
    return err


def _normalize(s: torch.Tensor) -> torch.Tensor:
    s = s.clamp_min(1e-5)
    return s / torch.sqrt(s.max() * s.min())


@torch.no_grad()
def search_scale(method, x: Optional[torch.Tensor], h: Optional[torch.Tensor], abs_mean: torch.Tensor,
                 abs_max: torch.Tensor, weights: Sequence[torch.Tensor], cfgs: Sequence[QuantConfig]):
    """``(s [K], alpha, relative error)`` minimising the summed output error of the layers
    (on the calibration rows ``x [T, K]`` for int8-activation layers, through the Hessian
    ``h`` of every calibration row for weight-only ones); ``s = 1`` (no equalization) is
    always a candidate, so the chosen scale is never worse than none on these inputs."""
    refs = [x @ w.T if c.int8_activations else None for w, c in zip(weights, cfgs)]
    signal = sum(float((r ** 2).sum()) if r is not None else float(((w @ h) * w).sum())
                 for r, w in zip(refs, weights)) or 1.0
    ones = torch.ones_like(abs_mean)
    best = (ones, None, _output_error(x, h, weights, refs, cfgs, ones))
    if isinstance(method, AWQ):
        alphas = [i / method.grid for i in range(1, method.grid)]

        def candidate(a: float) -> torch.Tensor:
            return _normalize(abs_mean.clamp_min(1e-5) ** a)
    elif isinstance(method, SmoothQuant):
        w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
        alphas = ([method.alpha] if method.alpha is not None
                  else [i / method.grid for i in range(1, method.grid)])

        def candidate(a: float) -> torch.Tensor:
            return (abs_max.clamp_min(1e-5) ** a / w_max ** (1.0 - a)).clamp_min(1e-5)
    else:
        raise TypeError(f"not an equalization method: {method!r}")
    for a in alphas:
        s = candidate(a)
        if not torch.isfinite(s).all():
            continue
        err = _output_error(x, h, weights, refs, cfgs, s)
        if err < best[2] or getattr(method, "alpha", None) is not None:  # a given alpha is used as is
            best = (s, a, err)
    s, alpha, err = best
    return s, alpha, err / signal


# ----------------------------------------------------------------------------- folding
def is_norm(mod: nn.Module, k: int) -> bool:
    """An elementwise-affine norm over the last dim of size k (LayerNorm, RMSNorm, ...)."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, (nn.Linear,)) or not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != k:
        return False
    return isinstance(mod, nn.LayerNorm) or "norm" in type(mod).__name__.lower()


def foldable(mod: Optional[nn.Module], k: int) -> bool:
    if mod is None:
        return False
    if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
        return mod.out_features == k
    if is_conv1d(mod):
        return mod.weight.shape[1] == k
    return is_norm(mod, k)


def scale_output(mod: nn.Module, factor: torch.Tensor) -> List[torch.Tensor]:
    """Multiply ``mod``'s output channels by ``factor`` in place (``foldable`` modules);
    returns the originals of what changed, for :func:`restore`."""
    saved = [mod.weight.detach().clone()]
    bias = getattr(mod, "bias", None)
    if isinstance(bias, torch.Tensor):
        saved.append(bias.detach().clone())
        bias.data.mul_(factor.to(bias.dtype))
    # nn.Linear's outputs are weight rows; Conv1D's ([in, out]) and a norm's are its last dim
    f = factor.to(mod.weight.dtype)
    mod.weight.data.mul_(f.unsqueeze(1) if isinstance(mod, nn.Linear) else f)
    return saved


def scale_input(linear: nn.Module, s: torch.Tensor) -> List[torch.Tensor]:
    """Multiply a Linear's (or Conv1D's) input channels by ``s`` in place; returns the
    original weight, for :func:`restore`."""
    saved = [linear.weight.detach().clone()]
    f = s.to(linear.weight.dtype)
    linear.weight.data.mul_(f.unsqueeze(1) if is_conv1d(linear) else f)
    return saved


def restore(mod: nn.Module, saved: List[torch.Tensor]) -> None:
    """Undo :func:`scale_output` / :func:`scale_input`."""
    mod.weight.data.copy_(saved[0])
    if len(saved) > 1:
        mod.bias.data.copy_(saved[1])
