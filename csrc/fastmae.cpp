// fastmae._C: the CUDA C++ extension, a plain kernel library. The schemas in the one
// TORCH_LIBRARY(fastmae_C, m) block below are the kernels of the `cuda` backend: each op's Python
// definition in fastmae/ops/<op>.py calls them as torch.ops.fastmae_C.<name> and owns the op's public
// schema fastmae::<op>, its fake and its autograd; no fake or autograd is registered for fastmae_C ops
// (only random_masking's Autograd fallthrough, csrc/random_masking_cpu.cpp: its outputs have no gradient).
// Each kernel registers per dispatch key in its own files: csrc/<op>_cpu.cpp
// (TORCH_LIBRARY_IMPL(fastmae_C, CPU, m), at::parallel_for) and csrc/<op>.cu
// (TORCH_LIBRARY_IMPL(fastmae_C, CUDA, m)). Importing the module (an empty Python module) loads the library.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

std::vector<int64_t> fastmae_cuda_build_info();  // build_info.cu

TORCH_LIBRARY(fastmae_C, m) {
  // [CUDART_VERSION, arch, arch, ...], e.g. [13000, 800, 900]: what `fastmae info` reports.
  m.def("build_info() -> int[]", &fastmae_cuda_build_info);

  // random_masking: noise (N, L) float -> ids_keep (N, K) int64, ids_restore (N, L) int64, mask (N, L) fp32
  m.def("random_masking(Tensor noise, int len_keep) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
  // the same from Philox noise; seed_step: int64 (2,) [seed, step] on the target device
  m.def(
      "random_masking_philox(Tensor seed_step, int num_samples, int num_patches, int len_keep)"
      " -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");

  // unshuffle: x (N, 1+K, Dd), ids_restore (N, L), mask_token (1, 1, Dd), pos_embed (1, L+1, Dd) -> (N, L+1, Dd)
  m.def("unshuffle(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor pos_embed) -> Tensor");
  m.def(
      "unshuffle_backward(Tensor grad_out, Tensor ids_restore, int len_keep, ScalarType x_dtype,"
      " ScalarType mask_token_dtype) -> (Tensor grad_x, Tensor grad_mask_token)");

  // masked_mse: pred (N, L, P), imgs (N, C, H, W), mask (N, L) -> (loss, sum(mask) fp32)
  m.def(
      "masked_mse(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps)"
      " -> (Tensor loss, Tensor mask_sum)");
  m.def(
      "masked_mse_backward(Tensor grad_loss, Tensor mask_sum, Tensor pred, Tensor imgs, Tensor mask,"
      " int patch_size, bool norm_pix, float eps) -> Tensor grad_pred");
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmae CUDA/C++ ops (torch.ops.fastmae_C)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
