// Private CUDA ops (torch.ops.kquant._*_cuda) and the Python module entry of kquant._C_cuda.
// Schemas are defined here with TORCH_LIBRARY_FRAGMENT (the public ops are defined in Python
// in the same namespace); kquant/backends/cuda.py calls them.
#include <Python.h>

#include <torch/library.h>

#include "kq_cuda.cuh"

TORCH_LIBRARY_FRAGMENT(kquant, m) {
  m.def("_quantize_per_token_cuda(Tensor x, Tensor? act_scale=None) -> (Tensor, Tensor)");
  m.def("_int8_mm_cuda(Tensor a, Tensor b) -> Tensor");
  // whether int8 per-channel GEMMs run on the sm_90a wgmma kernel on this device (self-checked)
  m.def("_cuda_wgmma_enabled(int device) -> bool", &kq::wgmma_enabled);
  m.def("_w8a8_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, Tensor? act_scale, "
        "int group_size) -> Tensor");
  m.def("_w4a8_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, Tensor? act_scale, "
        "int group_size) -> Tensor");
  m.def("_w8a16_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
        "int group_size) -> Tensor");
  m.def("_w4a16_linear_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
        "int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(kquant, CUDA, m) {
  m.impl("_quantize_per_token_cuda", &kq::quantize_per_token_cuda);
  m.impl("_int8_mm_cuda", &kq::int8_mm_cuda);
  m.impl("_w8a8_linear_cuda", &kq::w8a8_linear_cuda);
  m.impl("_w4a8_linear_cuda", &kq::w4a8_linear_cuda);
  m.impl("_w8a16_linear_cuda", &kq::w8a16_linear_cuda);
  m.impl("_w4a16_linear_cuda", &kq::w4a16_linear_cuda);
}

#define KQ_STR2(...) #__VA_ARGS__
#define KQ_STR(...) KQ_STR2(__VA_ARGS__)

// The module itself only carries build facts; importing it registers the ops above.
static struct PyModuleDef kq_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                            "kquant CUDA kernels (ops live in torch.ops.kquant)", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* mod = PyModule_Create(&kq_cuda_module);
  if (mod == nullptr) return nullptr;
#ifdef __CUDA_ARCH_LIST__
  // virtual architectures this library was compiled for, e.g. "800,900"
  PyModule_AddStringConstant(mod, "CUDA_ARCH_LIST", KQ_STR(__CUDA_ARCH_LIST__));
#else
  PyModule_AddStringConstant(mod, "CUDA_ARCH_LIST", "");
#endif
  return mod;
}
