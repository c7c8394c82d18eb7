"""Per-call Python overhead of QuantLinear on CPU at decode size (M = 1).

    python bench/overhead.py [--repeat 9] [--number 500]

For each (K, N) and preset, microseconds per call (best of --repeat timeit runs, under
torch.no_grad()) of:

* module:  ``QuantLinear.__call__`` (nn.Module call, forward's checks, the prepared kernel)
* op body: ``ops.linear(...)`` (the public op's Python body: validation + router + backend, on
  the canonical weight, which the cpu backend blocks on the fly)
* C++ op:  ``torch.ops.kquant._<op>_cpu(...)`` alone, on the module's prepared weight
* fbgemm:  ``torch.ao.quantization.quantize_dynamic`` Linear (w8a8 rows only)

module - C++ op is the Python overhead this script exists to track.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kquant

import torch
from torch import nn

import kquant
from kquant import QuantLinear, ops

warnings.filterwarnings("ignore")

SHAPES = [(384, 1536), (4096, 4096)]  # (K, N)
PRESETS = ["w8a8", "w4a8", "w8a16", "w4a16"]


def best_us(fn, repeat: int, number: int) -> float:
    fn()
    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--number", type=int, default=500)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kquant from {kquant.__file__}")
    print(f"cpu backend: {kquant.backends()['cpu']['reason']}")
    print(f"us per call, M=1, best of {a.repeat} x {a.number} calls (fewer for the big shape)")
    print(f"{'K x N':>11} {'preset':>6} {'module':>8} {'op body':>8} {'C++ op':>8} {'overhead':>9} {'fbgemm':>8}")
    torch.manual_seed(0)
    with torch.no_grad():
        for k, n in SHAPES:
            number = a.number if k * n < 4e6 else max(1, a.number // 25)
            lin = nn.Linear(k, n)
            x = torch.randn(1, k)
            fb = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
            t_fb = best_us(lambda: fb(x), a.repeat, number)
            for preset in PRESETS:
                q = QuantLinear.from_linear(lin, preset, name="fc")
                assert q.backend() == "cpu", q.backend()
                p = q.packed_weight()
                cxx = getattr(torch.ops.kquant, f"_{q.spec.op}_cpu")
                if q.activations == "none":
                    args = (p.bits, False, x, p.qweight, p.scales, p.zeros, q.bias, None, p.group_size)
                    cargs = (x, q.qweight, q.scales, q.zeros, q.bias, q.group_size)
                else:
                    args = (p.bits, True, x, p.qweight, p.scales, None, q.bias, q.act_scale, p.group_size)
                    cargs = (x, q.qweight, q.scales, q.bias, q.act_scale, q.group_size)
                body = ops.linear
                assert torch.equal(q(x), cxx(*cargs)) and torch.equal(body(*args), cxx(*cargs))
                t_mod = best_us(lambda: q(x), a.repeat, number)
                t_body = best_us(lambda: body(*args), a.repeat, number)
                t_cxx = best_us(lambda: cxx(*cargs), a.repeat, number)
                fbs = f"{t_fb:8.1f}" if preset == "w8a8" else f"{'':>8}"
                print(f"{k:>5}x{n:<5} {preset:>6} {t_mod:8.1f} {t_body:8.1f} {t_cxx:8.1f} "
                      f"{t_mod - t_cxx:9.1f} {fbs}", flush=True)


if __name__ == "__main__":
    main()
