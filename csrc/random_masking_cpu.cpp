// random_masking on CPU: the CUDA implementation's contract with at::parallel_for over samples.
//
// Each sample's noise becomes L order-preserving uint32 keys (every NaN -> 0xFFFFFFFF, after +inf;
// -0.0 -> +0.0 so the two tie), as in random_masking.cu. Sorting the distinct uint64 values
// (key << 32 | l) ascending is the stable argsort of the noise (ties by index, NaN last, as
// torch.argsort(stable=True)); rank r of patch l gives ids_restore[n, l] = r, mask[n, l] = r >= K,
// ids_keep[n, r] = l for r < K. random_masking_philox draws the keys from Philox4x32-10 exactly as the
// CUDA kernel and fastmae.ops.random_masking.philox_noise_reference do (the few lines of Philox are
// repeated here: the .cu file's are device code).
// No patch limit on CPU (the CUDA kernel's is L <= 1024). Bytes moved: as the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr uint32_t kLastKey = 0xFFFFFFFFu;

// fp32, bf16, fp16 (AT_DISPATCH_FLOATING_TYPES_AND2 without its double).
#define FASTMAE_FLOAT_TYPES(...)                \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)


uint32_t sort_key(float f) {
  if (f != f) return kLastKey;  // every NaN, after +inf; NaNs tie and keep index order
  if (f == 0.0f) f = 0.0f;      // -0.0 ties with +0.0
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Philox4x32-10 (Salmon et al. 2011), first output word, as triton.language.random.philox_impl.
uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{c0} * 0xD2511F53u, p2 = uint64_t{c2} * 0xCD9E8D57u;
    const uint32_t next0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

float philox_noise(uint32_t counter, uint32_t step, uint32_t k0, uint32_t k1) {
  int32_t v = static_cast<int32_t>(philox_word0(counter, step, k0, k1));
  v = v < 0 ? ~v : v;  // tl.rand's fold to [0, 2^31)
  return static_cast<float>(v) * 4.6566127342e-10f;  // fp32 product, as the reference
}

// order[r] = (key << 32 | l) of the patch of rank r; writes sample n's ids_keep, ids_restore, mask.
void write_ranks(std::vector<uint64_t>& order, int64_t n, int64_t L, int64_t K, int64_t* ids_keep,
                 int64_t* ids_restore, float* mask) {
  std::sort(order.begin(), order.end());  // distinct values: the stable order of the keys
  for (int64_t r = 0; r < L; ++r) {
    const int64_t l = static_cast<int64_t>(order[r] & 0xFFFFFFFFu);
    ids_restore[n * L + l] = r;
    mask[n * L + l] = r >= K ? 1.0f : 0.0f;
    if (r < K) ids_keep[n * K + r] = l;
  }
}

using Masks = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Masks empty_masks(int64_t N, int64_t L, int64_t K, const at::TensorOptions& like) {
  return {at::empty({N, K}, like.dtype(at::kLong)), at::empty({N, L}, like.dtype(at::kLong)),
          at::empty({N, L}, like.dtype(at::kFloat))};
}

void check_sizes(const char* op, int64_t N, int64_t L, int64_t len_keep) {
  TORCH_CHECK(N >= 0, op, ": the number of samples must be >= 0, got ", N);
  TORCH_CHECK(L >= 1 && L <= INT32_MAX, op, ": the number of patches must be in [1, 2^31), got L=", L);
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, op, ": len_keep must be in [0, L=", L, "], got ", len_keep);
}

void check_noise(const char* op, const at::Tensor& noise, int64_t len_keep) {
  TORCH_CHECK(noise.device().is_cpu(), op, ": expected noise on the CPU, got ", noise.device());
  TORCH_CHECK(noise.dim() == 2, op, ": noise must be (N, L), got ", noise.dim(), " dimensions ", noise.sizes());
  const auto t = noise.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": noise must be float32, bfloat16 or float16, got ", t);
  check_sizes(op, noise.size(0), noise.size(1), len_keep);
}

