"""What the Triton test files share: the interpreter switched on before ``import triton``,
whether it really runs in this process, and the subprocess re-run of a whole test file when
another module imported triton first (then every other test of that file is skipped)."""
import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from triton import knobs as _knobs  # noqa: E402

# triton.language was decorated in interpreter mode only if the variable was set in time
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" and _knobs.runtime.interpret and \
    type(__import__("triton.language", fromlist=["zeros"]).zeros).__name__ == "InterpretedFunction"


def subprocess_test(path: str):
    """A test that re-runs the test file ``path`` with TRITON_INTERPRET=1 in a fresh process."""
    @pytest.mark.skipif(IN_PROCESS, reason="the interpreter runs in this process")
    def test_in_subprocess_with_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return test_in_subprocess_with_interpreter


def triton_backend():
    """kquant.backends.triton, or a skip when the interpreter is not on in this process."""
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1; see test_in_subprocess_with_interpreter")
    import kquant.backends.triton as tb
    return tb
