"""Layer sensitivity for :func:`kquant.auto_quantize`: the model's output error when one layer
alone is quantized with a candidate config (and a calibration method), every other layer in
float. See :mod:`kquant.auto` for how the work is shared.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..config import QuantConfig
from ..format import quantize_weight
from ..nn import QuantLinear, is_conv1d, linear_weight, set_module
from .equalize import search_scale
from .gptq import gptq, weighted_qparams
from .methods import GPTQ
from .observers import weight_qparams
from .sequential import (CalibrationError, Calibrator, _first_tensor, _Stop, _with_hidden, capture_block_inputs,
                         find_blocks)


# ----------------------------------------------------------------------------- outputs and errors
def _float_tensor(out) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput: its fields in order, None left out
        items = out.to_tuple()
    else:
        items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((t for t in map(_float_tensor, items) if t is not None), None)


def _output_tensor(out) -> torch.Tensor:
    """The first floating-point tensor of a model's output."""
    t = _float_tensor(out)
    if t is None:
        raise TypeError(f"auto_quantize: the model's output ({type(out).__name__}) holds no floating-point tensor "
                        f"to measure the error on")
    return t


class Runner:
    """The model on the calibration batches: float reference, the cheapest way to re-run it
    after one layer changed, and the error against the reference."""

    def __init__(self, model: nn.Module, batches: list, names: List[str], error_fn, run_model: Callable):
        self.model, self.batches, self.error_fn, self.run_model = model, batches, error_fn, run_model
        self.masks = [Calibrator._mask(b) for b in batches]
        _, self.blocks = find_blocks(model, names)
        self.block_of = {t: j for t in names for j, (b, _) in enumerate(self.blocks) if t.startswith(b + ".")}
        same = []  # per batch: is the output the last block's output tensor itself?
        phase = {"now": 0}  # 0: before the blocks, 1: among them, 2: after the last one
        seen: Dict[str, set] = {t: set() for t in names if t not in self.block_of}
        hooks = []
        if self.blocks:
            def last(mod, args, out):
                phase["now"] = 2
                try:
                    self._last = _first_tensor(out)
                except CalibrationError:
                    self._last = None
            hooks.append(self.blocks[0][1].register_forward_pre_hook(lambda *a: phase.update(now=1)))
            hooks.append(self.blocks[-1][1].register_forward_hook(last))
            mods = dict(model.named_modules())
            for t in seen:
                hooks.append(mods[t].register_forward_pre_hook(
                    lambda *a, t=t: seen[t].add(phase["now"])))
        self.ref = []
        try:
            for i in range(len(batches)):
                self._last, phase["now"] = None, 0
                y = _output_tensor(self._call(i))
                t = self._last
                same.append(t is not None and (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) == (
                    y.data_ptr(), y.shape, y.stride(), y.dtype, y.device))
                self.ref.append(self._rows(y, i))
        finally:
            for h in hooks:
                h.remove()
        # layers that run only after the blocks: re-run from the last block, the model after it replayed
        self.post = {t for t, ph in seen.items() if ph == {2}}
        self.block_of.update({t: len(self.blocks) - 1 for t in self.post})
        self.den = sum(float((r.double() ** 2).sum()) for r in self.ref)
        if error_fn is None and not self.den > 0:
            raise ValueError("auto_quantize: the model's output on calib_data is all zero; a relative error "
                             "cannot be measured (pass error_fn=)")
        self.rows = sum(r.shape[0] for r in self.ref)
        self.mode, self.j, self.inputs, self.extra = "full", 0, None, None
        if self.blocks:
            self._try_blocks(all(same))

    # ------------------------------------------------------------------ running
    def _call(self, i: int):
        try:
            return self.run_model(self.model, self.batches[i])
        except (_Stop, CalibrationError):
            raise
        except Exception as e:
            raise ValueError(f"calib_data batch {i}: the model fails on it ({type(e).__name__}: {e})") from None

    def _rows(self, y: torch.Tensor, i: int) -> torch.Tensor:
        y = y.detach()
        m = self.masks[i]
        if m is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(m.shape):
            return y[m.to(y.device)].float()
        return y.float().reshape(-1, y.shape[-1] if y.dim() else 1)

    def _try_blocks(self, identity: bool) -> None:
        """Use the captured block inputs if running blocks from them (and the model after them)
        reproduces the float outputs; otherwise every evaluation runs the whole model."""
        try:
            self.inputs, self.extra = capture_block_inputs([b for _, b in self.blocks], self._call, len(self.batches))
        except CalibrationError:
            return
        for mode in (("identity", "replay") if identity else ("replay",)):
            self.mode = mode
            try:
                y = self._rows(self._tail(self._chain(0, 0, self.inputs[0]), 0), 0)
                if y.shape == self.ref[0].shape and float((y - self.ref[0]).norm()) <= 1e-5 * float(
                        self.ref[0].norm()) + 1e-12:
                    return
            except Exception:  # noqa: BLE001 - any failure means: run the whole model
                pass
        self.mode, self.inputs, self.extra = "full", None, None

    def _block(self, k: int, i: int, h: torch.Tensor):
        args, kwargs = _with_hidden(*self.extra[k][i], h)
        return self.blocks[k][1](*args, **kwargs)

    def _chain(self, j: int, i: int, h: torch.Tensor):
        out = None
        for k in range(j, len(self.blocks)):
            out = self._block(k, i, h)
            h = _first_tensor(out)
        return out

    def _tail(self, last_out, i: int) -> torch.Tensor:
        if self.mode == "identity":
            return _first_tensor(last_out)
        saved = [(b, b.__dict__.get("forward")) for _, b in self.blocks]
        for b, _ in saved:  # the model runs, every block answering the last block's output
            b.forward = lambda *a, **k: last_out
        try:
            return _output_tensor(self._call(i))
        finally:
            for b, f in saved:
                if f is None:
                    del b.forward
                else:
                    b.forward = f

    def advance(self, j: int) -> None:
        """Hold block ``j``'s float inputs (blocks run in order)."""
        while self.j < j:
            self.inputs = [_first_tensor(self._block(self.j, i, h)) for i, h in enumerate(self.inputs)]
            self.j += 1

    def block(self, name: str) -> Optional[int]:
        return None if self.mode == "full" else self.block_of.get(name)

    def run_to(self, name: str) -> Callable[[int], object]:
        """Batch i through the model or the layer's block (hooks stop it at the layer)."""
        j = self.block(name)
        if j is None or name in self.post:
            return self._call
        self.advance(j)
        return lambda i: self._block(j, i, self.inputs[i])

    def outputs(self, name: Optional[str] = None):
        j = None if name is None else self.block(name)
        for i in range(len(self.batches)):
            if j is None:
                y = _output_tensor(self._call(i))
            else:
                self.advance(j)
                y = self._tail(self._chain(j, i, self.inputs[i]), i)
            yield self._rows(y, i)

    def error(self, name: Optional[str] = None) -> float:
        """The error of the model as it is now (only ``name`` changed since the float run)."""
        with torch.no_grad():
            if self.error_fn is not None:
                ys = list(self.outputs(name))
                return float(self.error_fn(torch.cat(ys), torch.cat(self.ref)))
            num = 0.0
            for y, r in zip(self.outputs(name), self.ref):
                num += float(((y.double() - r.double()) ** 2).sum())
            return num / self.den