// Grain of at::parallel_for: about 32 Ki elements of work per chunk.
int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

// Ranks each sample of `noise` (contiguous).
Masks mask_samples(const at::Tensor& noise, int64_t K) {
  const int64_t N = noise.size(0), L = noise.size(1);
  auto [ids_keep, ids_restore, mask] = empty_masks(N, L, K, noise.options());
  int64_t* keep = ids_keep.data_ptr<int64_t>();
  int64_t* restore = ids_restore.data_ptr<int64_t>();
  float* removed = mask.data_ptr<float>();
  AT_DISPATCH_SWITCH(noise.scalar_type(), "random_masking_cpu", FASTMAE_FLOAT_TYPES([&] {
    const scalar_t* data = noise.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(L), [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> order(L);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t l = 0; l < L; ++l) {
          order[l] = uint64_t{sort_key(static_cast<float>(data[n * L + l]))} << 32 | static_cast<uint64_t>(l);
        }
        write_ranks(order, n, L, K, keep, restore, removed);
      }
    });
  }));
  return {ids_keep, ids_restore, mask};
}

Masks random_masking_cpu(const at::Tensor& noise, int64_t len_keep) {
  check_noise("random_masking", noise, len_keep);
  return mask_samples(noise.contiguous(), len_keep);
}

Masks random_masking_philox_cpu(const at::Tensor& seed_step, int64_t num_samples, int64_t num_patches,
                                int64_t len_keep) {
  TORCH_CHECK(seed_step.device().is_cpu(), "random_masking_philox: expected seed_step on the CPU, got ",
              seed_step.device());
  TORCH_CHECK(seed_step.scalar_type() == at::kLong && seed_step.dim() == 1 && seed_step.size(0) == 2,
              "random_masking_philox: seed_step must be an int64 tensor [seed, step] of shape (2,), got ",
              seed_step.scalar_type(), " ", seed_step.sizes());
  check_sizes("random_masking_philox", num_samples, num_patches, len_keep);
  TORCH_CHECK(num_samples * num_patches <= (int64_t{1} << 32),
              "random_masking_philox: num_samples * num_patches must be <= 2^32 (the Philox counter), got ",
              num_samples * num_patches);
  const at::Tensor seeds = seed_step.contiguous();
  const uint64_t seed = static_cast<uint64_t>(seeds.data_ptr<int64_t>()[0]);
  const uint32_t step = static_cast<uint32_t>(seeds.data_ptr<int64_t>()[1]);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t N = num_samples, L = num_patches, K = len_keep;
  auto [ids_keep, ids_restore, mask] = empty_masks(N, L, K, seed_step.options());
  int64_t* keep = ids_keep.data_ptr<int64_t>();
  int64_t* restore = ids_restore.data_ptr<int64_t>();
  float* removed = mask.data_ptr<float>();
  at::parallel_for(0, N, grain(L * 16), [&](int64_t begin, int64_t end) {  // ~16x the work of a load per key
    std::vector<uint64_t> order(L);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t l = 0; l < L; ++l) {
        const uint32_t counter = static_cast<uint32_t>(n * L + l);  // < 2^32
        order[l] = uint64_t{sort_key(philox_noise(counter, step, k0, k1))} << 32 | static_cast<uint64_t>(l);
      }
      write_ranks(order, n, L, K, keep, restore, removed);
    }
  });
  return {ids_keep, ids_restore, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_philox", &random_masking_philox_cpu);
}

// No gradient: ids_keep and ids_restore are integers and mask is a constant 0/1 pattern (the reference's
// argsort gives noise no gradient either). Falling through the Autograd key runs the kernels below it,
// so the outputs never require grad, whatever the noise (the CUDA and CPU implementations alike).
TORCH_LIBRARY_IMPL(fastmae_C, Autograd, m) {
  m.impl("random_masking", torch::CppFunction::makeFallthrough());
  m.impl("random_masking_philox", torch::CppFunction::makeFallthrough());
}
