// masked_mse on CPU, and the argument checks shared with the CUDA implementation (masked_mse.cu).
//
// The same contract as the CUDA kernels and the reference (fastmae/ops/masked_mse.py): pred (N, L, P),
// imgs (N, C, H, W), mask (N, L) float weights; patch l of sample n is read straight from imgs
// (element j = (i*p + q)*C + c is imgs[n, c, r*p + i, col*p + q], r = l / (W/p), col = l % (W/p)),
// only patches with mask != 0 are read. at::parallel_for over the N*L patches: each patch gathers its
// target into a per-chunk fp32 buffer, takes the mean and the unbiased variance in two passes
// (norm_pix), and writes m * mean((pred - t)^2) to its own slot; the slots and the mask are then
// added in patch order. Accumulation is in double (at least the fp32 the contract asks for), and
// the result depends neither on the number of threads nor on the run. The backward recomputes the
// target (see masked_mse.cu for the bytes-moved argument) and writes every row of the gradient:
// (pred - t) * m * 2 * grad_loss / (P * sum(mask)), zero on kept rows, NaN when sum(mask) == 0.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTMAE_DISPATCH_FLOAT3(TYPE, NAME, ...)                                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                     \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

using Named = std::pair<const char*, const at::Tensor*>;

bool is_float3(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// One element of a 0-dim or strided fp32/bf16/fp16 CPU tensor, as double.
double read_as_double(const at::Tensor& t, int64_t offset) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return static_cast<float>(t.const_data_ptr<c10::BFloat16>()[offset]);
    case at::kHalf:
      return static_cast<float>(t.const_data_ptr<c10::Half>()[offset]);
    default:
      return t.const_data_ptr<float>()[offset];
  }
}

}  // namespace

// Shapes and dtypes of masked_mse's and masked_mse_backward's shared arguments (devices: each backend).
void fastmae_masked_mse_check(const char* op, const at::Tensor& pred, const at::Tensor& imgs,
                              const at::Tensor& mask, int64_t patch_size) {
  TORCH_CHECK(imgs.dim() == 4, op, ": imgs must be (N, C, H, W), got shape ", imgs.sizes());
  TORCH_CHECK(pred.dim() == 3, op, ": pred must be (N, L, P), got shape ", pred.sizes());
  TORCH_CHECK(mask.dim() == 2, op, ": mask must be (N, L), got shape ", mask.sizes());
  for (const auto& [name, t] : {Named{"pred", &pred}, Named{"imgs", &imgs}, Named{"mask", &mask}}) {
    TORCH_CHECK(is_float3(t->scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
                t->scalar_type());
  }
  const int64_t n = imgs.size(0), c = imgs.size(1), h = imgs.size(2), w = imgs.size(3);
  TORCH_CHECK(patch_size >= 1 && h % patch_size == 0 && w % patch_size == 0, op,
              ": patch_size must be a positive int dividing H = ", h, " and W = ", w, ", got ", patch_size);
  const int64_t num_patches = (h / patch_size) * (w / patch_size);
  const int64_t p_len = patch_size * patch_size * c;
  TORCH_CHECK(pred.size(0) == n && pred.size(1) == num_patches && pred.size(2) == p_len, op,
              ": pred must have shape (", n, ", ", num_patches, ", ", p_len, ") = (N, L, p*p*C) for imgs of shape ",
              imgs.sizes(), " and patch_size ", patch_size, ", got ", pred.sizes());
  TORCH_CHECK(mask.size(0) == n && mask.size(1) == num_patches, op, ": mask must have shape (", n, ", ",
              num_patches, ") = (N, L), got ", mask.sizes());
}

void fastmae_masked_mse_check_backward(const at::Tensor& grad_loss, const at::Tensor& mask_sum) {
  TORCH_CHECK(grad_loss.dim() == 0 && is_float3(grad_loss.scalar_type()),
              "masked_mse_backward: grad_loss must be a 0-dim float32/bfloat16/float16 tensor, got shape ",
              grad_loss.sizes(), " ", grad_loss.scalar_type());
  TORCH_CHECK(mask_sum.dim() == 0 && mask_sum.scalar_type() == at::kFloat,
              "masked_mse_backward: mask_sum must be a 0-dim float32 tensor (masked_mse's second output), got shape ",
              mask_sum.sizes(), " ", mask_sum.scalar_type());
}

// The reference's loss dtype: the promotion of the three dtypes.
at::ScalarType fastmae_masked_mse_loss_dtype(const at::Tensor& pred, const at::Tensor& imgs, const at::Tensor& mask) {
  return c10::promoteTypes(c10::promoteTypes(pred.scalar_type(), imgs.scalar_type()), mask.scalar_type());
}

namespace {

void check_cpu(const char* op, std::initializer_list<Named> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU): all tensors must be on the CPU, got ", name, " on ", t->device());
  }
}