# ----------------------------------------------------------------------------- one layer, one candidate
class _Layer:
    """One layer: its float statistics, collected once, and its candidates applied in turn."""

    def __init__(self, runner: Runner, name: str, mod: nn.Module, configs: List[QuantConfig], equalize,
                 weight_method):
        self.runner, self.name, self.mod = runner, name, mod
        self.equalize, self.weight_method = equalize, weight_method
        self.cal = Calibrator(runner.model, [], runner.batches, equalize, weight_method, False, runner.run_model)
        self.cal.masks = runner.masks
        self.stats = None
        self.ran = True
        if equalize is not None or isinstance(weight_method, GPTQ):
            int8 = [c for c in configs if c.int8_activations]
            rep = dataclasses.replace(int8[0], activations="dynamic") if int8 else configs[0]
            self.stats = self._collect(rep, stats=equalize is not None)
            self.ran = self.stats is not None

    def _collect(self, cfg: QuantConfig, stats: bool, transform=None):
        self.cal.targets = {self.name: (self.mod, cfg)}
        return self.cal._collect([self.name], self.runner.run_to(self.name), stats=stats, transform=transform)

    def quantize(self, cfg: QuantConfig):
        """(dequantized weight [out, in] or None, QuantLinear or None): the layer quantized alone."""
        w = linear_weight(self.mod, self.name).detach().float().clone()
        st, held = self.stats, None
        h = None if st is None else st["h"]
        if self.equalize is not None:
            rows = None if st["rows"] is None else st["rows"].to(w.device)
            s, alpha, _ = search_scale(self.equalize, rows, h, st["mean"], st["max"], [w], [cfg])
            if alpha is not None:
                held, w = s, w * s
                if h is not None:
                    h = h / (s.unsqueeze(0) * s.unsqueeze(1))
        act = None
        if cfg.activations == "static":
            seen = self._collect(cfg, False, None if held is None else 1.0 / held)
            if seen is None:
                return None, None
            act = seen["obs"].qparams(8, True)[0].reshape(1)
        wm = self.weight_method
        if isinstance(wm, GPTQ):
            wq, scales, zeros = gptq(w, h, cfg.weight_bits, cfg.group_size, cfg.symmetric, damp=wm.damp,
                                     block_size=wm.block_size, act_order=wm.act_order, clip=wm.clip)
            qp = (scales, zeros)
        elif h is not None and cfg.weight_observer == "minmax":
            wq, qp = w, weighted_qparams(w, torch.diagonal(h), cfg.weight_bits, cfg.group_size, cfg.symmetric)
        else:
            wq, qp = w, (None if cfg.weight_observer == "minmax" else
                         weight_qparams(w, cfg.weight_bits, cfg.group_size, cfg.symmetric, cfg.weight_observer))
        inv = None if held is None else (1.0 / held)
        if not cfg.int8_activations and linear_weight(self.mod).dtype == torch.float32:
            scales, zeros = qp if qp is not None else (None, None)
            deq = quantize_weight(wq, cfg.weight_bits, cfg.group_size, cfg.symmetric, scales, zeros,
                                  name=self.name).dequantize()
            return (deq if inv is None else deq * inv), None
        return None, QuantLinear.from_linear(self.mod, cfg, name=self.name, weight_qparams=qp, act_scale=act,
                                             weight=wq, input_scale=inv)

    def error(self, cfg: QuantConfig) -> float:
        if not self.ran:  # never reached by calib_data: quantizing it changes nothing measured
            return 0.0
        deq, q = self.quantize(cfg)
        if deq is None and q is None:
            return 0.0
        if q is not None:
            set_module(self.runner.model, self.name, q)
            try:
                return self.runner.error(self.name)
            finally:
                set_module(self.runner.model, self.name, self.mod)
        # a new Parameter, not new data: a weight tied to another module (an embedding) stays as it is
        orig = self.mod.weight
        self.mod.weight = nn.Parameter((deq.t() if is_conv1d(self.mod) else deq).contiguous().to(orig.device),
                                       requires_grad=False)
        try:
            return self.runner.error(self.name)
        finally:
            self.mod.weight = orig



