// fastmae._C: the CUDA C++ extension. Every op schema lives in the one TORCH_LIBRARY(fastmae, m)
// block below; each op's CPU and CUDA implementations register per dispatch key in its own file
// with TORCH_LIBRARY_IMPL. Importing the module (an empty Python module) loads the library.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

std::vector<int64_t> fastmae_cuda_build_info();  // build_info.cu

TORCH_LIBRARY(fastmae, m) {
  // [CUDART_VERSION, arch, arch, ...], e.g. [13000, 800, 900]: what `fastmae info` reports.
  m.def("build_info() -> int[]", &fastmae_cuda_build_info);
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmae CUDA/C++ ops (torch.ops.fastmae)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
