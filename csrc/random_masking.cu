// random_masking on CUDA: per-sample shuffle by a block-wide radix sort, in one launch.
//
// One thread block per sample n. Each thread holds IPT consecutive patches (blocked arrangement,
// patch l = thread * IPT + i) as (key, l) pairs, the key being the noise mapped to an
// order-preserving uint32 (every NaN -> 0xFFFFFFFF, after +inf; -0.0 -> +0.0 so that the two tie,
// as the comparisons of torch.argsort(stable=True) on CPU order them). cub::BlockRadixSort is stable,
// and the input order is the patch order, so ties keep index order; slots past L are padded with key
// 0xFFFFFFFF and sort after every real patch (NaN included). SortBlockedToStriped leaves rank
// r = i * THREADS + thread, so:
//   ids_keep[n, r] = l for r < K        (coalesced: consecutive threads write consecutive ranks)
//   ids_restore[n, l] = r               (scattered into shared memory, then written coalesced)
//   mask[n, l] = r >= K                 (1 = removed)
// The noise dtype (fp32/bf16/fp16, read as fp32: exact and order-preserving) is a runtime switch in the
// load, not a template parameter: one kernel per tile for all three.
// Tiles: THREADS x IPT = 128 x 2 for L <= 256 (MAE's 196 and 256 patches), 128 x 4 for L <= 512,
// 256 x 4 for L <= 1024 (the limit). __launch_bounds__(THREADS, 1): the minimum-blocks hint leaves
// ptxas free to give the sort the registers it needs (no spills: the build fails on any).
//
// random_masking_philox: the key of patch l is the Philox4x32-10 noise of
// fastmae.ops.random_masking.philox_noise_reference (key (seed mod 2^32, seed >> 32), counter
// (n*L + l, step, 0, 0), first word folded to [0, 2^31) and scaled by 4.6566127342e-10f), computed in
// registers; seed and step are read from the int64 device tensor seed_step = [seed, step], so a
// captured CUDA graph advances the step by an in-place update of that tensor, without recapture.
// (The same Philox is written in random_masking_cpu.cpp for the CPU implementation.)
//
// Bytes moved per call (e: noise element size): noise mode N*L*e read + N*L*(8 + 4) + N*K*8 written;
// Philox mode 16 read + N*L*(8 + 4) + N*K*8 written.
// No float atomics, no data-dependent reduction order: results are bit-identical run to run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_radix_sort.cuh>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace {

constexpr int64_t kMaxPatches = 1024;
constexpr uint32_t kLastKey = 0xFFFFFFFFu;  // NaN and padding

enum class NoiseType : int { kFloat, kBFloat16, kHalf };