def sensitivities(runner: Runner, targets, cands, equalize, weight_method, progress: bool
                   ) -> Dict[str, Dict[str, float]]:
    """layer -> {candidate name: output error with only that layer quantized}."""
    from tqdm.auto import tqdm

    measured = {c: cfg for c, cfg in cands.items() if cfg is not None}
    # layers outside the blocks first (whole-model runs), then block by block, in order
    order = sorted(range(len(targets)), key=lambda i: (runner.block(targets[i][0]) is not None,
                                                       runner.block(targets[i][0]) or 0, i))
    out: Dict[str, Dict[str, float]] = {}
    bar = tqdm(total=len(targets) * len(measured), desc="kquant: sensitivity", disable=None if progress else True)
    try:
        for i in order:
            name, mod, _ = targets[i]
            layer = _Layer(runner, name, mod, list(measured.values()), equalize, weight_method)
            out[name] = {}
            for cname, cfg in measured.items():
                bar.set_postfix_str(f"{name} {cname}")
                try:
                    err = layer.error(cfg)
                except (ValueError, TypeError) as e:
                    msg = str(e) if str(e).startswith(name) else f"{name}: {e}"
                    raise type(e)(f"auto_quantize: candidate {cname!r}: {msg}") from None
                if not math.isfinite(err):
                    raise ValueError(f"auto_quantize: layer {name} in {cname!r} gives a non-finite output error "
                                     f"({err}); check the model's outputs on calib_data")
                out[name][cname] = err
                bar.update(1)
    finally:
        bar.close()
    return out
