"""Calibration: observers that turn observed tensors into quantization ranges.

    obs = make_observer("percentile", "per_tensor", percentile=99.99)
    for batch in data:
        obs.observe(batch)
    scale, zero = obs.qparams(bits=8, symmetric=True)

    scales, zeros = weight_qparams(linear.weight, bits=4, group_size=128,
                                   symmetric=True, method="mse")

Calibration methods for ``kquant.quantize_(model, config, calib_data=..., method=...)``:
``RTN``, ``GPTQ``, ``AWQ``, ``SmoothQuant`` (names or these objects with their parameters);
:func:`gptq` quantizes one weight matrix given its Hessian.

The math is pure PyTorch and calls no kernel directly; the sequential methods run the model,
whose already-quantized layers run on their kernels.
"""
from .observers import (DEFAULT_RATIOS, GRANULARITIES, OBSERVERS, WEIGHT_METHODS, MinMaxObserver,
                        MovingAverageObserver, MSEObserver, Observer, PercentileObserver,
                        fake_quant_error, make_observer, mse_search, weight_qparams)

from .gptq import gptq
from .methods import AWQ, GPTQ, METHODS, RTN, SmoothQuant

__all__ = [
    "RTN", "GPTQ", "AWQ", "SmoothQuant", "METHODS", "gptq",
    "make_observer", "weight_qparams", "Observer", "MinMaxObserver", "PercentileObserver", "MSEObserver",
    "MovingAverageObserver", "GRANULARITIES", "OBSERVERS", "WEIGHT_METHODS", "DEFAULT_RATIOS",
    "fake_quant_error", "mse_search",
]
