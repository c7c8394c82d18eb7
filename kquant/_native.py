"""Loads the native extensions; the package keeps working (reference backend) without them."""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

_errors: Dict[str, str] = {}
_mods: Dict[str, object] = {}


def load(name: str, warn: bool = True) -> Optional[object]:
    """Import ``kquant.<name>`` once; on failure remember why (and warn once)."""
    if name in _mods:
        return _mods[name]
    if name in _errors:
        return None
    try:
        import torch  # noqa: F401  (the extension links against torch)
        mod = importlib.import_module(f"kquant.{name}")
    except Exception as e:  # noqa: BLE001
        _errors[name] = f"{type(e).__name__}: {e}"
        if warn:
            warnings.warn(f"kquant: native extension kquant.{name} is not available ({_errors[name]}); "
                          "using slower backends. Rebuild with `pip install --no-build-isolation -e .`.",
                          RuntimeWarning, stacklevel=3)
        return None
    _mods[name] = mod
    return mod


def error(name: str) -> str:
    return _errors.get(name, "")
