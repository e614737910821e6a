// masked_mse on CUDA: the MAE loss read straight from pred and imgs, only removed patches, and its
// gradient wrt pred (recomputed in the backward). Schemas: csrc/fastmae.cpp; the CPU implementation
// and the argument checks shared with it: csrc/masked_mse_cpu.cpp.
//
// Work split. A "group" of T = WPP*32 threads (WPP warps) handles one patch at a time; a block of
// 256 threads holds 8/WPP groups, and each group takes kRowsPerGroup = 4 patches of the flattened
// (N*L) patch list in turn, interleaved with the other groups of its block (neighbouring patches
// share cache lines of imgs and are read together). Thread `g` of a group holds the patch elements
// j = g + T*k, k < VPT, in registers (fp32): pred[n, l, j] and the target imgs[n, c, r*p + i,
// col*p + q] with j = (i*p + q)*C + c. The offsets of those target elements within a patch are the
// same for every patch: each thread computes them once (incrementally, no division per element;
// unsigned 32-bit, the host checks that they fit) and reuses them for all its patches; pred
// elements are at fixed immediate offsets T*k from the patch's row (pred rows must be contiguous:
// they are in MAE, a slice of the decoder output; other layouts are copied first). Configurations
// (WPP, VPT): (1, 8) for P <= 256, (1, 24) for P <= 768 (MAE: P = 768 at p16, 588 at p14), (8, 16)
// for P <= 4096; larger patches are refused (kMaxP). All fit in 128 registers (2 blocks per SM)
// without spills.
//
// Per patch: the mask weight m = mask[n, l] (the next patch's weight is loaded while this one is
// worked on); a kept patch (m == 0) loads nothing else. With norm_pix, two reductions over the group
// give the mean and then the unbiased variance (two passes over the registers: no E[x^2] - E[x]^2
// cancellation), t = (t - mean) * (1 / sqrtf(var + eps)); one more reduction gives
// sum((pred - t)^2). Reductions: a sequential sum per thread, an xor butterfly across the warp
// (every lane ends with the same bits), and for WPP > 1 the warps' sums added in warp order from
// shared memory. No atomics anywhere.
//
// Forward: each group adds m * sum / P and m over its patches in order; the block adds its groups
// in order and writes one (loss, mask) partial; a one-block kernel adds the partials (a fixed
// strided order, then a fixed tree) and writes loss = sum / sum(mask) in the promoted dtype, and
// sum(mask) in fp32 for the backward. The number of blocks depends on the shapes only, so the loss
// is bit-identical run to run, on any GPU. Backward: grad (N, L, P) contiguous in pred's dtype,
// every row written: (pred - t) * (m * 2 * grad_loss / (P * sum(mask))), zero on kept rows, and NaN
// everywhere when sum(mask) == 0 (0 * inf), as the reference's 0/0.
//
// Bytes moved (f removed fraction, e_p / e_i / e_m element sizes of pred / imgs / mask, B blocks):
//   forward   f*N*L*P*(e_p + e_i) + N*L*e_m + 16*B (partials written and read)
//   backward  f*N*L*P*(e_p + e_i) + N*L*e_m + N*L*P*e_p (the gradient written)
// Writing the gradient in the forward instead would cost N*L*P*e_p more there and 2*N*L*P*e_p in
// the backward (read it, scale by grad_loss): recomputing moves fewer bytes whenever
// f*(e_p + e_i) < 2*e_p (at f = 0.75: 8 vs 9 bytes per pred element with bf16 pred and imgs, 16 vs
// 18 in fp32; only bf16 pred with fp32 imgs is 5% worse, 11 vs 10.5), writes nothing when no
// backward follows, and keeps no (N, L, P) buffer alive between the passes: the backward recomputes
// (the same decision as the Triton backend, kernels/masked_mse.py).
//
// Loads are scalar, one element per lane (a warp reads 32 consecutive pred elements, and the target
// elements of at most 2 patch rows in each of the C planes); each DRAM sector of a removed patch is
// needed once, and the warp's repeated accesses to it are meant to hit L1 (not yet measured on a
// GPU; bench/ is where the cuda-vs-triton priority gets decided).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>

// masked_mse_cpu.cpp: argument checks shared by the CPU and CUDA implementations.
void fastmae_masked_mse_check(const char* op, const at::Tensor& pred, const at::Tensor& imgs,
                              const at::Tensor& mask, int64_t patch_size);
