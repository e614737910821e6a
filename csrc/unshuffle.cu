// unshuffle on CUDA (fastmae::unshuffle, fastmae::unshuffle_backward): the decoder input in one pass,
// its backward in one pass plus a small fixed-order reduction. Contract and dtypes as in
// csrc/unshuffle_cpu.cpp (which also holds the argument checks shared with this file).
//
// Threads: a block of 256 threads is tx x ty, tx = min(ceil(Dd/V), 64) threads along Dd and
// ty = 256/tx rows; a thread owns V consecutive columns of one row (V = 8: one 16-byte load per bf16
// row slice, two per fp32 one; V = 1 when Dd % 8 != 0 or a pointer is not 8-element aligned).
// Grid dimension y walks column tiles of tx*V when Dd > 64*V.
// Forward: block (x, y) writes ty whole output rows (of the N*(L+1) rows flattened, so any batch
// fits the grid): row 0 of a sample reads x[n, 0]; row 1+l reads ids_restore[n, l] and takes
// x[n, 1+id] when id < K, else the mask token; adds pos[row]; one fp32 add, one rounding, one store.
// Every output element is written once. mask_token and pos_embed are converted to the output dtype
// first (exact, the wider type; a no-op for uniform dtypes and for autocast's bf16 x + fp32 tables).
// Backward, kernel 1: block (x, y) takes a chunk of 64 rows of one sample's grad_out; each thread
// walks its rows (stride ty), stores the cls and kept rows (cast to x_dtype) to their grad_x rows --
// each once, as ids_restore is a permutation, so no atomics -- and sums the removed rows in fp32; the
// ty sums are added in thread-row order through shared memory into partial[n, chunk] (fp32). (For
// Dd < 8*32 a block has more thread-rows than a chunk has rows: some idle; such widths are test shapes.)
// Kernel 2: each block sums the N*C partial rows of 32 columns, 32 lanes of rows (lane p takes rows
// p, p+32, ...; then the lanes in order): the mask-token gradient is bit-identical run to run.
// ids_restore out of [0, L) is a device-side assertion, as in torch.gather.
//
// Bytes moved (e_x, e_o, e_g, e_t: element sizes of x, output, grad_out, mask_token; ids int64;
// C = cdiv(L+1, 64) chunks per sample):
//   forward  = N*(1+K)*Dd*e_x + N*L*8 + N*(L+1)*Dd*e_o + (L+1)*Dd*e_o (pos: read by every sample, from L2)
//   backward = N*(L+1)*Dd*e_g + N*L*8 + N*(1+K)*Dd*e_x + 2*N*C*Dd*4 (partials: 4-7% at L=196) + Dd*e_t
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "unshuffle.h"

// csrc/unshuffle_cpu.cpp: shape/dtype/device checks; the forward one returns the output dtype.
at::ScalarType unshuffle_check_forward(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                                       const at::Tensor& pos_embed);
void unshuffle_check_backward(const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t len_keep,
                              at::ScalarType x_dtype, at::ScalarType mask_token_dtype);