__device__ __forceinline__ uint32_t sort_key(float f) {
  if (f != f) return kLastKey;  // every NaN, after +inf (0xFF800000); NaNs tie and keep index order
  const uint32_t bits = __float_as_uint(f == 0.0f ? 0.0f : f);  // -0.0 ties with +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Reads noise[i] of a runtime dtype as fp32 (exact for bf16/fp16): one kernel for every noise dtype.
struct NoiseKeys {
  const void* noise;  // (N, L) contiguous
  NoiseType dtype;
  int64_t row;  // n * L

  __device__ __forceinline__ uint32_t operator()(int l) const {
    const int64_t i = row + l;
    float f;
    switch (dtype) {
      case NoiseType::kFloat: f = static_cast<const float*>(noise)[i]; break;
      case NoiseType::kBFloat16: f = static_cast<float>(static_cast<const c10::BFloat16*>(noise)[i]); break;
      default: f = static_cast<float>(static_cast<const c10::Half*>(noise)[i]); break;
    }
    return sort_key(f);
  }
};

// Philox4x32-10 (Salmon et al. 2011), first output word, as triton.language.random.philox_impl.
__device__ __forceinline__ uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(c0, 0xD2511F53u), lo0 = c0 * 0xD2511F53u;
    const uint32_t hi2 = __umulhi(c2, 0xCD9E8D57u), lo2 = c2 * 0xCD9E8D57u;
    c0 = hi2 ^ c1 ^ k0;
    c1 = lo2;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

struct PhiloxKeys {
  uint32_t k0, k1, step;
  uint32_t row;  // n * L: the counter of patch 0 (N * L <= 2^32)

  __device__ __forceinline__ uint32_t operator()(int l) const {
    int32_t v = static_cast<int32_t>(philox_word0(row + static_cast<uint32_t>(l), step, k0, k1));
    v = v < 0 ? ~v : v;  // tl.rand's fold to [0, 2^31)
    return sort_key(__fmul_rn(__int2float_rn(v), 4.6566127342e-10f));  // fp32 product, as the reference
  }
};

template <int THREADS, int IPT>
struct Tile {
  static constexpr int kSize = THREADS * IPT;
  using Sort = cub::BlockRadixSort<uint32_t, THREADS, IPT, int32_t>;
  union Shared {
    typename Sort::TempStorage sort;
    int32_t restore[kSize];  // rank of patch l, reused after the sort
  };
};

// Sorts sample n's keys and writes ids_keep, ids_restore, mask.
template <int THREADS, int IPT, typename Keys>
__device__ __forceinline__ void mask_sample(const Keys& keys_of, int64_t n, int L, int K, int64_t* ids_keep,
                                            int64_t* ids_restore, float* mask,
                                            typename Tile<THREADS, IPT>::Shared& smem) {
  uint32_t keys[IPT];
  int32_t idx[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int l = threadIdx.x * IPT + i;
    idx[i] = l;
    keys[i] = l < L ? keys_of(l) : kLastKey;
  }
  typename Tile<THREADS, IPT>::Sort(smem.sort).SortBlockedToStriped(keys, idx);
  __syncthreads();  // the sort's temp storage becomes restore[]
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int rank = i * THREADS + threadIdx.x;
    const int l = idx[i];
    if (l < L) {  // real patches hold ranks 0..L-1
      smem.restore[l] = rank;
      if (rank < K) ids_keep[n * K + rank] = l;
    }
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += THREADS) {
    const int rank = smem.restore[l];
    ids_restore[n * L + l] = rank;
    mask[n * L + l] = rank >= K ? 1.0f : 0.0f;
  }
}

template <int THREADS, int IPT>
__global__ void __launch_bounds__(THREADS, 1)
    random_masking_kernel(const void* noise, NoiseType dtype, int L, int K, int64_t* ids_keep,
                          int64_t* ids_restore, float* mask) {
  __shared__ typename Tile<THREADS, IPT>::Shared smem;
  const int64_t n = blockIdx.x;
  mask_sample<THREADS, IPT>(NoiseKeys{noise, dtype, n * L}, n, L, K, ids_keep, ids_restore, mask, smem);
}

template <int THREADS, int IPT>
__global__ void __launch_bounds__(THREADS, 1)
    random_masking_philox_kernel(const int64_t* seed_step, int L, int K, int64_t* ids_keep, int64_t* ids_restore,
                                 float* mask) {
  __shared__ typename Tile<THREADS, IPT>::Shared smem;
  const int64_t n = blockIdx.x;
  const uint64_t seed = static_cast<uint64_t>(seed_step[0]);
  const PhiloxKeys keys{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                        static_cast<uint32_t>(seed_step[1]), static_cast<uint32_t>(n * L)};
  mask_sample<THREADS, IPT>(keys, n, L, K, ids_keep, ids_restore, mask, smem);
}

// Calls launch(THREADS, IPT) as integral constants for the tile that holds L patches.
template <typename Launch>
void with_tile(int64_t L, Launch&& launch) {
  if (L <= 256) {
    launch(std::integral_constant<int, 128>{}, std::integral_constant<int, 2>{});
  } else if (L <= 512) {
    launch(std::integral_constant<int, 128>{}, std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 256>{}, std::integral_constant<int, 4>{});
  }
}

NoiseType noise_type(const at::Tensor& noise) {
  switch (noise.scalar_type()) {
    case at::kFloat: return NoiseType::kFloat;
    case at::kBFloat16: return NoiseType::kBFloat16;
    case at::kHalf: return NoiseType::kHalf;
    default:
      TORCH_CHECK(false, "random_masking: noise must be float32, bfloat16 or float16, got ", noise.scalar_type());
  }
}