struct Layout {
  int64_t n_patches, grid_w, p, c, numel;  // L, W/p, p, C, P
};

// Calls f(pred_t, imgs_t) typed pointers for the dtypes of pred and imgs.
template <typename F>
void dispatch2(const at::Tensor& pred, const at::Tensor& imgs, F&& f) {
  FASTMAE_DISPATCH_FLOAT3(pred.scalar_type(), "masked_mse_cpu", [&] {
    using pred_t = scalar_t;
    FASTMAE_DISPATCH_FLOAT3(imgs.scalar_type(), "masked_mse_cpu",
                            [&] { f(pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<scalar_t>()); });
  });
}

// diff[j] = pred[n, l, j] - target_j (normalised with norm_pix) of the patch `row`; t is scratch (P,).
template <typename TP, typename TI>
void patch_diff(const TP* pred, const TI* imgs, const at::Tensor& pred_t, const at::Tensor& imgs_t, const Layout& lay,
                int64_t row, bool norm_pix, double eps, std::vector<float>& t, std::vector<double>& diff) {
  const int64_t n = row / lay.n_patches, l = row % lay.n_patches;
  const int64_t r = l / lay.grid_w, col = l % lay.grid_w;
  const int64_t s_c = imgs_t.stride(1), s_h = imgs_t.stride(2), s_w = imgs_t.stride(3);
  const TI* base = imgs + n * imgs_t.stride(0) + r * lay.p * s_h + col * lay.p * s_w;
  int64_t j = 0;
  for (int64_t i = 0; i < lay.p; ++i) {
    for (int64_t q = 0; q < lay.p; ++q) {
      for (int64_t ch = 0; ch < lay.c; ++ch, ++j) {
        t[j] = static_cast<float>(base[ch * s_c + i * s_h + q * s_w]);
      }
    }
  }
  double mean = 0.0, rstd = 1.0;
  if (norm_pix) {
    double s = 0.0;
    for (int64_t k = 0; k < lay.numel; ++k) s += t[k];
    mean = s / static_cast<double>(lay.numel);
    double s2 = 0.0;
    for (int64_t k = 0; k < lay.numel; ++k) s2 += (t[k] - mean) * (t[k] - mean);
    const double var = s2 / static_cast<double>(lay.numel - 1);  // unbiased
    rstd = 1.0 / std::sqrt(var + eps);
  }
  const TP* x = pred + n * pred_t.stride(0) + l * pred_t.stride(1);
  const int64_t s_p = pred_t.stride(2);
  for (int64_t k = 0; k < lay.numel; ++k) {
    diff[k] = static_cast<double>(static_cast<float>(x[k * s_p])) - (t[k] - mean) * rstd;
  }
}

Layout layout(const at::Tensor& pred, const at::Tensor& imgs, int64_t patch_size) {
  return {pred.size(1), imgs.size(3) / patch_size, patch_size, imgs.size(1), pred.size(2)};
}

float mask_at(const at::Tensor& mask, const Layout& lay, int64_t row) {
  return static_cast<float>(
      read_as_double(mask, row / lay.n_patches * mask.stride(0) + row % lay.n_patches * mask.stride(1)));
}

int64_t grain(const Layout& lay) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, lay.numel)); }

