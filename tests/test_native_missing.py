"""The package imports and works (reference backend) when the native extension is missing."""
import subprocess
import sys

CODE = r"""
import sys, warnings
sys.modules["kquant._C"] = None          # as if the extension failed to build
sys.modules["kquant._C_cuda"] = None
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import kquant
msgs = [str(x.message) for x in w if "native extension kquant._C" in str(x.message)]
assert msgs and "import of kquant._C halted" in msgs[0], [str(x.message) for x in w]
import torch
from torch import nn
info = kquant.backends()
assert info["cpu"]["available"] is False and "kquant._C" in info["cpu"]["reason"], info["cpu"]
m = kquant.quantize_(nn.Sequential(nn.Linear(32, 16)), "w8a8", progress=False)
assert m[0].backend() == "reference", m[0].backend()
y = m(torch.randn(3, 32))
assert y.shape == (3, 16) and torch.isfinite(y).all()
print("OK", msgs[0])
"""


def test_works_without_native_extension():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout and "slower backends" in r.stdout
