"""GPTQ on one weight matrix, landing in kquant's canonical format (contiguous groups).

    wq, scales, zeros = gptq(w, hessian, bits=4, group_size=128, symmetric=True)
    packed = quantize_weight(wq, 4, 128, True, scales, zeros)   # exactly wq's codes

``hessian`` is ``sum(x^T x)`` over the layer's calibration inputs (any positive multiple
works). Columns are quantized one at a time; each column's rounding error, divided by its
pivot of the Cholesky factor of the inverse Hessian, is subtracted from the columns not yet
quantized (lazily, a block at a time). Without act-order a group's scale is chosen when
its first column comes up, from the weights as updated so far. With act-order, columns go
in order of decreasing Hessian diagonal and every group's scale is fixed before the pass
(static groups), so groups stay contiguous and no kernel needs a column gather.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..format import PER_CHANNEL, padded_k, qparams_from_range, qrange
from .observers import DEFAULT_RATIOS, mse_search, slice_minmax


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool, clip: bool, importance: torch.Tensor
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (and zero) per row of ``w [N, g]``: min-max, or with ``clip`` the clip ratio with
    the smallest squared error, each column weighted by its ``importance [g]`` (the Hessian
    diagonal: how much the layer's output feels that input channel)."""
    lo, hi = slice_minmax(w)
    if clip:
        lo, hi = mse_search(w, lo, hi, bits, symmetric, DEFAULT_RATIOS, importance)
    return qparams_from_range(lo, hi, bits, symmetric)


def weighted_qparams(w: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                     clip: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(scales [N, G], zeros [N, G] | None)`` of ``w [N, K]`` (padded like the format), each
    group's clip chosen for the smallest error weighted by ``importance [K]``."""
    kp = padded_k(w.shape[1], bits, group_size)
    gs = kp if group_size == PER_CHANNEL else group_size
    w = torch.nn.functional.pad(w, (0, kp - w.shape[1]))
    importance = torch.nn.functional.pad(importance, (0, kp - importance.shape[0]))
    parts = [group_qparams(w[:, g:g + gs], bits, symmetric, clip, importance[g:g + gs]) for g in range(0, kp, gs)]
    scales = torch.stack([p[0] for p in parts], dim=1)
    return scales, None if symmetric else torch.stack([p[1] for p in parts], dim=1)


def _quantize_column(w, scale, zero, qmin, qmax):
    """The canonical format's rounding of one column (format.quantize_weight), dequantized."""
    q = torch.round(w / scale)
    if zero is None:
        return torch.clamp(q, qmin, qmax) * scale
    return (torch.clamp(q + zero, qmin, qmax) - zero) * scale


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1; more damping if H is not positive definite."""
    diag_mean = torch.diagonal(h).mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = max(damp, 1e-6) * (10.0 ** attempt) * diag_mean
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("gptq: the Hessian of the calibration inputs is not positive definite even with 10^5 "
                     "times the damping; are the calibration inputs all zero or NaN?")


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = PER_CHANNEL, symmetric: bool = True,
         *, damp: float = 0.01, block_size: int = 128, act_order: bool = True, clip: bool = True
         ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(wq [N, K], scales [N, G], zeros [N, G] | None)``: the GPTQ-quantized weight,
    dequantized (every value on its group's grid) and its quantization parameters."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: Hessian {list(hessian.shape)} does not match weight {list(w.shape)} "
                         f"(needs [{k}, {k}])")
    kp = padded_k(k, bits, group_size)
    gs = kp if group_size == PER_CHANNEL else group_size
    dev = w.device
    W = torch.nn.functional.pad(w.detach().float(), (0, kp - k))
    H = torch.zeros(kp, kp, dtype=torch.float32, device=dev)
    H[:k, :k] = hessian.float()
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, dead] = 1.0  # an input never seen (or padding): no error to compensate through it
    diag = diag.clone()
    qmin, qmax = qrange(bits, symmetric)

    static = act_order or group_size == PER_CHANNEL
    groups = kp // gs
    if static:
        scales, zeros = weighted_qparams(W, diag, bits, group_size, symmetric, clip)
    else:
        scales = torch.empty(n, groups, device=dev)
        zeros = None if symmetric else torch.empty(n, groups, device=dev)
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    col_group = (perm if perm is not None else torch.arange(kp, device=dev)) // gs
    col_group = col_group.tolist()
    U = _inverse_hessian_factor(H, damp)

    # without act-order, blocks hold whole groups, so a group's columns are current at its start
    bs = block_size if static else max(1, block_size // gs) * gs
    Q = torch.empty_like(W)
    threads = torch.get_num_threads()
    for i1 in range(0, kp, bs):
        i2 = min(i1 + bs, kp)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        # the column steps are small: one thread, no barrier per step (a loaded machine
        # can stall a multi-threaded barrier for a whole time slice)
        torch.set_num_threads(1)
        try:
            for i in range(i2 - i1):
                col = i1 + i
                g = col_group[col]
                if not static and col % gs == 0:
                    s, z = group_qparams(W1[:, i:i + gs], bits, symmetric, clip, diag[col:col + gs])
                    scales[:, g] = s
                    if zeros is not None:
                        zeros[:, g] = z
                wcol = W1[:, i]
                q = _quantize_column(wcol, scales[:, g], None if zeros is None else zeros[:, g], qmin, qmax)
                Q[:, col] = q
                err = (wcol - q) / U1[i, i]
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
                E1[:, i] = err
        finally:
            torch.set_num_threads(threads)
        if i2 < kp:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q[:, :k].contiguous(), scales, zeros
