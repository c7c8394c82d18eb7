"""Build kquant's native extensions.

kquant._C       C++ CPU kernels (csrc/module.cpp + csrc/cpu/*.cpp, one file per ISA level).
                The AVX2+FMA, AVX-512 and AMX code is compiled per function with target
                attributes and the level chosen at run time (csrc/cpu/plan.cpp), so the
                library also loads on CPUs without AVX2 (portable scalar level).
kquant._C_cuda  CUDA kernels (csrc/cuda/*.cu), only when torch is a CUDA build and nvcc
                is found (never decided by whether a GPU is visible). Targets come from
                KQUANT_CUDA_ARCHS (default "80;90a").
Both are optional: when one fails to compile, setup prints "kquant setup: ..." with the
reason and the build or install goes on without it. The Python package works without
either (reference backend) and warns why at import.

Environment:
  KQUANT_EXTENSIONS=cpu|cuda|cpu,cuda  which extensions to build (default both)
  KQUANT_NO_EXTENSION=1                build none; KQUANT_NO_CUDA=1 skips the CUDA one
  KQUANT_CUDA_ARCHS="80;90a"           CUDA targets
  KQUANT_CXXFLAGS="-march=native ..."  extra C++ compiler flags (space-separated), appended
                                       to kquant's own for both extensions' C++ sources
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"kquant setup: {msg}", file=sys.stderr)


def _cuda_gencode(archs):
    flags = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        if a:
            flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def _optional_build_ext(ce):
    """torch's BuildExtension (ninja), with every extension optional: ninja reports a failed
    compile as a RuntimeError, which setuptools' `optional=True` alone does not catch."""

    class BuildExtension(ce.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001  (compile, link or toolchain errors alike)
                _say(f"{ext.name} was not built ({type(e).__name__}: {e}; the compiler's output is above); "
                     f"continuing without it: kquant then runs on its other backends, down to the "
                     f"pure-PyTorch reference, and warns at import")

    return BuildExtension.with_options(use_ninja=True)


def get_extensions():
    if os.environ.get("KQUANT_NO_EXTENSION") == "1":
        _say("KQUANT_NO_EXTENSION=1: skipping native extensions (reference backend only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # noqa: BLE001
        _say(f"torch is not importable ({e}); building without native extensions")
        return [], {}
    cxx = ["-O3", "-std=c++20", "-fno-math-errno"] + os.environ.get("KQUANT_CXXFLAGS", "").split()
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        _say(f"{machine} is not x86-64: the AVX2/AVX-512/AMX kernels are not compiled, scalar level only")
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "module.cpp")) +
                      glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # KQUANT_EXTENSIONS=cpu or =cuda builds one of the two (handy while working on one)
    wanted = set(os.environ.get("KQUANT_EXTENSIONS", "cpu,cuda").replace(" ", "").split(","))
    exts = []
    if "cpu" in wanted:
        # at::parallel_for is a header template: without -fopenmp it silently runs serially
        # (torch's own libgomp.so.1 is already loaded, so the soname resolves to it)
        omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        exts.append(ce.CppExtension("kquant._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                                    extra_compile_args={"cxx": cxx + omp}, extra_link_args=omp, optional=True))
    cu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    nvcc = shutil.which("nvcc") or (os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None)
    if os.environ.get("KQUANT_NO_CUDA") == "1" or "cuda" not in wanted:
        _say("CUDA kernels not requested (KQUANT_NO_CUDA=1 or KQUANT_EXTENSIONS without cuda)")
    elif not torch.version.cuda:
        _say(f"torch {torch.__version__} is not a CUDA build: CUDA kernels not built")
    elif not nvcc or not os.path.exists(nvcc):
        _say("nvcc not found (PATH or CUDA_HOME): CUDA kernels not built")
    elif not cu_sources:
        _say("no CUDA sources in csrc/cuda: nothing to build")
    else:
        archs = os.environ.get("KQUANT_CUDA_ARCHS", "80;90a")
        # torch's CUDA headers include cusparse/cublas headers that a bare toolkit may lack;
        # the nvidia wheels installed with CUDA torch carry them
        extra_inc = []
        for sp in sys.path:
            for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
                cand = os.path.join(sp, sub)
                if os.path.isdir(cand):
                    extra_inc.append(cand)
        # the linker needs libcudart.so; CUDA_HOME guessed from an nvcc wrapper script
        # (/usr/local/bin/nvcc -> /usr/local) may not hold it, so look in the usual places
        cudart_dirs = []
        for home in [os.environ.get("CUDA_HOME"), ce.CUDA_HOME, "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*")):
            for sub in ("lib64", "lib"):
                d = os.path.join(home, sub) if home else None
                if d and os.path.exists(os.path.join(d, "libcudart.so")) and d not in cudart_dirs:
                    cudart_dirs.append(d)
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                      "-Xptxas=-warn-spills", "--resource-usage"] + _cuda_gencode(archs)
        exts.append(ce.CUDAExtension(
            "kquant._C_cuda", [os.path.relpath(p, ROOT) for p in cu_sources],
            include_dirs=[os.path.join(ROOT, "csrc")] + extra_inc, library_dirs=cudart_dirs[:1],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, optional=True))
        _say(f"CUDA kernels for archs {archs} with {nvcc}")
    return exts, {"build_ext": _optional_build_ext(ce)}


ext_modules, cmdclass = get_extensions()
setup(packages=find_packages(include=["kquant", "kquant.*"]), ext_modules=ext_modules, cmdclass=cmdclass,
      package_data={"kquant": ["data/*", "backends/*.json", "backends/triton/*.json"]}, include_package_data=True)
