// fastmae._C: the CUDA C++ extension. Every op schema lives in the one TORCH_LIBRARY(fastmae, m)
// block below; each op's implementations register per dispatch key in its own files:
// csrc/<op>_cpu.cpp (TORCH_LIBRARY_IMPL(fastmae, CPU, m), at::parallel_for) and csrc/<op>.cu
// (TORCH_LIBRARY_IMPL(fastmae, CUDA, m)). fake (meta) implementations and autograd are registered
// from Python (fastmae/ops/<op>.py). Importing the module (an empty Python module) loads the library.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

std::vector<int64_t> fastmae_cuda_build_info();  // build_info.cu

TORCH_LIBRARY(fastmae, m) {
  // [CUDART_VERSION, arch, arch, ...], e.g. [13000, 800, 900]: what `fastmae info` reports.
  m.def("build_info() -> int[]", &fastmae_cuda_build_info);

  // random_masking: noise (N, L) float -> ids_keep (N, K) int64, ids_restore (N, L) int64, mask (N, L) fp32
  m.def("random_masking(Tensor noise, int len_keep) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
  // the same from Philox noise; seed_step: int64 (2,) [seed, step] on the target device
  m.def(
      "random_masking_philox(Tensor seed_step, int num_samples, int num_patches, int len_keep)"
      " -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
  // random_masking plus x_masked (N, K, D) = x[n, ids_keep] + pos_embed[0, 1 + ids_keep], one launch
  m.def(
      "random_masking_gather(Tensor noise, int len_keep, Tensor x, Tensor pos_embed)"
      " -> (Tensor ids_keep, Tensor ids_restore, Tensor mask, Tensor x_masked)");

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
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastmae CUDA/C++ ops (torch.ops.fastmae)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
