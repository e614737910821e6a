// random_masking on CPU: the CUDA implementation's contract with at::parallel_for over samples.
//
// Each sample's noise becomes L order-preserving uint32 keys (every NaN -> 0xFFFFFFFF, after +inf;
// -0.0 -> +0.0 so the two tie), as in random_masking.cu. Sorting the distinct uint64 values
// (key << 32 | l) ascending is the stable argsort of the noise (ties by index, NaN last, as
// torch.argsort(stable=True)); rank r of patch l gives ids_restore[n, l] = r, mask[n, l] = r >= K,
// ids_keep[n, r] = l for r < K. random_masking_gather then copies
// x_masked[n, k] = x[n, ids_keep[n, k]] + pos_embed[0, 1 + ids_keep[n, k]] (fp32 sum, one rounding to
// the output dtype: x's, or fp32 when pos_embed is fp32 and x bf16/fp16). random_masking_philox draws
// the keys from Philox4x32-10 exactly as the CUDA kernel and fastmae.ops.random_masking.
// philox_noise_reference do (the few lines of Philox are repeated here: the .cu file's are device code).
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
#include <type_traits>
#include <vector>

// The x and pos_embed checks of random_masking_gather (noise (N, L) already checked), shared with
// csrc/random_masking.cu: x (N, L, D) and pos_embed (1, L+1, D), x in fp32/bf16/fp16, pos_embed in
// x's dtype or fp32.
void random_masking_check_gather(const char* op, const at::Tensor& noise_in, const at::Tensor& x_in,
                                 const at::Tensor& pos_in) {
  const int64_t N = noise_in.size(0), L = noise_in.size(1);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(0) == N && x_in.size(1) == L, op, ": x must be (N, L, D) = (", N, ", ",
              L, ", D), got ", x_in.sizes());
  const int64_t D = x_in.size(2);
  TORCH_CHECK(pos_in.dim() == 3 && pos_in.size(0) == 1 && pos_in.size(1) == L + 1 && pos_in.size(2) == D, op,
              ": pos_embed must be (1, L+1, D) = (1, ", L + 1, ", ", D, "), got ", pos_in.sizes());
  const auto x_type = x_in.scalar_type(), pos_type = pos_in.scalar_type();
  TORCH_CHECK(x_type == at::kFloat || x_type == at::kBFloat16 || x_type == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", x_type);
  TORCH_CHECK(pos_type == x_type || pos_type == at::kFloat, op, ": pos_embed must have x's dtype (", x_type,
              ") or float32, got ", pos_type);
}

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
  TORCH_CHECK(len_keep >= 1 && len_keep <= L, op, ": len_keep must be in [1, L=", L, "], got ", len_keep);
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

// Ranks each sample of `noise` (contiguous) and calls after(n, order) with the sample's sorted order.
template <typename After>
Masks mask_samples(const at::Tensor& noise, int64_t K, int64_t grain_size, After&& after) {
  const int64_t N = noise.size(0), L = noise.size(1);
  auto [ids_keep, ids_restore, mask] = empty_masks(N, L, K, noise.options());
  int64_t* keep = ids_keep.data_ptr<int64_t>();
  int64_t* restore = ids_restore.data_ptr<int64_t>();
  float* removed = mask.data_ptr<float>();
  AT_DISPATCH_SWITCH(noise.scalar_type(), "random_masking_cpu", FASTMAE_FLOAT_TYPES([&] {
    const scalar_t* data = noise.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_size, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> order(L);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t l = 0; l < L; ++l) {
          order[l] = uint64_t{sort_key(static_cast<float>(data[n * L + l]))} << 32 | static_cast<uint64_t>(l);
        }
        write_ranks(order, n, L, K, keep, restore, removed);
        after(n, order);
      }
    });
  }));
  return {ids_keep, ids_restore, mask};
}

Masks random_masking_cpu(const at::Tensor& noise, int64_t len_keep) {
  check_noise("random_masking", noise, len_keep);
  return mask_samples(noise.contiguous(), len_keep, grain(noise.size(1)), [](int64_t, const std::vector<uint64_t>&) {});
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

// x_masked[n, k] = x[n, l] + pos_embed[0, 1 + l] for the patch l of rank k < K.
template <typename x_t, typename pos_t>
Masks gather_samples(const at::Tensor& noise, int64_t K, const at::Tensor& x, const at::Tensor& pos_embed,
                     at::Tensor& x_masked) {
  using out_t = std::conditional_t<std::is_same_v<x_t, pos_t>, x_t, float>;
  const int64_t L = x.size(1), D = x.size(2);
  const x_t* xs = x.data_ptr<x_t>();
  const pos_t* pos = pos_embed.data_ptr<pos_t>() + D;  // row 1 + l is patch l's
  out_t* out = x_masked.data_ptr<out_t>();
  return mask_samples(noise, K, grain(L + K * D), [&](int64_t n, const std::vector<uint64_t>& order) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = static_cast<int64_t>(order[k] & 0xFFFFFFFFu);
      const x_t* x_row = xs + (n * L + l) * D;
      const pos_t* pos_row = pos + l * D;
      out_t* out_row = out + (n * K + k) * D;
      for (int64_t d = 0; d < D; ++d) {
        out_row[d] = static_cast<out_t>(static_cast<float>(x_row[d]) + static_cast<float>(pos_row[d]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_gather_cpu(const at::Tensor& noise_in,
                                                                                     int64_t len_keep,
                                                                                     const at::Tensor& x_in,
                                                                                     const at::Tensor& pos_in) {
  const char* op = "random_masking_gather";
  check_noise(op, noise_in, len_keep);
  TORCH_CHECK(x_in.device().is_cpu() && pos_in.device().is_cpu(), op,
              ": noise, x and pos_embed must all be on the CPU, got ", noise_in.device(), ", ", x_in.device(), ", ",
              pos_in.device());
  random_masking_check_gather(op, noise_in, x_in, pos_in);
  const int64_t N = noise_in.size(0), L = noise_in.size(1), D = x_in.size(2);
  const auto x_type = x_in.scalar_type(), pos_type = pos_in.scalar_type();
  const at::Tensor noise = noise_in.contiguous(), x = x_in.contiguous(), pos_embed = pos_in.contiguous();
  at::Tensor x_masked = at::empty({N, len_keep, D}, x.options().dtype(pos_type == x_type ? x_type : at::kFloat));
  Masks masks;
  AT_DISPATCH_SWITCH(x_type, "random_masking_gather_cpu", FASTMAE_FLOAT_TYPES([&] {
    masks = pos_type == x_type ? gather_samples<scalar_t, scalar_t>(noise, len_keep, x, pos_embed, x_masked)
                               : gather_samples<scalar_t, float>(noise, len_keep, x, pos_embed, x_masked);
  }));
  auto& [ids_keep, ids_restore, mask] = masks;
  return {ids_keep, ids_restore, mask, x_masked};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_philox", &random_masking_philox_cpu);
  m.impl("random_masking_gather", &random_masking_gather_cpu);
}

// No gradient: ids_keep and ids_restore are integers and mask is a constant 0/1 pattern (the reference's
// argsort gives noise no gradient either). Falling through the Autograd key runs the kernels below it,
// so the outputs never require grad, whatever the noise (the CUDA and CPU implementations alike).
// random_masking_gather's autograd (grad_x) is registered from Python (fastmae/ops/random_masking.py).
TORCH_LIBRARY_IMPL(fastmae, Autograd, m) {
  m.impl("random_masking", torch::CppFunction::makeFallthrough());
  m.impl("random_masking_philox", torch::CppFunction::makeFallthrough());
}
