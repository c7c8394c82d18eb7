"""Host cost of an eager kquant call on a CUDA GPU, where it goes, and what autotuning finds.

    python bench/gpu_overhead.py [--out DIR] [--device cuda]

1. Microseconds per call, host-bound (M = 1, K = N = 4096, bf16; a loop of calls, one
   synchronize at the end) of: F.linear in bf16; QuantLinear.__call__; the op body
   (checks + router + backend); the backend function alone; and the kernel's device time.
2. cProfile of QuantLinear calls (top functions by own time) for two presets.
3. Triton autotuning (KQUANT_TRITON_AUTOTUNE=1) at a few shapes: the heuristic default's
   time against the best candidate's, both with triton.testing.do_bench.
Runs with or without kquant._C_cuda (the router then picks Triton).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kquant

import torch
import torch.nn.functional as F
from torch import nn

import kquant
from kquant import ops

PRESETS = ("w8a8", "w4a8", "w8a16", "w4a16")


def host_us(fn, device, n=300):
    for _ in range(20):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def layer_for(preset, k, n, device, dtype):
    model = nn.Sequential(nn.Linear(k, n)).to(device, dtype)
    kquant.quantize_(model, preset)
    return model, model[0]


def overhead(device, dtype, out):
    rows = []
    k = n = 4096
    x = torch.randn(1, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    for preset in PRESETS:
        _, layer = layer_for(preset, k, n, device, dtype)
        kernel = layer._kernel  # the layer's prepared kernel (what an eager call runs)
        buffers = layer._buffers
        targs = (x, buffers["qweight"], buffers["scales"], buffers["zeros"], layer.bias, buffers["act_scale"])
        p = layer.packed_weight()
        int8 = layer.activations != "none"
        row = dict(preset=preset, backend=layer.backend())
        with torch.no_grad():
            row["F.linear bf16"] = host_us(lambda: F.linear(x, w), device)
            row["QuantLinear"] = host_us(lambda: layer(x), device)
            row["op body"] = host_us(lambda: ops.linear(p.bits, int8, x, p.qweight, p.scales, p.zeros, layer.bias,
                                                        layer.act_scale, p.group_size), device)
            row["backend fn"] = host_us(lambda: kernel(*targs), device)
            if device == "cuda":
                from triton.testing import do_bench
                row["device"] = do_bench(lambda: kernel(*targs), warmup=10, rep=50) * 1e3
        rows.append(row)
        print(json.dumps({a: (round(b, 1) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
    for preset in ("w4a16", "w8a8"):
        _, layer = layer_for(preset, k, n, device, dtype)
        with torch.no_grad():
            for _ in range(20):
                layer(x)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                layer(x)
            prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        text = s.getvalue()
        with open(os.path.join(out, f"profile_{preset}.txt"), "w") as f:
            f.write(text)
        print(f"--- cProfile, 200 QuantLinear calls, {preset} (tottime)")
        for line in text.splitlines():
            if line.strip() and ("{" in line or ".py" in line):
                print(line[:160])
    return rows


def autotune_probe(dtype):
    from triton.testing import do_bench

    from kquant.backends import triton as tb
    from kquant.format import quantize_weight
    rows = []
    for op, group, m, k, n in [("w8a8_linear", -1, 4096, 4096, 4096), ("w8a8_linear", -1, 1024, 4096, 14336),
                               ("w4a16_linear", 128, 1, 4096, 14336), ("w8a16_linear", -1, 1, 14336, 4096)]:
        bits = 4 if op.startswith("w4") else 8
        p = quantize_weight(torch.randn(n, k, device="cuda") * 0.02, bits, group, True)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        if op.endswith("a8_linear"):
            call = lambda: tb.act_linear(x, p.qweight, p.scales, None, None, group, bits)  # noqa: E731
        else:
            call = lambda: tb.wo_linear(x, p.qweight, p.scales, p.zeros, None, group, bits)  # noqa: E731
        os.environ.pop("KQUANT_TRITON_AUTOTUNE", None)
        t_default = do_bench(call, warmup=10, rep=100) * 1e3
        os.environ["KQUANT_TRITON_AUTOTUNE"] = "1"
        os.environ["KQUANT_TRITON_VERBOSE"] = "1"
        t0 = time.time()
        call()
        tune_s = time.time() - t0
        t_tuned = do_bench(call, warmup=10, rep=100) * 1e3
        os.environ.pop("KQUANT_TRITON_AUTOTUNE")
        row = dict(op=op, M=m, K=k, N=n, default_us=t_default, tuned_us=t_tuned, tune_s=tune_s)
        rows.append(row)
        print(json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-overhead"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-autotune", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(json.dumps(dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                          backends={b: v["available"] for b, v in kquant.backends().items()})))
    res = dict(overhead=overhead(args.device, dtype, args.out))
    if args.device == "cuda" and not args.no_autotune:
        res["autotune"] = autotune_probe(dtype)
    with open(os.path.join(args.out, "gpu_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
