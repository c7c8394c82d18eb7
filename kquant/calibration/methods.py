"""Calibration methods chosen with ``kquant.quantize_(model, config, method=...)``.

A method is a name (``"rtn"``, ``"gptq"``, ``"awq"``, ``"smoothquant"``) or one of these
objects, which carry its parameters; a list applies them in order. Equalization methods
(AWQ, SmoothQuant: a per-input-channel scale) come first, then at most one weight method
(RTN or GPTQ; RTN when none is given).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union


class _Method:
    """What every method shares: its record (``to_dict``) and the checks of its integer knobs."""

    name = ""

    def to_dict(self) -> Dict[str, object]:
        return {"method": self.name, **dataclasses.asdict(self)}

    def _check_int(self, field: str, minimum: int) -> None:
        value = getattr(self, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{self.name}: {field} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RTN(_Method):
    """Round to nearest with the config's weight observer (no calibration data needed)."""

    name = "rtn"
    kind = "weight"


@dataclasses.dataclass(frozen=True)
class GPTQ(_Method):
    """GPTQ: columns quantized one by one, each one's rounding error compensated in the
    columns not yet quantized through the inverse Hessian of the layer's inputs.

    damp: fraction of the mean Hessian diagonal added to its diagonal. block_size: columns
    per lazy update. act_order: columns in order of decreasing Hessian diagonal, with group
    scales fixed before the pass (static groups), so the result keeps contiguous groups.
    clip: search each group's clip ratio for the smallest error (as the ``mse`` observer),
    columns weighted by the Hessian diagonal. float_targets: the target of each layer is the
    float model's output of that layer, not the float layer applied to the quantized model's
    inputs, so upstream quantization error is corrected too (keeps a float copy of one block
    and its float inputs beside the quantized ones). target_damp: the damping of that
    correction, as a fraction of the mean Hessian diagonal (it pulls the corrected weights
    toward the float ones, so a few hundred sentences do not over-fit it)."""

    damp: float = 0.1
    block_size: int = 128
    act_order: bool = True
    clip: bool = True
    float_targets: bool = True
    target_damp: float = 1.0
    name = "gptq"
    kind = "weight"

    def __post_init__(self):
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"gptq: damp must be in [0, 1), got {self.damp}")
        if not self.target_damp > 0.0:
            raise ValueError(f"gptq: target_damp must be > 0, got {self.target_damp}")
        self._check_int("block_size", 1)


@dataclasses.dataclass(frozen=True)
class AWQ(_Method):
    """Activation-aware scaling: per input channel ``s = mean|x| ** alpha`` with ``alpha``
    searched on a grid of ``grid`` points in [0, 1] to minimise the layers' output error after
    quantization; the layers sharing an input share the scale. ``max_tokens`` bounds the
    calibration rows kept for the search."""

    grid: int = 20
    max_tokens: int = 1024
    name = "awq"
    kind = "equalize"

    def __post_init__(self):
        self._check_int("grid", 1)
        self._check_int("max_tokens", 16)


@dataclasses.dataclass(frozen=True)
class SmoothQuant(_Method):
    """SmoothQuant for int8 activations: ``s = max|x| ** alpha / max|W| ** (1 - alpha)`` per
    input channel moves activation outliers into the weights. ``alpha``: the migration
    strength, or None to search it (grid of ``grid`` points in [0, 1], smallest output error
    with int8 activations and the layer's weights)."""

    alpha: Optional[float] = None
    grid: int = 10
    max_tokens: int = 1024
    name = "smoothquant"
    kind = "equalize"

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha must be in [0, 1] (or None to search it), got {self.alpha}")
        self._check_int("grid", 1)
        self._check_int("max_tokens", 16)


Method = Union[RTN, GPTQ, AWQ, SmoothQuant]
METHODS = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}


def parse_methods(method: Union[str, Method, Sequence[Union[str, Method]], None]
                  ) -> Tuple[Optional[Method], Method]:
    """``(equalization or None, weight method)`` from what the user passed to quantize_."""
    if method is None:
        method = "rtn"
    if isinstance(method, (str, _Method)):
        items = [method]
    elif isinstance(method, (list, tuple)):
        items = list(method)
    else:
        raise TypeError(f"method must be a name, a kquant.calibration method object or a list of them, "
                        f"got {type(method).__name__}")
    if not items:
        raise ValueError(f"method is an empty list; choose from {list(METHODS)}")
    parsed: List[Method] = []
    for m in items:
        if isinstance(m, str):
            cls = METHODS.get(m.lower())
            if cls is None:
                raise ValueError(f"unknown calibration method {m!r}; methods: {list(METHODS)} "
                                 f"(or a list such as ['awq', 'gptq'])")
            m = cls()
        elif not isinstance(m, _Method):
            raise TypeError(f"method must be a name, a kquant.calibration method object or a list of them, "
                            f"got {type(m).__name__}")
        parsed.append(m)
    eq = [m for m in parsed if m.kind == "equalize"]
    weight = [m for m in parsed if m.kind == "weight"]
    if len(eq) > 1:
        raise ValueError(f"method: at most one equalization method (awq or smoothquant), got "
                         f"{[m.name for m in eq]}")
    if len(weight) > 1:
        raise ValueError(f"method: at most one weight method (rtn or gptq), got {[m.name for m in weight]}")
    if eq and weight and parsed.index(eq[0]) > parsed.index(weight[0]):
        raise ValueError(f"method: {eq[0].name} scales the weights, so it must come before {weight[0].name} "
                         f"(e.g. ['{eq[0].name}', '{weight[0].name}'])")
    return (eq[0] if eq else None), (weight[0] if weight else RTN())


def applicable(method, config) -> bool:
    """Whether ``method`` (anything quantize_ takes) applies to ``config`` (a preset name or
    QuantConfig): SmoothQuant moves int8 activation outliers, so it needs int8 activations."""
    from ..config import resolve
    equalize, _ = parse_methods(method)
    return not isinstance(equalize, SmoothQuant) or resolve(config).int8_activations


def describe(equalize: Optional[Method], weight: Method) -> str:
    """'awq+gptq', 'rtn', ... (how tables name a method list)."""
    return "+".join(m.name for m in (equalize, weight) if m is not None and not (equalize and m.name == "rtn"))