void check_sizes(const char* op, int64_t N, int64_t L, int64_t len_keep) {
  TORCH_CHECK(N >= 0 && N <= INT32_MAX, op, ": the number of samples must be in [0, 2^31) (one block each), got ", N);
  TORCH_CHECK(L >= 1 && L <= kMaxPatches, op, ": the CUDA kernel takes 1 <= L <= ", kMaxPatches,
              " patches (one block sorts a sample), got L=", L);
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, op, ": len_keep must be in [0, L=", L, "], got ", len_keep);
}

void check_noise(const char* op, const at::Tensor& noise, int64_t len_keep) {
  TORCH_CHECK(noise.is_cuda(), op, ": expected noise on a CUDA device, got ", noise.device());
  TORCH_CHECK(noise.dim() == 2, op, ": noise must be (N, L), got ", noise.dim(), " dimensions ", noise.sizes());
  check_sizes(op, noise.size(0), noise.size(1), len_keep);
  noise_type(noise);
}

using Masks = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Masks empty_masks(int64_t N, int64_t L, int64_t K, const at::TensorOptions& like) {
  return {at::empty({N, K}, like.dtype(at::kLong)), at::empty({N, L}, like.dtype(at::kLong)),
          at::empty({N, L}, like.dtype(at::kFloat))};
}

Masks random_masking_cuda(const at::Tensor& noise_in, int64_t len_keep) {
  check_noise("random_masking", noise_in, len_keep);
  const c10::cuda::CUDAGuard guard(noise_in.device());
  const at::Tensor noise = noise_in.contiguous();
  const int64_t N = noise.size(0), L = noise.size(1);
  at::Tensor ids_keep, ids_restore, mask;
  std::tie(ids_keep, ids_restore, mask) = empty_masks(N, L, len_keep, noise.options());
  if (N == 0) return {ids_keep, ids_restore, mask};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_tile(L, [&](auto threads, auto ipt) {
    constexpr int kThreads = decltype(threads)::value, kIpt = decltype(ipt)::value;
    random_masking_kernel<kThreads, kIpt><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        noise.data_ptr(), noise_type(noise), L, len_keep, ids_keep.data_ptr<int64_t>(),
        ids_restore.data_ptr<int64_t>(), mask.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids_keep, ids_restore, mask};
}

Masks random_masking_philox_cuda(const at::Tensor& seed_step, int64_t num_samples, int64_t num_patches,
                                 int64_t len_keep) {
  TORCH_CHECK(seed_step.is_cuda(), "random_masking_philox: expected seed_step on a CUDA device, got ",
              seed_step.device());
  TORCH_CHECK(seed_step.scalar_type() == at::kLong && seed_step.dim() == 1 && seed_step.size(0) == 2,
              "random_masking_philox: seed_step must be an int64 tensor [seed, step] of shape (2,), got ",
              seed_step.scalar_type(), " ", seed_step.sizes());
  check_sizes("random_masking_philox", num_samples, num_patches, len_keep);
  TORCH_CHECK(num_samples * num_patches <= (int64_t{1} << 32),
              "random_masking_philox: num_samples * num_patches must be <= 2^32 (the Philox counter), got ",
              num_samples * num_patches);
  const c10::cuda::CUDAGuard guard(seed_step.device());
  const at::Tensor seeds = seed_step.contiguous();
  at::Tensor ids_keep, ids_restore, mask;
  std::tie(ids_keep, ids_restore, mask) = empty_masks(num_samples, num_patches, len_keep, seed_step.options());
  if (num_samples == 0) return {ids_keep, ids_restore, mask};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_tile(num_patches, [&](auto threads, auto ipt) {
    constexpr int kThreads = decltype(threads)::value, kIpt = decltype(ipt)::value;
    random_masking_philox_kernel<kThreads, kIpt><<<static_cast<unsigned>(num_samples), kThreads, 0, stream>>>(
        seeds.data_ptr<int64_t>(), num_patches, len_keep, ids_keep.data_ptr<int64_t>(),
        ids_restore.data_ptr<int64_t>(), mask.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids_keep, ids_restore, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("random_masking_philox", &random_masking_philox_cuda);
}
