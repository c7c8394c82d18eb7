"""Installing without a working compiler: a native extension that fails to compile is skipped
(with the reason) and the package works on the reference backend."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE_IT = r"""
import sys, warnings
# an editable install of another checkout would supply its own kquant._C: leave it out
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import torch
from torch import nn
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import kquant
assert kquant.__file__.startswith(%r), kquant.__file__
assert any("native extension kquant._C" in str(x.message) for x in w), [str(x.message) for x in w]
m = kquant.quantize_(nn.Sequential(nn.Linear(32, 16)), "w8a8", progress=False)
assert m[0].backend() == "reference", m[0].backend()
y = m(torch.randn(3, 32))
assert y.shape == (3, 16) and torch.isfinite(y).all()
print("OK")
"""


def copy_source(dst):
    """The files a build needs: setup.py, pyproject.toml, README.md, csrc/ and kquant/
    without any built extension."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), dst)
    shutil.copytree(os.path.join(REPO, "csrc"), os.path.join(dst, "csrc"))
    shutil.copytree(os.path.join(REPO, "kquant"), os.path.join(dst, "kquant"),
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))


def test_failed_compile_does_not_fail_the_build(tmp_path):
    copy_source(tmp_path)
    env = dict(os.environ, KQUANT_CXXFLAGS="-fno-such-flag-kquant", KQUANT_EXTENSIONS="cpu", MAX_JOBS="2")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "-fno-such-flag-kquant" in out  # the flag reached the compiler, which refused it
    assert "kquant setup: kquant._C was not built" in out, out[-4000:]
    assert not any(f.endswith(".so") for f in os.listdir(tmp_path / "kquant"))

    env["PYTHONPATH"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", USE_IT % str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
