// fastmae._C build information: which CUDA runtime and GPU architectures this library holds code for.
// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) from the -gencode flags setup.py passes.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

std::vector<int64_t> fastmae_cuda_build_info() {
  return {CUDART_VERSION, __CUDA_ARCH_LIST__};
}
