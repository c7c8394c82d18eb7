// kquant._C: build and CPU-feature information for `kquant info`. Ops are not bound
// here: csrc/cpu/ops.cpp registers the CPU kernels' private ops (TORCH_LIBRARY_FRAGMENT/IMPL).
#include <torch/extension.h>

#include "cpu_features.h"

namespace {

py::dict cpu_features() {
  py::dict d;
  d["avx2"] = kquant::cpu_has_avx2_fma();
  d["fma"] = kquant::cpu_has_avx2_fma();
#if defined(__x86_64__) || defined(_M_X64)
  d["arch"] = "x86_64";
  d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
  d["avx512_vnni_level"] = kquant::cpu_has_avx512_vnni();  // F/BW/VL/DQ + VNNI: kquant's AVX-512 level
  d["amx_int8"] = kquant::cpu_has_amx_int8();              // CPU, OS and process permission
#else
  d["arch"] = "other";
#endif
  return d;
}

py::dict build_info() {
  py::dict d;
#if defined(__x86_64__) || defined(_M_X64)
  d["avx2_kernels_compiled"] = true;
#else
  d["avx2_kernels_compiled"] = false;
#endif
  d["compiler"] = __VERSION__;
  d["torch_abi"] = TORCH_VERSION;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kquant native CPU kernels";
  m.def("cpu_features", &cpu_features, "CPU features seen at run time");
  m.def("build_info", &build_info, "how this extension was compiled");
}
