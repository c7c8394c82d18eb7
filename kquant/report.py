"""Error estimation: how far a quantized model is from its float original, layer by layer.

    fp = copy.deepcopy(model)
    kquant.quantize_(model, "w4a16")
    report = kquant.error_report(fp, model, batch)
    print(report)                 # aligned table
    report.to_json("err.json")

Per quantized layer: mode, bits, group size, packed weight bytes vs float bytes, weight
SQNR (float weight vs ``dequantize_weight()``), and output SQNR / relative error of the
layer's output in the quantized model against the same layer's output in the float model
(so it includes error propagated from earlier layers). The model row compares the final
outputs (a tensor, or ``last_hidden_state``).

SQNR = 10 * log10(sum(ref^2) / sum((q - ref)^2)) dB; an exact match is +inf. In JSON every
non-finite number is written as ``null``: a null SQNR with a finite relative error means
+inf (exact match); a null relative error (zero reference, non-zero error) means +inf
relative error and -inf SQNR. :meth:`ErrorReport.from_dict` restores them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .api import run_model
from .format import PER_CHANNEL
from .nn import QuantLinear

__all__ = ["error_report", "ErrorReport", "LayerError", "sqnr_db"]


def _stats_to_metrics(signal: float, noise: float):
    """(sqnr_db, rel_error) from sum(ref^2) and sum(err^2)."""
    if noise == 0.0:
        return math.inf, 0.0
    if signal == 0.0:
        return -math.inf, math.inf
    return 10.0 * math.log10(signal / noise), math.sqrt(noise / signal)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64 sums); +inf for an exact match."""
    ref64, approx64 = ref.detach().double(), approx.detach().double()
    return _stats_to_metrics(float((ref64 ** 2).sum()), float(((approx64 - ref64) ** 2).sum()))[0]


@dataclasses.dataclass
class LayerError:
    name: str
    mode: str
    bits: int
    group_size: int
    symmetric: bool
    activations: str
    weight_bytes: int
    fp_bytes: int
    weight_sqnr_db: float
    output_sqnr_db: Optional[float]
    rel_error: Optional[float]
    calls: int = 0  # how many forward calls of this layer were compared

    @property
    def compression(self) -> float:
        return self.fp_bytes / self.weight_bytes if self.weight_bytes else math.inf


