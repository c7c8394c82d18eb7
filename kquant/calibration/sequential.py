"""Sequential calibration: layers quantized in the order the model runs them, each one
seeing inputs that come from the already-quantized layers before it.

The model is cut into segments: its repeated blocks (the ``nn.ModuleList`` holding most of
the layers, e.g. a transformer's layers) or, without one, the whole model; plus the layers
before the first block and after the last. Only one block's inputs are kept at a time.
Inside a segment, layers that read the same input tensor form a group (a transformer's
q/k/v); for each group in turn one pass over the calibration inputs, stopped at the group,
accumulates the Hessian ``sum(x^T x)``, per-channel ``mean|x|``/``max|x|`` and a sample of
rows; then the equalization method (if any) chooses and folds or holds its scale, the weight
method quantizes, and the group's ``QuantLinear`` layers are swapped in before the next group
runs. Padding tokens (``attention_mask == 0`` in a dict batch) are left out of the statistics.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import QuantConfig
from ..nn import QuantLinear, linear_weight, set_module
from .equalize import foldable, restore, scale_input, scale_output, search_scale
from .gptq import gptq, weighted_qparams
from .methods import GPTQ, describe
from .observers import make_observer, weight_qparams


class _Stop(Exception):
    """Ends a forward pass once the wanted inputs are captured."""


class CalibrationError(ValueError):
    pass


def _hidden(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise CalibrationError("calibration: a block was called without a positional input or hidden_states=")


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise CalibrationError(f"calibration: cannot find the hidden state in a block's output ({type(out).__name__})")


def find_blocks(model: nn.Module, names: Sequence[str]) -> Tuple[str, List[Tuple[str, nn.Module]]]:
    """(list name, [(block name, block)]) of the ModuleList holding most target layers."""
    best, best_n = None, 0
    for lname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            # blocks hold layers (a list of the layers themselves is no list of blocks)
            n = sum(1 for t in names if t.startswith(lname + ".") and "." in t[len(lname) + 1:])
            if n > best_n:
                best, best_n = lname, n
    if best is None:
        return "", []
    lst = model.get_submodule(best)
    return best, [(f"{best}.{i}", b) for i, b in enumerate(lst)]


def _try_stop(fn):
    try:
        with torch.no_grad():
            fn()
    except _Stop:
        pass


def capture_block_inputs(blocks: Sequence[nn.Module], run_batch: Callable[[int], object], n: int):
    """Run batches ``0..n-1`` (``run_batch(i)``) up to the last block: block 0's hidden input
    per batch, and every block's other arguments (masks, ...) per batch."""
    inputs, extra = [], [[] for _ in blocks]

    def hook(j):
        def f(mod, args, kwargs):
            h = _hidden(args, kwargs)
            if j == 0:
                inputs.append(h.detach())
            extra[j].append(_with_hidden(args, kwargs, None))
            if j == len(blocks) - 1:
                raise _Stop
        return f

    hs = [b.register_forward_pre_hook(hook(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        for i in range(n):
            _try_stop(lambda: run_batch(i))
    finally:
        for h in hs:
            h.remove()
    if any(len(e) != len(inputs) for e in extra) or len(inputs) != n:
        raise CalibrationError("the model's blocks did not all run once per batch")
    return inputs, extra


class Calibrator:
    """Runs one model's sequential calibration; see the module docstring."""

    def __init__(self, model, targets: Sequence[Tuple[str, nn.Module, QuantConfig]], batches: list,
                 equalize, weight_method, progress: bool, run_model: Callable):
        self.model, self.batches, self.run_model = model, batches, run_model
        self.equalize, self.weight_method = equalize, weight_method
        self.targets = {name: (mod, cfg) for name, mod, cfg in targets}
        self.progress = progress
        self.undo: List[Callable[[], None]] = []
        self.masks = [self._mask(b) for b in batches]
        self.summary: Dict[str, dict] = {}
        self.method_name = describe(equalize, weight_method)
        self.float_targets = bool(getattr(weight_method, "float_targets", False))

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _mask(batch) -> Optional[torch.Tensor]:
        m = batch.get("attention_mask") if isinstance(batch, dict) or hasattr(batch, "keys") else None
        return m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    def _rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        m = self.masks[i]
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def _call_model(self, i: int):
        try:
            return self.run_model(self.model, self.batches[i])
        except (_Stop, CalibrationError):
            raise
        except Exception as e:
            raise CalibrationError(f"calib_data batch {i}: the model fails on it ({type(e).__name__}: {e}); "
                                   f"calib_data must hold inputs the model accepts (a dict of keyword arguments, "
                                   f"a tuple of positional arguments or one tensor per batch)") from None

    # ------------------------------------------------------------------ segments
    def run(self) -> Dict[str, dict]:
        from tqdm.auto import tqdm
        names = list(self.targets)
        _, blocks = find_blocks(self.model, names)
        block_of = {}
        for bname, _ in blocks:
            for t in names:
                if t.startswith(bname + "."):
                    block_of[t] = bname
        outside = [t for t in names if t not in block_of]
        self.bar = tqdm(total=len(names), desc=f"kquant: calibrating ({self.method_name})", unit="layer",
                        disable=None if self.progress else True)
        try:
            if not blocks:
                ref = copy.deepcopy(self.model) if self.float_targets else None
                self._segment(names, lambda i: self._call_model(i), ref,
                              None if ref is None else (lambda i: self.run_model(ref, self.batches[i])), "")
            else:
                first = blocks[0][1]
                seen: List[str] = []
                # layers before the first block: the model run up to it
                hooks = [self.targets[t][0].register_forward_pre_hook(lambda m, a, t=t: seen.append(t))
                         for t in outside]
                stop = first.register_forward_pre_hook(self._raise_stop)
                try:
                    _try_stop(lambda: self._call_model(0))
                finally:
                    for h in hooks + [stop]:
                        h.remove()
                pre = [t for t in outside if t in seen]
                if pre:
                    self._segment(pre, lambda i: self._stop_at(first, i))
                inputs, extra = capture_block_inputs([b for _, b in blocks], self._call_model, len(self.batches))
                ref_inputs = inputs  # the float model's inputs to the block (float_targets)
                for j, (bname, block) in enumerate(blocks):
                    layers = [t for t in names if block_of.get(t) == bname]
                    args_j = [_with_hidden(*extra[j][i], inputs[i]) for i in range(len(inputs))]
                    ref = copy.deepcopy(block) if self.float_targets and layers else None
                    ref_args = [_with_hidden(*extra[j][i], ref_inputs[i]) for i in range(len(inputs))]
                    if layers:
                        self._segment(layers, lambda i: block(*args_j[i][0], **args_j[i][1]), ref,
                                      None if ref is None else (lambda i: ref(*ref_args[i][0], **ref_args[i][1])),
                                      bname + ".")
                    if j + 1 < len(blocks):
                        with torch.no_grad():
                            inputs = [_first_tensor(block(*a, **k)) for a, k in args_j]
                            if self.float_targets:  # a block without layers to quantize is its own float copy
                                fblock = ref if ref is not None else block
                                ref_inputs = [_first_tensor(fblock(*a, **k)) for a, k in ref_args]
                            else:
                                ref_inputs = inputs
                del inputs, ref_inputs
                post = [t for t in outside if t not in pre]
                if post:
                    self._segment(post, lambda i: self._call_model(i))
        except BaseException:
            self.rollback()
            raise
        finally:
            self.bar.close()
        return self.summary

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()

    @staticmethod
    def _raise_stop(*_a, **_k):
        raise _Stop

    def _stop_at(self, module, i):
        h = module.register_forward_pre_hook(self._raise_stop)
        try:
            self._call_model(i)
        finally:
            h.remove()

    # ------------------------------------------------------------------ one segment
    def _segment(self, layers: List[str], run_one: Callable[[int], object], ref: Optional[nn.Module] = None,
                 ref_run: Optional[Callable[[int], object]] = None, prefix: str = "") -> None:
        """Calibrate ``layers``, run by ``run_one(i)`` on batch i; ``ref`` is a float copy of
        the segment's module (names relative to ``prefix``) run by ``ref_run`` on the float
        model's inputs, whose layer inputs become the targets (float_targets)."""
        groups, producer = self._discover(layers, run_one)
        for group in groups:
            ref_layer = None if ref is None else ref.get_submodule(group[0][len(prefix):])
            self._group(group, producer.get(group[0]), run_one, ref_layer, ref_run)
        for t in layers:  # never reached in calibration: plain round-to-nearest, and say so
            if t not in self.summary:
                warnings.warn(f"quantize_: layer {t} never ran on calib_data; quantized with round-to-nearest",
                              stacklevel=4)
                mod, cfg = self.targets[t]
                self._install(t, mod, cfg, linear_weight(mod, t).detach().float(), None, None, {"method": "rtn"})
                self.bar.update(1)

    def _discover(self, layers, run_one):
        """Groups of layers sharing an input tensor, in run order, and the module (within
        the segment's run) that produced each group's input."""
        order: List[str] = []
        by_input: Dict[int, List[str]] = {}
        inputs: Dict[str, int] = {}
        outputs: Dict[int, nn.Module] = {}
        keep: List[torch.Tensor] = []  # ids stay unique while the tensors live
        hooks = []
        wanted = set(layers)

        def pre(name):
            def f(mod, args):
                if name in inputs:
                    return
                x = args[0]
                keep.append(x)
                inputs[name] = id(x)
                order.append(name)
                by_input.setdefault(id(x), []).append(name)
                if len(order) == len(wanted):
                    raise _Stop
            return f

        def post(mod, args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                outputs.setdefault(id(out), mod)  # innermost module first

        for t in layers:
            hooks.append(self.targets[t][0].register_forward_pre_hook(pre(t)))
        for m in self.model.modules():
            if not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                hooks.append(m.register_forward_hook(post))
        try:
            _try_stop(lambda: run_one(0))
        finally:
            for h in hooks:
                h.remove()
        groups, done = [], set()
        for t in order:
            if t in done:
                continue
            g = by_input[inputs[t]]
            done.update(g)
            groups.append(g)
        producer = {g[0]: outputs.get(inputs[g[0]]) for g in groups}
        keep.clear()
        return groups, producer

    def _collect(self, group: List[str], run_one, stats: bool, transform: Optional[torch.Tensor] = None,
                 ref_layer: Optional[nn.Module] = None, ref_run=None):
        """One pass stopped at the group: Hessian, |x| statistics and sampled rows; with a
        float reference layer also ``cross = sum(x^T x_float)``."""
        mod0 = self.targets[group[0]][0]
        acc = {"h": None, "n": 0, "mean": None, "max": None, "rows": [], "cross": None, "ref": None}
        cfgs = [self.targets[t][1] for t in group]
        static = [t for t, c in zip(group, cfgs) if c.activations == "static"]
        obs = make_observer(cfgs[0].act_observer, "per_tensor") if static else None
        max_rows = getattr(self.equalize, "max_tokens", 0)
        gen = torch.Generator().manual_seed(0)
        cur = {"i": 0}

        def f(mod, args):
            x = self._rows(args[0].detach(), cur["i"]).float()
            if transform is not None:
                x = x * transform
            if x.shape[0]:
                if not torch.isfinite(x).all():
                    raise CalibrationError(f"{group[0]}: calibration input holds NaN or Inf")
                if self.weight_method.name == "gptq" or stats:
                    h = x.T @ x
                    acc["h"] = h if acc["h"] is None else acc["h"].add_(h)
                if acc["ref"] is not None:
                    c = x.T @ acc["ref"]
                    acc["cross"] = c if acc["cross"] is None else acc["cross"].add_(c)
                ax = x.abs()
                s, m = ax.sum(0), ax.amax(0)
                acc["mean"] = s if acc["mean"] is None else acc["mean"] + s
                acc["max"] = m if acc["max"] is None else torch.maximum(acc["max"], m)
                acc["n"] += x.shape[0]
                if stats and max_rows and any(c.int8_activations for c in cfgs):
                    acc["rows"].append(x.cpu())
                    if sum(r.shape[0] for r in acc["rows"]) > 2 * max_rows:
                        allr = torch.cat(acc["rows"])
                        acc["rows"] = [allr[torch.randperm(allr.shape[0], generator=gen)[:max_rows]]]
                if obs is not None:
                    obs.observe(x)
            raise _Stop

        def fref(mod, args):
            acc["ref"] = self._rows(args[0].detach(), cur["i"]).float()
            raise _Stop

        h = mod0.register_forward_pre_hook(f)
        hr = ref_layer.register_forward_pre_hook(fref) if ref_layer is not None else None
        try:
            for i in range(len(self.batches)):
                cur["i"] = i
                if ref_layer is not None:
                    acc["ref"] = None
                    _try_stop(lambda: ref_run(i))
                _try_stop(lambda: run_one(i))
        finally:
            h.remove()
            if hr is not None:
                hr.remove()
        if acc["n"] == 0:
            return None
        rows = None
        if acc["rows"]:
            rows = torch.cat(acc["rows"])
            if rows.shape[0] > max_rows:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        return {"h": acc["h"], "n": acc["n"], "mean": acc["mean"] / acc["n"], "max": acc["max"], "rows": rows,
                "obs": obs, "cross": acc["cross"]}

    def _group(self, group: List[str], producer: Optional[nn.Module], run_one, ref_layer=None, ref_run=None) -> None:
        t0 = time.perf_counter()
        cfgs = [self.targets[t][1] for t in group]
        eq = self.equalize
        if eq is not None and eq.name == "smoothquant" and not any(c.int8_activations for c in cfgs):
            eq = None  # SmoothQuant only moves int8 activation outliers
        st = self._collect(group, run_one, stats=eq is not None, ref_layer=ref_layer, ref_run=ref_run)
        if st is None:
            return  # never ran: _segment quantizes it with RTN
        weights = [linear_weight(self.targets[t][0], t).detach().float().clone() for t in group]
        if st["cross"] is not None:
            weights = float_targets(weights, st["h"], st["cross"], self.weight_method.target_damp)
        s, info = None, {}
        held = None
        if eq is not None:
            rows = None if st["rows"] is None else st["rows"].to(weights[0].device)
            s, alpha, rel = search_scale(eq, rows, st["h"], st["mean"], st["max"], weights, cfgs)
            info = {eq.name: {**eq.to_dict(), "alpha": alpha, "rel_error": rel}}
            if alpha is None:
                s = None  # no scaling beat none
            else:
                if self._fold(group, producer, s, run_one):
                    info[eq.name]["folded_into"] = type(producer).__name__
                else:
                    held = s
                weights = [w * s for w in weights]
        h = st["h"]
        if s is not None and st["obs"] is not None:  # static scales must see the scaled input
            st = self._collect(group, run_one, stats=False, transform=None if held is None else 1.0 / held)
            h = st["h"]
        elif s is not None and h is not None:  # the Hessian of x / s
            h = h / (s.unsqueeze(0) * s.unsqueeze(1))
        wm = self.weight_method
        for t, w, cfg in zip(group, weights, cfgs):
            mod = self.targets[t][0]
            if isinstance(wm, GPTQ):
                wq, scales, zeros = gptq(w, h, cfg.weight_bits, cfg.group_size, cfg.symmetric, damp=wm.damp,
                                         block_size=wm.block_size, act_order=wm.act_order, clip=wm.clip)
                qp = (scales, zeros)
            elif h is not None and cfg.weight_observer == "minmax":
                # round to nearest after equalization: clip each group for the smallest output error
                wq = w
                qp = weighted_qparams(w, torch.diagonal(h), cfg.weight_bits, cfg.group_size, cfg.symmetric)
            else:
                wq = w
                qp = (None if cfg.weight_observer == "minmax" else
                      weight_qparams(w, cfg.weight_bits, cfg.group_size, cfg.symmetric, cfg.weight_observer))
            act = st["obs"].qparams(8, True)[0].reshape(1) if cfg.activations == "static" else None
            record = {"method": self.method_name, **info, "weight": wm.to_dict(), "calib_tokens": st["n"]}
            q = self._install(t, mod, cfg, wq, qp, act, record, held)
            if s is not None and held is None:
                q.folded_scale = (1.0 / s).float()
            self.bar.update(1)
        self.bar.set_postfix_str(f"{group[0]} {time.perf_counter() - t0:.1f}s")

    def _fold(self, group, producer, s, run_one) -> bool:
        """Fold ``1/s`` into ``producer`` and ``s`` into the group's weights if that leaves the
        model's function unchanged (checked on one batch); otherwise leave both as they were."""
        k = s.shape[0]
        if not foldable(producer, k) or isinstance(producer, QuantLinear):
            return False
        before = self._probe(run_one)
        changed = [(producer, scale_output(producer, 1.0 / s))]
        changed += [(self.targets[t][0], scale_input(self.targets[t][0], s)) for t in group]
        after = self._probe(run_one)
        ok = before is not None and after is not None and \
            float((after - before).norm()) <= 1e-4 * float(before.norm()) + 1e-6
        for mod, saved in changed:
            if ok:
                self.undo.append(lambda mod=mod, saved=saved: restore(mod, saved))
            else:
                restore(mod, saved)
        return ok

    def _probe(self, run_one) -> Optional[torch.Tensor]:
        with torch.no_grad():
            try:
                out = run_one(0)
            except _Stop:
                return None
        try:
            return _first_tensor(out).detach().float().clone()
        except CalibrationError:
            return None

    def _install(self, name, mod, cfg, w, qparams, act_scale, record, held=None) -> QuantLinear:
        q = QuantLinear.from_linear(mod, cfg, name=name, weight_qparams=qparams, act_scale=act_scale, weight=w,
                                    input_scale=None if held is None else (1.0 / held))
        q.calibration = record
        set_module(self.model, name, q)
        self.undo.append(lambda: set_module(self.model, name, mod))
        self.summary[name] = record
        return q


def float_targets(weights: List[torch.Tensor], h: torch.Tensor, cross: torch.Tensor, damp: float
                  ) -> List[torch.Tensor]:
    """The weights whose outputs on the quantized model's inputs ``x`` best match the float
    layer's outputs on the float model's inputs ``xf``, regularized toward the float weights:
    ``W + W (xf^T x - x^T x) (x^T x + damping)^-1``, so quantizing them also corrects the
    error upstream layers put into ``x``."""
    lam = max(damp, 1e-6) * torch.diagonal(h).mean().clamp_min(1e-12)
    hd = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    gap = cross.T - h  # xf^T x - x^T x
    return [(w + torch.linalg.solve(hd, (w @ gap).T).T).contiguous() for w in weights]
