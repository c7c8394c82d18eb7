"""QuantConfig and the named presets."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, Mapping, Optional, Union

from .format import PER_CHANNEL, check_bits, check_group_size

ACTIVATIONS = ("dynamic", "static", "none")
WEIGHT_OBSERVERS = ("minmax", "percentile", "mse")
ACT_OBSERVERS = ("minmax", "percentile", "mse", "moving_average")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a Linear layer.

    weight_bits: 8, 4, 3 or 2. group_size: 32, 64, 128 or -1 (per output channel).
    symmetric: symmetric weights (required with int8 activations). Symmetric 2-bit weights
    are ternary: {-1, 0, +1} x scale (the "ternary" preset).
    activations: "dynamic" (per-token int8 at run time), "static" (per-tensor int8
    scale from calibration data) or "none" (weight-only; activations stay float).
    weight_observer: how weight ranges are chosen ("minmax", "percentile", "mse").
    act_observer: how static activation scales are chosen ("minmax", "percentile",
    "mse", "moving_average").
    overrides: module-name pattern (fnmatch) -> QuantConfig, preset name, or None to skip.
    """

    weight_bits: int = 8
    group_size: int = PER_CHANNEL
    symmetric: bool = True
    activations: str = "dynamic"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    overrides: Mapping[str, Union["QuantConfig", str, None]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_bits(self.weight_bits)
        check_group_size(self.group_size)
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"unsupported activations {self.activations!r}; supported: {list(ACTIVATIONS)}")
        if self.weight_observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"unsupported weight_observer {self.weight_observer!r}; "
                             f"supported: {list(WEIGHT_OBSERVERS)}")
        if self.act_observer not in ACT_OBSERVERS:
            raise ValueError(f"unsupported act_observer {self.act_observer!r}; supported: {list(ACT_OBSERVERS)}")
        if self.activations != "none" and not self.symmetric:
            raise ValueError("asymmetric weights are supported only with activations='none' "
                             "(int8 activation GEMMs use symmetric weights)")

    @property
    def int8_activations(self) -> bool:
        return self.activations != "none"

    @property
    def ternary(self) -> bool:
        """Symmetric 2-bit weights: the values {-1, 0, +1} x scale."""
        return self.weight_bits == 2 and self.symmetric

    @property
    def mode(self) -> str:
        return f"w{self.weight_bits}a{8 if self.int8_activations else 16}"

    def for_layer(self, name: str) -> Optional["QuantConfig"]:
        """The config for module ``name``: the last matching override wins; None = skip."""
        chosen: Union[QuantConfig, str, None] = self
        for pattern, cfg in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen = cfg
        if chosen is None:
            return None
        chosen = resolve(chosen)
        return dataclasses.replace(chosen, overrides={}) if chosen.overrides else chosen

    def to_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d.pop("overrides")
        return d


PRESETS: Dict[str, QuantConfig] = {
    "w8a8": QuantConfig(weight_bits=8, group_size=PER_CHANNEL, activations="dynamic"),
    "w8a16": QuantConfig(weight_bits=8, group_size=PER_CHANNEL, activations="none"),
    "w4a16": QuantConfig(weight_bits=4, group_size=128, activations="none"),
    "w4a8": QuantConfig(weight_bits=4, group_size=128, activations="dynamic"),
    # below 4 bits an asymmetric grid keeps every level (symmetric 3-bit has 7, 2-bit only 3)
    "w3a16": QuantConfig(weight_bits=3, group_size=128, symmetric=False, activations="none"),
    "w2a16": QuantConfig(weight_bits=2, group_size=64, symmetric=False, activations="none"),
    "w3a8": QuantConfig(weight_bits=3, group_size=128, activations="dynamic"),
    # ternary weights (BitNet b1.58 style, for QAT-trained models) with int8 activations
    "ternary": QuantConfig(weight_bits=2, group_size=PER_CHANNEL, activations="dynamic"),
}


def resolve(config: Union[QuantConfig, str]) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        try:
            return PRESETS[config.lower()]
        except KeyError:
            raise ValueError(f"unknown preset {config!r}; presets: {sorted(PRESETS)}") from None
    raise TypeError(f"config must be a preset name or a kquant.QuantConfig, got {type(config).__name__}")