@dataclasses.dataclass
class ErrorReport:
    layers: List[LayerError]
    model_output_sqnr_db: Optional[float] = None  # None: outputs not comparable (not a tensor)
    model_rel_error: Optional[float] = None
    num_batches: int = 0

    # ------------------------------------------------------------------ summary
    @property
    def weight_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.layers)

    @property
    def fp_bytes(self) -> int:
        return sum(r.fp_bytes for r in self.layers)

    def summary(self) -> Dict[str, Any]:
        outs = [r.output_sqnr_db for r in self.layers if r.output_sqnr_db is not None]
        worst = min(self.layers, key=lambda r: (r.output_sqnr_db if r.output_sqnr_db is not None else math.inf),
                    default=None)
        return {
            "layers": len(self.layers),
            "batches": self.num_batches,
            "weight_bytes": self.weight_bytes,
            "fp_bytes": self.fp_bytes,
            "compression": self.fp_bytes / self.weight_bytes if self.weight_bytes else math.inf,
            "min_weight_sqnr_db": min((r.weight_sqnr_db for r in self.layers), default=None),
            "min_output_sqnr_db": min(outs, default=None),
            "worst_layer": worst.name if worst is not None else None,
            "model_output_sqnr_db": self.model_output_sqnr_db,
            "model_rel_error": self.model_rel_error,
        }

    def __getitem__(self, name: str) -> LayerError:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in this report; layers: {[r.name for r in self.layers]}")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict; non-finite floats become None (see module docstring)."""
        return _finite({"layers": [dataclasses.asdict(r) for r in self.layers], "summary": self.summary()})

    def to_json(self, path: Union[str, os.PathLike, None] = None, indent: int = 2) -> str:
        """JSON text (strict: no NaN/Infinity tokens); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ErrorReport":
        layers = []
        for r in d["layers"]:
            r = dict(r)
            r["weight_sqnr_db"] = _restore_sqnr(r["weight_sqnr_db"], 0.0)
            if r.get("output_sqnr_db") is None and r.get("rel_error") is None and r.get("calls", 0) == 0:
                pass  # layer never ran: nothing to restore
            else:
                r["output_sqnr_db"] = _restore_sqnr(r["output_sqnr_db"], r["rel_error"])
                r["rel_error"] = math.inf if r["rel_error"] is None else r["rel_error"]
            layers.append(LayerError(**r))
        s = d.get("summary", {})
        msqnr, mrel = s.get("model_output_sqnr_db"), s.get("model_rel_error")
        if msqnr is not None or mrel is not None:
            msqnr, mrel = _restore_sqnr(msqnr, mrel), (math.inf if mrel is None else mrel)
        return cls(layers, msqnr, mrel, s.get("batches", 0))

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]) -> "ErrorReport":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ display
    COLUMNS = ("layer", "mode", "bits", "group", "weight bytes", "fp bytes", "weight SQNR dB",
               "out SQNR dB", "rel err")

    def rows(self) -> List[List[str]]:
        out = []
        for r in self.layers:
            group = "channel" if r.group_size == PER_CHANNEL else str(r.group_size)
            mode = r.mode + ("" if r.symmetric else " asym") + (" static" if r.activations == "static" else "")
            out.append([r.name, mode, str(r.bits), group, f"{r.weight_bytes:,}", f"{r.fp_bytes:,}", _fmt_db(r.weight_sqnr_db),
                        _fmt_db(r.output_sqnr_db), _fmt_rel(r.rel_error)])
        s = self.summary()
        out.append(["(model)", "", "", "", f"{s['weight_bytes']:,}", f"{s['fp_bytes']:,}",
                    _fmt_db(s["min_weight_sqnr_db"]) + (" min" if self.layers else ""),
                    _fmt_db(self.model_output_sqnr_db), _fmt_rel(self.model_rel_error)])
        return out

    def __str__(self) -> str:
        rows = [list(self.COLUMNS)] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS))]
        # text columns left-aligned, numbers right-aligned
        def fmt(r):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows[1:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
        s = self.summary()
        lines.append(f"{s['layers']} quantized layers, {s['batches']} batches, weights {s['compression']:.2f}x "
                     f"smaller; worst layer output: {s['worst_layer']} ({_fmt_db(s['min_output_sqnr_db'])} dB)")
        return "\n".join(lines)

    def rich_table(self, title: str = "kquant error report"):
        """A ``rich.table.Table`` of the same rows."""
        from rich.table import Table
        t = Table(title=title)
        for i, c in enumerate(self.COLUMNS):
            t.add_column(c, justify="left" if i < 2 else "right")
        rows = self.rows()
        for i, r in enumerate(rows):
            t.add_row(*r, end_section=(i == len(rows) - 2))
        return t

    def __rich__(self):
        return self.rich_table()


def _fmt_db(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.2f}"


def _fmt_rel(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.2e}"


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _restore_sqnr(sqnr: Optional[float], rel: Optional[float]) -> float:
    if sqnr is not None:
        return sqnr
    return -math.inf if rel is None else math.inf


# ----------------------------------------------------------------------------- collection
class _Acc:
    __slots__ = ("signal", "noise", "calls")

    def __init__(self):
        self.signal = self.noise = 0.0
        self.calls = 0

    def add(self, ref: torch.Tensor, out: torch.Tensor, where: str) -> None:
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise ValueError(f"{where}: outputs are not tensors ({type(ref).__name__}, {type(out).__name__})")
        if ref.shape != out.shape:
            raise ValueError(f"{where}: float output {list(ref.shape)} and quantized output "
                             f"{list(out.shape)} differ in shape")
        r, o = ref.detach().double(), out.detach().double()
        self.signal += float((r * r).sum())
        self.noise += float(((o - r) ** 2).sum())
        self.calls += 1


def _final_tensor(out) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    lhs = getattr(out, "last_hidden_state", None)
    if lhs is None and isinstance(out, dict):
        lhs = out.get("last_hidden_state")
    return lhs if isinstance(lhs, torch.Tensor) else None


def _batches(inputs) -> List[Any]:
    # one batch: a tensor, a mapping (kwargs) or a tuple (positional args); anything else
    # iterable (list, DataLoader, generator) is a sequence of batches
    if isinstance(inputs, (torch.Tensor, tuple)) or hasattr(inputs, "keys"):
        return [inputs]
    try:
        return iter(inputs)
    except TypeError:
        raise TypeError(f"inputs must be a batch (tensor, tuple, dict) or an iterable of batches, "
                        f"got {type(inputs).__name__}") from None


def _match_layers(fp_model: nn.Module, q_model: nn.Module) -> Dict[str, tuple]:
    if not isinstance(fp_model, nn.Module) or not isinstance(q_model, nn.Module):
        raise TypeError(f"fp_model and q_model must be nn.Modules, got {type(fp_model).__name__} and "
                        f"{type(q_model).__name__}")
    if fp_model is q_model:
        raise ValueError("fp_model and q_model are the same object; kquant.quantize_ converts in place, "
                         "so keep a float copy first (copy.deepcopy(model))")
    qlayers = [(n, m) for n, m in q_model.named_modules() if isinstance(m, QuantLinear)]
    if not qlayers:
        raise ValueError("q_model holds no kquant.QuantLinear layer (was it quantized with kquant.quantize_?)")
    fp_mods = dict(fp_model.named_modules())
    pairs = {}
    for name, q in qlayers:
        shown = name or "(root)"
        if name not in fp_mods:
            raise ValueError(f"layer {shown!r}: quantized in q_model but fp_model has no module of that name")
        f = fp_mods[name]
        if isinstance(f, QuantLinear):
            raise ValueError(f"layer {shown!r}: fp_model's layer is already a QuantLinear; pass the float model "
                             f"(quantize_ converts in place: deepcopy before quantizing)")
        if not isinstance(f, nn.Linear):
            raise ValueError(f"layer {shown!r}: fp_model has a {type(f).__name__} there, expected nn.Linear")
        if (f.in_features, f.out_features) != (q.in_features, q.out_features):
            raise ValueError(f"layer {shown!r}: fp Linear is [{f.out_features}, {f.in_features}] but the "
                             f"QuantLinear is [{q.out_features}, {q.in_features}]")
        if (f.bias is None) != (q.bias is None):
            raise ValueError(f"layer {shown!r}: bias present in only one of the two models")
        pairs[name] = (f, q)
    return pairs


@torch.no_grad()
def error_report(fp_model: nn.Module, q_model: nn.Module, inputs) -> ErrorReport:
    """Compare ``q_model`` against its float original ``fp_model`` on ``inputs``.

    Layers are matched by module name: every ``QuantLinear`` of ``q_model`` must be an
    ``nn.Linear`` of the same shape in ``fp_model``. ``inputs`` is one batch (a tensor, a
    tuple of positional args, a dict of keyword args) or an iterable of batches (a list is
    taken as a list of batches). Both models run in eval mode (restored afterwards).
    """
    pairs = _match_layers(fp_model, q_model)
    accs = {name: _Acc() for name in pairs}
    model_acc = _Acc()
    model_comparable = True
    captured: Dict[str, List[torch.Tensor]] = {}

    def fp_hook(name):
        def hook(mod, args, out):
            captured.setdefault(name, []).append(out.detach())
        return hook

    def q_hook(name):
        def hook(mod, args, out):
            refs = captured.get(name)
            if not refs:
                raise ValueError(f"layer {name!r}: ran more often in q_model than in fp_model "
                                 f"(the two models do not follow the same path)")
            accs[name].add(refs.pop(0), out, f"layer {name!r}")
        return hook

    hooks = []
    modes = [(m, m.training) for m in (fp_model, q_model)]
    n = 0
    try:
        for name, (f, q) in pairs.items():
            hooks.append(f.register_forward_hook(fp_hook(name)))
            hooks.append(q.register_forward_hook(q_hook(name)))
        fp_model.eval()
        q_model.eval()
        for batch in _batches(inputs):
            captured.clear()
            ref = run_model(fp_model, batch)
            out = run_model(q_model, batch)
            left = [k for k, v in captured.items() if v]
            if left:
                raise ValueError(f"layer {left[0]!r}: ran in fp_model but not (as often) in q_model")
            rt, ot = _final_tensor(ref), _final_tensor(out)
            if rt is None or ot is None:
                model_comparable = False
            else:
                model_acc.add(rt, ot, "model output")
            n += 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.train(training)
        captured.clear()
    if n == 0:
        raise ValueError("inputs holds no batch")

    rows = []
    for name, (f, q) in pairs.items():
        wq = q.dequantize_weight(torch.float32)
        if q.folded_scale is not None:  # equalization folded upstream: back to the float model's basis
            wq = wq * q.folded_scale
        w_sqnr = sqnr_db(f.weight.float(), wq)
        acc = accs[name]
        o_sqnr, rel = _stats_to_metrics(acc.signal, acc.noise) if acc.calls else (None, None)
        rows.append(LayerError(
            name=name, mode=q.mode, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
            activations=q.activations, weight_bytes=q.weight_nbytes,
            fp_bytes=f.weight.numel() * f.weight.element_size(), weight_sqnr_db=w_sqnr,
            output_sqnr_db=o_sqnr, rel_error=rel, calls=acc.calls))
    m_sqnr = m_rel = None
    if model_comparable and model_acc.calls:
        m_sqnr, m_rel = _stats_to_metrics(model_acc.signal, model_acc.noise)
    return ErrorReport(rows, m_sqnr, m_rel, n)
