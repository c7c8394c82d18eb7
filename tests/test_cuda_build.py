"""The CUDA extension as built (runs without a GPU, in CI): machine code for sm_80 and
sm_90a, and no register spills / local memory in the kernels (ptxas' resource usage as
recorded in the cubins, read back with cuobjdump)."""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import kquant

PKG = os.path.dirname(kquant.__file__)
ARCHS = ("sm_80", "sm_90a")
MAIN_KERNELS = ("gemm_i8_kernel", "gemm_wgmma_kernel", "wo_gemv_kernel", "wo_mma_kernel", "quant_rows_kernel")


def _nvcc():
    return shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)


def _cuobjdump():
    cands = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        if home:
            cands.append(os.path.join(home, "bin", "cuobjdump"))
    try:  # the wheel of triton ships one
        import triton.backends.nvidia as tn
        cands.append(os.path.join(os.path.dirname(tn.__file__), "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def built():
    if not torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build: CUDA kernels are not built")
    if not _nvcc() or os.environ.get("KQUANT_NO_CUDA") == "1":
        pytest.skip("no nvcc (or KQUANT_NO_CUDA=1): CUDA kernels are not built")
    libs = glob.glob(os.path.join(PKG, "_C_cuda*.so"))
    # nvcc and a CUDA torch are here, so setup.py must have built the library
    assert libs, ("kquant/_C_cuda*.so is missing although nvcc and a CUDA torch exist; "
                  "build it with `pip install --no-build-isolation -e .`")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin or triton wheel)")
    return libs[0], tool


def test_machine_code_for_both_targets(built):
    lib, tool = built
    out = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True, timeout=120, check=True).stdout
    found = set(re.findall(r"\.(sm_\d+a?)\.cubin", out))
    for arch in ARCHS:
        assert arch in found, f"no {arch} machine code in {lib}: {out}"


def _resource_usage(lib, tool):
    """[(arch, function, {REG, STACK, LOCAL, ...})] from cuobjdump --dump-resource-usage."""
    out = subprocess.run([tool, "--dump-resource-usage", lib], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    rows, arch, func = [], None, None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            vals = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            rows.append((arch, func, vals))
            func = None
    return rows


def test_no_spills_or_local_memory(built):
    rows = _resource_usage(*built)
    for name in MAIN_KERNELS:
        for arch in ARCHS:
            hits = [r for r in rows if r[0] == arch and name in r[1]]
            assert hits, f"kernel {name} missing for {arch}"
            for _, func, v in hits:
                # spilled registers live in local memory: LOCAL/STACK > 0 would show them
                assert v.get("LOCAL", 0) == 0 and v.get("STACK", 0) == 0, f"{arch} {func}: {v}"
                assert 0 < v["REG"] <= 255, f"{arch} {func}: {v}"


def test_backend_reports_built_archs(built):
    from kquant.backends import cuda
    assert {80, 90} <= set(cuda.built_archs())
