"""kquant: integer quantization for PyTorch.

    import kquant
    kquant.quantize_(model, "w8a8")          # every nn.Linear -> QuantLinear
"""
from . import _native
from . import ops  # noqa: F401  (registers torch.ops.kquant.*)

# load the C++ kernels now, so a failed build or load is reported (a warning naming why)
# at import; everything keeps working on the reference backend
_native.load("_C")
from .api import quantize_
from .auto import AutoPlan, Budget, auto_quantize
from . import backends
from .backends import BackendError
from .report import error_report
from .checkpoint import load_quantized, save_quantized
from .config import PRESETS, QuantConfig
from .format import FORMAT_VERSION, PackedWeight, quantize_weight
from .nn import QuantLinear
from .qat import FakeQuantLinear, convert, prepare_qat
from .recover import RecoveryResult, recover

__version__ = "0.1.0"
__all__ = [
    "quantize_", "auto_quantize", "AutoPlan", "Budget", "QuantConfig", "PRESETS", "QuantLinear", "PackedWeight",
    "quantize_weight",
    "prepare_qat", "convert", "FakeQuantLinear", "recover", "RecoveryResult", "save_quantized", "load_quantized", "error_report", "backends", "BackendError", "FORMAT_VERSION",
]