std::tuple<at::Tensor, at::Tensor> masked_mse_cpu(const at::Tensor& pred, const at::Tensor& imgs,
                                                  const at::Tensor& mask, int64_t patch_size, bool norm_pix,
                                                  double eps) {
  check_cpu("masked_mse", {{"pred", &pred}, {"imgs", &imgs}, {"mask", &mask}});
  fastmae_masked_mse_check("masked_mse", pred, imgs, mask, patch_size);
  const Layout lay = layout(pred, imgs, patch_size);
  const int64_t rows = pred.size(0) * lay.n_patches;
  std::vector<double> weighted(rows, 0.0);  // m * mean((pred - t)^2) per patch
  dispatch2(pred, imgs, [&](const auto* pred_p, const auto* imgs_p) {
    at::parallel_for(0, rows, grain(lay), [&](int64_t begin, int64_t end) {
      std::vector<float> t(lay.numel);
      std::vector<double> diff(lay.numel);
      for (int64_t row = begin; row < end; ++row) {
        const float m = mask_at(mask, lay, row);
        if (m == 0.f) continue;
        patch_diff(pred_p, imgs_p, pred, imgs, lay, row, norm_pix, eps, t, diff);
        double ss = 0.0;
        for (int64_t k = 0; k < lay.numel; ++k) ss += diff[k] * diff[k];
        weighted[row] = m * (ss / static_cast<double>(lay.numel));
      }
    });
  });
  double loss_sum = 0.0, mask_sum = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    loss_sum += weighted[row];
    mask_sum += mask_at(mask, lay, row);
  }
  const at::ScalarType out_dtype = fastmae_masked_mse_loss_dtype(pred, imgs, mask);
  at::Tensor loss = at::empty({}, pred.options().dtype(out_dtype));
  at::Tensor mask_sum_t = at::empty({}, pred.options().dtype(at::kFloat));
  const float mask_sum_f = static_cast<float>(mask_sum);
  const float value = static_cast<float>(loss_sum / mask_sum);  // NaN when no patch is removed, as 0/0
  FASTMAE_DISPATCH_FLOAT3(out_dtype, "masked_mse_cpu",
                          [&] { *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value); });
  *mask_sum_t.mutable_data_ptr<float>() = mask_sum_f;
  return {loss, mask_sum_t};
}

at::Tensor masked_mse_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& mask_sum, const at::Tensor& pred,
                                   const at::Tensor& imgs, const at::Tensor& mask, int64_t patch_size, bool norm_pix,
                                   double eps) {
  check_cpu("masked_mse_backward",
            {{"pred", &pred}, {"imgs", &imgs}, {"mask", &mask}, {"grad_loss", &grad_loss}, {"mask_sum", &mask_sum}});
  fastmae_masked_mse_check("masked_mse_backward", pred, imgs, mask, patch_size);
  fastmae_masked_mse_check_backward(grad_loss, mask_sum);
  const Layout lay = layout(pred, imgs, patch_size);
  const int64_t rows = pred.size(0) * lay.n_patches;
  at::Tensor grad = at::empty(pred.sizes(), pred.options());  // (N, L, P) contiguous
  // 2 * grad_loss / (P * sum(mask)): inf or NaN when sum(mask) == 0, so m * scale is NaN on every row
  const double scale = read_as_double(grad_loss, 0) * 2.0 /
                       (static_cast<double>(lay.numel) * static_cast<double>(*mask_sum.const_data_ptr<float>()));
  dispatch2(pred, imgs, [&](const auto* pred_p, const auto* imgs_p) {
    using pred_t = std::remove_const_t<std::remove_pointer_t<decltype(pred_p)>>;
    pred_t* out = grad.mutable_data_ptr<pred_t>();
    at::parallel_for(0, rows, grain(lay), [&](int64_t begin, int64_t end) {
      std::vector<float> t(lay.numel);
      std::vector<double> diff(lay.numel);
      for (int64_t row = begin; row < end; ++row) {
        const float m = mask_at(mask, lay, row);
        if (m != 0.f) {
          patch_diff(pred_p, imgs_p, pred, imgs, lay, row, norm_pix, eps, t, diff);
        } else {
          std::fill(diff.begin(), diff.end(), 0.0);
        }
        const double coef = m * scale;
        pred_t* out_row = out + row * lay.numel;
        for (int64_t k = 0; k < lay.numel; ++k) out_row[k] = static_cast<pred_t>(static_cast<float>(diff[k] * coef));
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("masked_mse", &masked_mse_cpu);
  m.impl("masked_mse_backward", &masked_mse_backward_cpu);
}