void fastmae_masked_mse_check_backward(const at::Tensor& grad_loss, const at::Tensor& mask_sum);
at::ScalarType fastmae_masked_mse_loss_dtype(const at::Tensor& pred, const at::Tensor& imgs,
                                            const at::Tensor& mask);

namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarps = kBlockThreads / 32;
constexpr int kRowsPerGroup = 4;  // patches one group handles in turn
constexpr int kMaxP = 4096;       // 8 warps x 16 values per thread
constexpr int kSumThreads = 512;

// fp32 / bf16 / fp16 chosen at run time, for the small tensors (mask, grad_loss, loss)
enum DtypeCode : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

DtypeCode dtype_code(at::ScalarType t) {
  return t == at::kBFloat16 ? kBF16 : t == at::kHalf ? kF16 : kF32;
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int code) {
  if (code == kBF16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  if (code == kF16) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_from_float(void* p, float v, int code) {
  if (code == kBF16) {
    *static_cast<c10::BFloat16*>(p) = c10::BFloat16(v);
  } else if (code == kF16) {
    *static_cast<c10::Half*>(p) = c10::Half(v);
  } else {
    *static_cast<float*>(p) = v;
  }
}

struct Geometry {
  int64_t num_rows;  // N*L
  int64_t s_pred_n, s_pred_l, s_img_n, s_img_h, s_img_w, s_mask_n, s_mask_l;
  int num_patches;  // L
  int grid_w;       // W / p
  int patch;        // p
  int channels;     // C
  int numel;        // P = p*p*C
  int s_img_c;
  int mask_code;
  float eps;
  bool norm_pix;
};

// Sum of v over the group of WPP warps; every thread of the group gets the same bits. With WPP > 1
// every thread of the block must call it (it synchronises the block).
template <int WPP>
__device__ __forceinline__ float group_sum(float v, float* scratch /* [kWarps] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (WPP == 1) {
    return v;
  } else {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = v;
    __syncthreads();
    const int first = warp / WPP * WPP;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WPP; ++w) s += scratch[first + w];
    __syncthreads();
    return s;
  }
}

// Offsets within a patch of the target elements j = gtid + T*k: c*s_c + i*s_h + q*s_w (0 past P).
// Unsigned 32-bit (the host checks that they fit): widening them to 64 bits costs no register.
template <int T, int VPT>
__device__ __forceinline__ void target_offsets(const Geometry& g, int gtid, unsigned (&off)[VPT]) {
  const int C = g.channels, p = g.patch;
  const int sh = static_cast<int>(g.s_img_h), sw = static_cast<int>(g.s_img_w);
  int c = gtid % C, u = gtid / C;
  int q = u % p, i = u / p;
  const int dc = T % C, du = T / C, dq = du % p, di = du / p;  // j += T
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    off[k] = gtid + T * k < g.numel ? static_cast<unsigned>(c * g.s_img_c + i * sh + q * sw) : 0u;
    c += dc;
    const int carry = c >= C;
    c -= carry ? C : 0;
    q += dq + carry;  // < 2p
    i += di;
    if (q >= p) {
      q -= p;
      i += 1;
    }
  }
}

// A patch's base pointer, computed once: without this the compiler folds each element's offset into
// the 64-bit base computation and redoes all of it per element.
template <typename T>
__device__ __forceinline__ const T* opaque(const T* p) {
  asm("mov.b64 %0, %0;" : "+l"(p));
  return p;
}

// A read-only global load as fp32 (ld.global.nc: the pointer went through opaque(), which hides
// that it points to global memory).
__device__ __forceinline__ float ldg_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ldg_float(const c10::BFloat16* p) {
  return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ __forceinline__ float ldg_float(const c10::Half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// diff[k] = pred - target of the patch `row` (zero where not live or past P); norm_pix applied.
// Element k of the thread is in the patch when k < nk. pred rows are contiguous (the host sees to it).
template <typename TP, typename TI, int WPP, int VPT>
__device__ __forceinline__ void patch_diff(const TP* __restrict__ pred, const TI* __restrict__ imgs,
                                           const Geometry& g, int64_t row, bool live, int gtid, int nk,
                                           const unsigned (&off)[VPT], float* scratch, float (&diff)[VPT]) {
  constexpr int T = WPP * 32;
  if (WPP == 1 && !live) {  // the whole warp skips a kept patch
#pragma unroll
    for (int k = 0; k < VPT; ++k) diff[k] = 0.f;
    return;
  }
  float x[VPT], t[VPT];
#pragma unroll
  for (int k = 0; k < VPT; ++k) x[k] = t[k] = 0.f;
  if (live) {  // uniform over the group; no barrier inside
    const int64_t n = row / g.num_patches;
    const int l = static_cast<int>(row - n * g.num_patches);
    const int r = l / g.grid_w, col = l - r * g.grid_w;
    const TP* x_row = opaque(pred + n * g.s_pred_n + l * g.s_pred_l + gtid);
    const TI* t_row = opaque(imgs + n * g.s_img_n + static_cast<int64_t>(r) * g.patch * g.s_img_h +
                             static_cast<int64_t>(col) * g.patch * g.s_img_w);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (k < nk) {
        x[k] = ldg_float(x_row + T * k);
        t[k] = ldg_float(t_row + off[k]);
      }
    }
  }
  if (g.norm_pix) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) s += t[k];
    const float mean = group_sum<WPP>(s, scratch) / static_cast<float>(g.numel);
    float s2 = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      t[k] = k < nk ? t[k] - mean : 0.f;
      s2 += t[k] * t[k];
    }
    const float var = group_sum<WPP>(s2, scratch) / static_cast<float>(g.numel - 1);  // unbiased
    const float rstd = 1.f / sqrtf(var + g.eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) t[k] *= rstd;
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) diff[k] = x[k] - t[k];
}

__device__ __forceinline__ float load_mask(const void* mask, const Geometry& g, int64_t row) {
  if (row >= g.num_rows) return 0.f;
  const int64_t n = row / g.num_patches, l = row - n * g.num_patches;
  return load_as_float(mask, n * g.s_mask_n + l * g.s_mask_l, g.mask_code);
}

// partial[b] = sum over the block's patches of m * mse, partial[gridDim.x + b] = sum of m.
template <typename TP, typename TI, int WPP, int VPT>
__global__ void __launch_bounds__(kBlockThreads, 2)
    masked_mse_fwd_kernel(const TP* __restrict__ pred, const TI* __restrict__ imgs, const void* __restrict__ mask,
                          float* __restrict__ partial, const Geometry g) {
  constexpr int T = WPP * 32, G = kWarps / WPP;
  __shared__ float scratch[kWarps];
  __shared__ float block_sums[2][G];
  const int group = threadIdx.x / T, gtid = threadIdx.x % T;
  unsigned off[VPT];
  target_offsets<T, VPT>(g, gtid, off);
  const int nk = (g.numel - gtid + T - 1) / T;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * G * kRowsPerGroup + group;
  float loss_acc = 0.f, mask_acc = 0.f;
  float m_next = load_mask(mask, g, first);
  for (int it = 0; it < kRowsPerGroup; ++it) {
    const int64_t row = first + static_cast<int64_t>(it) * G;
    const float m = m_next;
    m_next = it + 1 < kRowsPerGroup ? load_mask(mask, g, row + G) : 0.f;  // in flight during this patch
    float diff[VPT];
    patch_diff<TP, TI, WPP, VPT>(pred, imgs, g, row, m != 0.f, gtid, nk, off, scratch, diff);
    if (WPP == 1 && m == 0.f) continue;  // adds exactly zero
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) ss += diff[k] * diff[k];
    ss = group_sum<WPP>(ss, scratch);
    loss_acc += m * (ss / static_cast<float>(g.numel));
    mask_acc += m;
  }
  if (gtid == 0) {
    block_sums[0][group] = loss_acc;
    block_sums[1][group] = mask_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < G; ++k) {
      a += block_sums[0][k];
      b += block_sums[1][k];
    }
    partial[blockIdx.x] = a;
    partial[gridDim.x + blockIdx.x] = b;
  }
}

// One block: the partials (2, num_parts) added in a fixed order; loss = sum / sum(mask).
__global__ void __launch_bounds__(kSumThreads)
    masked_mse_sum_kernel(const float* __restrict__ partial, int64_t num_parts, void* __restrict__ loss, int loss_code,
                          float* __restrict__ mask_sum) {
  __shared__ float sums[2][kSumThreads / 32];
  float a = 0.f, b = 0.f;
  for (int64_t i = threadIdx.x; i < num_parts; i += kSumThreads) {
    a += partial[i];
    b += partial[num_parts + i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (threadIdx.x % 32 == 0) {
    sums[0][threadIdx.x / 32] = a;
    sums[1][threadIdx.x / 32] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.f;
    b = 0.f;
#pragma unroll
    for (int w = 0; w < kSumThreads / 32; ++w) {
      a += sums[0][w];
      b += sums[1][w];
    }
    store_from_float(loss, a / b, loss_code);
    *mask_sum = b;
  }
}

// grad (N*L, P) contiguous = (pred - t) * m * 2 * grad_loss / (P * mask_sum); every row written.
template <typename TP, typename TI, int WPP, int VPT>
__global__ void __launch_bounds__(kBlockThreads, 2)
    masked_mse_bwd_kernel(const void* __restrict__ grad_loss, int grad_code, const float* __restrict__ mask_sum,
                          const TP* __restrict__ pred, const TI* __restrict__ imgs, const void* __restrict__ mask,
                          TP* __restrict__ grad, const Geometry g) {
  constexpr int T = WPP * 32, G = kWarps / WPP;
  __shared__ float scratch[kWarps];
  const int group = threadIdx.x / T, gtid = threadIdx.x % T;
  unsigned off[VPT];
  target_offsets<T, VPT>(g, gtid, off);
  const int nk = (g.numel - gtid + T - 1) / T;
  const float scale = load_as_float(grad_loss, 0, grad_code) * 2.f / (static_cast<float>(g.numel) * *mask_sum);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * G * kRowsPerGroup + group;
  float m_next = load_mask(mask, g, first);
  for (int it = 0; it < kRowsPerGroup; ++it) {
    const int64_t row = first + static_cast<int64_t>(it) * G;
    if (WPP == 1 && row >= g.num_rows) break;  // the block-wide groups (WPP > 1) stay in step
    const float m = m_next;
    m_next = it + 1 < kRowsPerGroup ? load_mask(mask, g, row + G) : 0.f;  // in flight during this patch
    float diff[VPT];
    patch_diff<TP, TI, WPP, VPT>(pred, imgs, g, row, m != 0.f, gtid, nk, off, scratch, diff);
    if (row >= g.num_rows) continue;
    const float coef = m * scale;  // 0 on kept rows; NaN when mask_sum == 0
    TP* out = grad + row * g.numel + gtid;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (k < nk) out[T * k] = static_cast<TP>(diff[k] * coef);
    }
  }
}

#define FASTMAE_DISPATCH_FLOAT3(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void check_cuda(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == first.device(), op, " (CUDA): all tensors must be on one CUDA device; ",
                tensors.begin()->first, " is on ", first.device(), ", ", name, " on ", t->device());
  }
}

Geometry geometry(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask, int64_t patch_size,
                  bool norm_pix, double eps) {
  const int64_t C = imgs.size(1), P = pred.size(2);
  TORCH_CHECK(P <= kMaxP, "masked_mse (CUDA) holds a patch in registers: P = p*p*C must be <= ", kMaxP, ", got ", P);
  TORCH_CHECK(P <= 1 || pred.stride(2) == 1, "masked_mse (CUDA): pred rows must be contiguous here");
  // offsets within a patch of imgs are int32: the largest must fit
  const int64_t img_span = (C - 1) * imgs.stride(1) + (patch_size - 1) * (imgs.stride(2) + imgs.stride(3));
  TORCH_CHECK(img_span < (int64_t{1} << 31), "masked_mse (CUDA): a patch must span < 2^31 elements of imgs, got ",
              img_span, " (imgs strides ", imgs.strides(), ")");
  Geometry g;
  g.num_rows = pred.size(0) * pred.size(1);
  g.s_pred_n = pred.stride(0);
  g.s_pred_l = pred.stride(1);
  g.s_img_n = imgs.stride(0);
  g.s_img_h = imgs.stride(2);
  g.s_img_w = imgs.stride(3);
  g.s_mask_n = mask.stride(0);
  g.s_mask_l = mask.stride(1);
  g.num_patches = static_cast<int>(pred.size(1));
  g.grid_w = static_cast<int>(imgs.size(3) / patch_size);
  g.patch = static_cast<int>(patch_size);
  g.channels = static_cast<int>(C);
  g.numel = static_cast<int>(P);
  g.s_img_c = static_cast<int>(imgs.stride(1));
  g.mask_code = dtype_code(mask.scalar_type());
  g.eps = static_cast<float>(eps);
  g.norm_pix = norm_pix;
  return g;
}

// pred with contiguous rows (P values at stride 1), as the kernels read it: pred itself in MAE (a slice
// of the decoder output); other layouts are copied.
at::Tensor with_contiguous_rows(const at::Tensor& pred) {
  return pred.size(2) <= 1 || pred.stride(2) == 1 ? pred : pred.contiguous();
}

template <int WPP>
int64_t num_blocks(const Geometry& g) {
  constexpr int64_t rows_per_block = (kWarps / WPP) * kRowsPerGroup;
  return (g.num_rows + rows_per_block - 1) / rows_per_block;
}

// Calls f(integral_constant WPP, integral_constant VPT) for the configuration of P.
template <typename F>
void with_config(int P, F&& f) {
  if (P <= 32 * 8) {
    f(std::integral_constant<int, 1>{}, std::integral_constant<int, 8>{});
  } else if (P <= 32 * 24) {
    f(std::integral_constant<int, 1>{}, std::integral_constant<int, 24>{});
  } else {
    f(std::integral_constant<int, 8>{}, std::integral_constant<int, 16>{});
  }
}

std::tuple<at::Tensor, at::Tensor> masked_mse_cuda(const at::Tensor& pred_in, const at::Tensor& imgs,
                                                   const at::Tensor& mask, int64_t patch_size, bool norm_pix,
                                                   double eps) {
  check_cuda("masked_mse", {{"pred", &pred_in}, {"imgs", &imgs}, {"mask", &mask}});
  fastmae_masked_mse_check("masked_mse", pred_in, imgs, mask, patch_size);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = with_contiguous_rows(pred_in);
  const Geometry g = geometry(pred, imgs, mask, patch_size, norm_pix, eps);
  const at::ScalarType out_dtype = fastmae_masked_mse_loss_dtype(pred, imgs, mask);
  at::Tensor loss = at::empty({}, pred.options().dtype(out_dtype));
  at::Tensor mask_sum = at::empty({}, pred.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t blocks = 0;
  with_config(g.numel, [&](auto wpp, auto) { blocks = num_blocks<decltype(wpp)::value>(g); });
  at::Tensor partial = at::empty({2 * blocks}, pred.options().dtype(at::kFloat));  // (2, B)
  if (blocks > 0) {
    FASTMAE_DISPATCH_FLOAT3(pred.scalar_type(), "masked_mse_cuda", [&] {
      using pred_t = scalar_t;
      FASTMAE_DISPATCH_FLOAT3(imgs.scalar_type(), "masked_mse_cuda", [&] {
        with_config(g.numel, [&](auto wpp, auto vpt) {
          masked_mse_fwd_kernel<pred_t, scalar_t, decltype(wpp)::value, decltype(vpt)::value>
              <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
              pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<scalar_t>(), mask.const_data_ptr(),
              partial.mutable_data_ptr<float>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  masked_mse_sum_kernel<<<1, kSumThreads, 0, stream>>>(partial.const_data_ptr<float>(), blocks,
                                                      loss.mutable_data_ptr(), dtype_code(out_dtype),
                                                      mask_sum.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, mask_sum};
}

at::Tensor masked_mse_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& mask_sum,
                                    const at::Tensor& pred_in, const at::Tensor& imgs, const at::Tensor& mask,
                                    int64_t patch_size, bool norm_pix, double eps) {
  check_cuda("masked_mse_backward", {{"pred", &pred_in},
                                     {"imgs", &imgs},
                                     {"mask", &mask},
                                     {"grad_loss", &grad_loss},
                                     {"mask_sum", &mask_sum}});
  fastmae_masked_mse_check("masked_mse_backward", pred_in, imgs, mask, patch_size);
  fastmae_masked_mse_check_backward(grad_loss, mask_sum);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = with_contiguous_rows(pred_in);
  const Geometry g = geometry(pred, imgs, mask, patch_size, norm_pix, eps);
  at::Tensor grad = at::empty(pred.sizes(), pred.options());  // (N, L, P) contiguous
  if (g.num_rows == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMAE_DISPATCH_FLOAT3(pred.scalar_type(), "masked_mse_backward_cuda", [&] {
    using pred_t = scalar_t;
    FASTMAE_DISPATCH_FLOAT3(imgs.scalar_type(), "masked_mse_backward_cuda", [&] {
      with_config(g.numel, [&](auto wpp, auto vpt) {
        constexpr int WPP = decltype(wpp)::value, VPT = decltype(vpt)::value;
        masked_mse_bwd_kernel<pred_t, scalar_t, WPP, VPT>
            <<<static_cast<unsigned>(num_blocks<WPP>(g)), kBlockThreads, 0, stream>>>(
            grad_loss.const_data_ptr(), dtype_code(grad_loss.scalar_type()), mask_sum.const_data_ptr<float>(),
            pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<scalar_t>(), mask.const_data_ptr(),
            grad.mutable_data_ptr<pred_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CUDA, m) {
  m.impl("masked_mse", &masked_mse_cuda);
  m.impl("masked_mse_backward", &masked_mse_backward_cuda);
}