namespace {

constexpr int kThreads = 256;      // threads per block, forward and backward
constexpr int kVec = 8;            // columns per thread on the vector path
constexpr int kMaxRowThreads = 64;  // threads along Dd per row
constexpr int kChunkRows = 64;     // rows of grad_out per backward block
constexpr int kRedCols = 32;       // reduction: columns per block
constexpr int kRedLanes = 32;      // reduction: row lanes per block

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_f32(const T* p, float (&f)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = static_cast<float>(pk.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_f32(T* p, const float (&f)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(f[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename xt, typename ot, int V>
__global__ void __launch_bounds__(kThreads)
    unshuffle_fwd_kernel(const xt* __restrict__ x, const int64_t* __restrict__ ids, const ot* __restrict__ tok,
                         const ot* __restrict__ pos, ot* __restrict__ out, int64_t rows, int64_t keep,
                         int64_t patches, int64_t dd) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;  // output row of N*(L+1)
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;  // first column
  if (r >= rows || c >= dd) return;
  const int64_t n = r / (patches + 1), j = r - n * (patches + 1);
  int64_t src = 0;  // row of x, or -1: the mask token
  if (j > 0) {
    const int64_t id = ids[n * patches + j - 1];
    CUDA_KERNEL_ASSERT(id >= 0 && id < patches);
    src = id < keep ? 1 + id : -1;
  }
  float v[V], p[V];
  if (src >= 0) {
    load_f32<xt, V>(x + (n * (keep + 1) + src) * dd + c, v);
  } else {
    load_f32<ot, V>(tok + c, v);
  }
  load_f32<ot, V>(pos + j * dd + c, p);
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] += p[i];
  store_f32<ot, V>(out + r * dd + c, v);
}

template <typename xt, typename gt, int V>
__global__ void __launch_bounds__(kThreads, 1)  // min 1 block per SM: the register budget that keeps it spill-free
    unshuffle_bwd_kernel(const gt* __restrict__ g, const int64_t* __restrict__ ids, xt* __restrict__ gx,
                         float* __restrict__ partial, int64_t keep, int64_t patches, int64_t dd, int64_t chunks) {
  __shared__ float sums[kThreads * V];  // (ty, tx, V) fp32 sums of the removed rows
  const int64_t n = blockIdx.x / chunks, chunk = blockIdx.x - n * chunks;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool col_ok = c < dd;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  const int64_t row_end = (chunk + 1) * kChunkRows < patches + 1 ? (chunk + 1) * kChunkRows : patches + 1;
  if (col_ok) {
#pragma unroll 4
    for (int64_t j = chunk * kChunkRows + threadIdx.y; j < row_end; j += blockDim.y) {
      int64_t dst = 0;  // row of grad_x, or -1: a removed row
      if (j > 0) {
        const int64_t id = ids[n * patches + j - 1];
        CUDA_KERNEL_ASSERT(id >= 0 && id < patches);
        dst = id < keep ? 1 + id : -1;
      }
      float v[V];
      load_f32<gt, V>(g + (n * (patches + 1) + j) * dd + c, v);
      if (dst >= 0) {
        store_f32<xt, V>(gx + (n * (keep + 1) + dst) * dd + c, v);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += v[i];
      }
    }
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < V; ++i) sums[t * V + i] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0 || !col_ok) return;
  for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {  // thread-row order: fixed
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += sums[(y * blockDim.x + threadIdx.x) * V + i];
  }
  store_f32<float, V>(partial + (n * chunks + chunk) * dd + c, acc);
}

template <typename tt>
__global__ void __launch_bounds__(kRedCols* kRedLanes)
    mask_token_grad_kernel(const float* __restrict__ partial, tt* __restrict__ out, int64_t num_partials, int64_t dd) {
  __shared__ float sums[kRedLanes][kRedCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRedCols + threadIdx.x;
  float acc = 0.0f;
  if (c < dd) {
    for (int64_t p = threadIdx.y; p < num_partials; p += kRedLanes) acc += partial[p * dd + c];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || c >= dd) return;
  for (int y = 1; y < kRedLanes; ++y) acc += sums[y][threadIdx.x];  // lane order: fixed
  out[c] = static_cast<tt>(acc);
}


bool vec_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (kVec * t.element_size()) == 0;
}

// Threads along Dd and rows per block, and the number of column tiles, for width dd and V columns a thread.
struct Layout {
  int tx, ty;
  int64_t col_tiles;
};

Layout layout(int64_t dd, int vec) {
  const int64_t threads_per_row = (dd + vec - 1) / vec;
  const int tx = static_cast<int>(std::min<int64_t>(threads_per_row, kMaxRowThreads));
  return {tx, kThreads / tx, (threads_per_row + tx - 1) / tx};
}

void check_grid(int64_t blocks_x, int64_t blocks_y, const char* name) {
  TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max() && blocks_y <= 65535, name, ": grid (", blocks_x, ", ",
              blocks_y, ") exceeds CUDA's limits (2^31-1, 65535)");
}

at::Tensor unshuffle_cuda(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                          const at::Tensor& pos_embed) {
  const at::ScalarType out_dtype = unshuffle_check_forward(x, ids_restore, mask_token, pos_embed);
  TORCH_CHECK(x.device().is_cuda(), "unshuffle (CUDA implementation): tensors must be on a CUDA device, got ",
              x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), keep = x.size(1) - 1, dd = x.size(2), patches = ids_restore.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  const at::Tensor tok = mask_token.to(out_dtype).contiguous();
  const at::Tensor pos = pos_embed.to(out_dtype).contiguous();
  at::Tensor out = at::empty({n, patches + 1, dd}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const bool vec = dd % kVec == 0 && vec_aligned(xc) && vec_aligned(tok) && vec_aligned(pos) && vec_aligned(out);
  const Layout lay = layout(dd, vec ? kVec : 1);
  const int64_t rows = n * (patches + 1);
  const int64_t blocks = (rows + lay.ty - 1) / lay.ty;
  check_grid(blocks, lay.col_tiles, "unshuffle");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(lay.col_tiles));
  const dim3 block(lay.tx, lay.ty);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  fastmae_unshuffle::dispatch_x_wide(x.scalar_type(), out_dtype, [&](auto x_tag, auto out_tag) {
    using xt = decltype(x_tag);
    using ot = decltype(out_tag);
    auto kernel = vec ? unshuffle_fwd_kernel<xt, ot, kVec> : unshuffle_fwd_kernel<xt, ot, 1>;
    kernel<<<grid, block, 0, stream>>>(xc.const_data_ptr<xt>(), ids.const_data_ptr<int64_t>(), tok.const_data_ptr<ot>(),
                                       pos.const_data_ptr<ot>(), out.mutable_data_ptr<ot>(), rows, keep, patches, dd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unshuffle_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                           int64_t len_keep, at::ScalarType x_dtype,
                                                           at::ScalarType mask_token_dtype) {
  unshuffle_check_backward(grad_out, ids_restore, len_keep, x_dtype, mask_token_dtype);
  TORCH_CHECK(grad_out.device().is_cuda(),
              "unshuffle_backward (CUDA implementation): tensors must be on a CUDA device, got ", grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t n = grad_out.size(0), patches = ids_restore.size(1), dd = grad_out.size(2);
  at::Tensor g = grad_out.contiguous();
  if (g.scalar_type() != x_dtype && g.scalar_type() != at::kFloat) g = g.to(at::kFloat);  // exact: wider
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  const int64_t chunks = (patches + 1 + kChunkRows - 1) / kChunkRows;  // C
  at::Tensor grad_x = at::empty({n, len_keep + 1, dd}, grad_out.options().dtype(x_dtype));
  at::Tensor partial = at::empty({n * chunks, dd}, grad_out.options().dtype(at::kFloat));  // (N*C, Dd)
  at::Tensor grad_tok = at::empty({1, 1, dd}, grad_out.options().dtype(mask_token_dtype));
  if (dd == 0) return {grad_x, grad_tok};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    const bool vec = dd % kVec == 0 && vec_aligned(g) && vec_aligned(grad_x);
    const Layout lay = layout(dd, vec ? kVec : 1);
    check_grid(n * chunks, lay.col_tiles, "unshuffle_backward");
    const dim3 grid(static_cast<unsigned>(n * chunks), static_cast<unsigned>(lay.col_tiles));
    const dim3 block(lay.tx, lay.ty);
    fastmae_unshuffle::dispatch_x_wide(x_dtype, g.scalar_type(), [&](auto x_tag, auto g_tag) {
      using xt = decltype(x_tag);
      using gt = decltype(g_tag);
      auto kernel = vec ? unshuffle_bwd_kernel<xt, gt, kVec> : unshuffle_bwd_kernel<xt, gt, 1>;
      kernel<<<grid, block, 0, stream>>>(g.const_data_ptr<gt>(), ids.const_data_ptr<int64_t>(),
                                         grad_x.mutable_data_ptr<xt>(), partial.mutable_data_ptr<float>(), len_keep,
                                         patches, dd, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const dim3 red_grid(static_cast<unsigned>((dd + kRedCols - 1) / kRedCols));
  const dim3 red_block(kRedCols, kRedLanes);
  check_grid(red_grid.x, 1, "unshuffle_backward");
  const float* partial_p = partial.const_data_ptr<float>();
  const int64_t num_partials = n * chunks;
  AT_DISPATCH_SWITCH(mask_token_dtype, "unshuffle_backward_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       mask_token_grad_kernel<<<red_grid, red_block, 0, stream>>>(
                           partial_p, grad_tok.mutable_data_ptr<scalar_t>(), num_partials, dd);
                     })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       mask_token_grad_kernel<<<red_grid, red_block, 0, stream>>>(
                           partial_p, grad_tok.mutable_data_ptr<scalar_t>(), num_partials, dd);
                     })
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       mask_token_grad_kernel<<<red_grid, red_block, 0, stream>>>(
                           partial_p, grad_tok.mutable_data_ptr<scalar_t>(), num_partials, dd);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_tok};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CUDA, m) {
  m.impl("unshuffle", &unshuffle_cuda);
  m.impl("unshuffle_backward", &unshuffle_backward_cuda);
}
