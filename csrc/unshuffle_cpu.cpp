// unshuffle on CPU (fastmae::unshuffle, fastmae::unshuffle_backward), and the argument checks that
// csrc/unshuffle.cu shares (unshuffle_check_forward / unshuffle_check_backward, declared there).
//
// Contract (fastmae/ops/unshuffle.py, unshuffle_reference): x (N, 1+K, Dd) cls first then the kept
// tokens in ids_keep order; ids_restore (N, L) int64 or int32, a permutation of 0..L-1 (value < K:
// kept token x[:, 1+value]; >= K: the mask token); mask_token (1, 1, Dd); pos_embed (1, L+1, Dd).
// out (N, L+1, Dd): row 0 = x[:, 0] + pos[0], row 1+l = source(l) + pos[1+l], in the reference's
// promoted dtype promote(promote(x, mask_token), pos), which is x's dtype or fp32. Loads are widened
// to fp32, added in fp32 and rounded once: bit-identical to the reference's cat + add.
//
// Forward: at::parallel_for over the N*(L+1) output rows; each output element is written once.
// mask_token and pos_embed are first converted to the output dtype (exact: it is the wider type;
// a no-op except for unusual dtype mixes), so the loops are templated on (x dtype, out dtype) only.
// Backward: at::parallel_for over samples. A sample's cls row and kept rows of grad_out are copied
// (cast to x_dtype) to their rows of grad_x -- each row once, as ids_restore is a permutation -- and
// its removed rows are summed, in row order, into one fp32 partial row per sample; then the N partial
// rows are summed in sample order per column. The mask-token gradient is thus the same whatever the
// number of threads (a fixed order, no atomics).
//
// Bytes moved (e_x, e_o, e_g, e_t: element sizes of x, output, grad_out, mask_token; ids int64):
//   forward  = N*(1+K)*Dd*e_x + N*L*8 + N*(L+1)*Dd*e_o + (L+1)*Dd*e_o + Dd*e_o
//   backward = N*(L+1)*Dd*e_g + N*L*8 + N*(1+K)*Dd*e_x + 2*N*Dd*4 + Dd*e_t
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "unshuffle.h"

namespace {

bool is_fastmae_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_float_dtype(const char* what, at::ScalarType t) {
  TORCH_CHECK(is_fastmae_float(t), "unshuffle: ", what, " must be float32, bfloat16 or float16, got ", t);
}

void check_ids(const at::Tensor& ids_restore, int64_t n) {
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == n, "unshuffle: ids_restore must have shape (N=", n,
              ", L), got ", ids_restore.sizes());
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong || ids_restore.scalar_type() == at::kInt,
              "unshuffle: ids_restore must be int64 or int32, got ", ids_restore.scalar_type());
}

// rows of at least ~32K elements per task: parallel_for's grain, in rows of width dd
int64_t grain_rows(int64_t dd) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(dd, 1));
}


template <typename xt, typename ot>
void unshuffle_forward_cpu_kernel(const xt* x, const int64_t* ids, const ot* tok, const ot* pos, ot* out, int64_t n,
                                  int64_t keep, int64_t patches, int64_t dd) {
  at::parallel_for(0, n * (patches + 1), grain_rows(dd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / (patches + 1), j = r % (patches + 1);  // sample, output row (0 = cls)
      const ot* p = pos + j * dd;
      ot* o = out + r * dd;
      int64_t src = 0;  // row of x, or -1: the mask token
      if (j > 0) {
        const int64_t id = ids[s * patches + j - 1];
        TORCH_CHECK(id >= 0 && id < patches, "unshuffle: ids_restore values must lie in [0, L=", patches, "), got ",
                    id);
        src = id < keep ? 1 + id : -1;
      }
      if (src >= 0) {
        const xt* xr = x + (s * (keep + 1) + src) * dd;
        for (int64_t d = 0; d < dd; ++d) o[d] = static_cast<ot>(static_cast<float>(xr[d]) + static_cast<float>(p[d]));
      } else {
        for (int64_t d = 0; d < dd; ++d) o[d] = static_cast<ot>(static_cast<float>(tok[d]) + static_cast<float>(p[d]));
      }
    }
  });
}

template <typename xt, typename gt>
void unshuffle_backward_cpu_kernel(const gt* g, const int64_t* ids, xt* gx, float* partial, int64_t n, int64_t keep,
                                   int64_t patches, int64_t dd) {
  const int64_t grain = std::max<int64_t>(1, grain_rows(dd) / (patches + 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* acc = partial + s * dd;
      std::fill(acc, acc + dd, 0.0f);
      for (int64_t j = 0; j <= patches; ++j) {
        const gt* gr = g + (s * (patches + 1) + j) * dd;
        int64_t dst = 0;  // row of grad_x, or -1: a removed row, summed into the mask token's gradient
        if (j > 0) {
          const int64_t id = ids[s * patches + j - 1];
          TORCH_CHECK(id >= 0 && id < patches, "unshuffle_backward: ids_restore values must lie in [0, L=", patches,
                      "), got ", id);
          dst = id < keep ? 1 + id : -1;
        }
        if (dst >= 0) {
          xt* o = gx + (s * (keep + 1) + dst) * dd;
          for (int64_t d = 0; d < dd; ++d) o[d] = static_cast<xt>(static_cast<float>(gr[d]));
        } else {
          for (int64_t d = 0; d < dd; ++d) acc[d] += static_cast<float>(gr[d]);
        }
      }
    }
  });
}

template <typename tt>
void sum_partials_cpu(const float* partial, tt* out, int64_t n, int64_t dd) {
  at::parallel_for(0, dd, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      float acc = 0.0f;
      for (int64_t s = 0; s < n; ++s) acc += partial[s * dd + d];  // sample order: fixed
      out[d] = static_cast<tt>(acc);
    }
  });
}

}  // namespace

// Shared with csrc/unshuffle.cu. Checks shapes, dtypes and devices; returns the output dtype.
at::ScalarType unshuffle_check_forward(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                                       const at::Tensor& pos_embed) {
  TORCH_CHECK(x.dim() == 3, "unshuffle: x must have shape (N, 1+K, Dd), got ", x.sizes());
  check_float_dtype("x", x.scalar_type());
  const int64_t n = x.size(0), dd = x.size(2);
  check_ids(ids_restore, n);
  const int64_t patches = ids_restore.size(1);
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= patches + 1, "unshuffle: x must hold cls plus 0..L=", patches,
              " kept tokens, got ", x.size(1), " tokens");
  TORCH_CHECK(mask_token.dim() == 3 && mask_token.size(0) == 1 && mask_token.size(1) == 1 && mask_token.size(2) == dd,
              "unshuffle: mask_token must have shape (1, 1, Dd=", dd, "), got ", mask_token.sizes());
  check_float_dtype("mask_token", mask_token.scalar_type());
  TORCH_CHECK(pos_embed.dim() == 3 && pos_embed.size(0) == 1 && pos_embed.size(1) == patches + 1 &&
                  pos_embed.size(2) == dd,
              "unshuffle: pos_embed must have shape (1, L+1=", patches + 1, ", Dd=", dd, "), got ", pos_embed.sizes());
  check_float_dtype("pos_embed", pos_embed.scalar_type());
  TORCH_CHECK(ids_restore.device() == x.device() && mask_token.device() == x.device() &&
                  pos_embed.device() == x.device(),
              "unshuffle: all tensors must be on one device, got x on ", x.device(), ", ids_restore on ",
              ids_restore.device(), ", mask_token on ", mask_token.device(), ", pos_embed on ", pos_embed.device());
  return c10::promoteTypes(c10::promoteTypes(x.scalar_type(), mask_token.scalar_type()), pos_embed.scalar_type());
}

// Shared with csrc/unshuffle.cu.
void unshuffle_check_backward(const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t len_keep,
                              at::ScalarType x_dtype, at::ScalarType mask_token_dtype) {
  TORCH_CHECK(grad_out.dim() == 3, "unshuffle_backward: grad_out must have shape (N, L+1, Dd), got ", grad_out.sizes());
  check_float_dtype("grad_out", grad_out.scalar_type());
  check_float_dtype("x_dtype", x_dtype);
  check_float_dtype("mask_token_dtype", mask_token_dtype);
  check_ids(ids_restore, grad_out.size(0));
  const int64_t patches = ids_restore.size(1);
  TORCH_CHECK(grad_out.size(1) == patches + 1, "unshuffle_backward: grad_out must have L+1=", patches + 1,
              " rows (ids_restore is (N, L)), got shape ", grad_out.sizes());
  TORCH_CHECK(len_keep >= 0 && len_keep <= patches, "unshuffle_backward: len_keep must lie in [0, L=", patches,
              "], got ", len_keep);
  TORCH_CHECK(ids_restore.device() == grad_out.device(), "unshuffle_backward: grad_out and ids_restore must be on one "
              "device, got ", grad_out.device(), " and ", ids_restore.device());
}

namespace {

at::Tensor unshuffle_cpu(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                         const at::Tensor& pos_embed) {
  const at::ScalarType out_dtype = unshuffle_check_forward(x, ids_restore, mask_token, pos_embed);
  TORCH_CHECK(x.device().is_cpu(), "unshuffle (CPU implementation): tensors must be on the CPU, got ", x.device());
  const int64_t n = x.size(0), keep = x.size(1) - 1, dd = x.size(2), patches = ids_restore.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  const at::Tensor tok = mask_token.to(out_dtype).contiguous();
  const at::Tensor pos = pos_embed.to(out_dtype).contiguous();
  at::Tensor out = at::empty({n, patches + 1, dd}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  fastmae_unshuffle::dispatch_x_wide(x.scalar_type(), out_dtype, [&](auto x_tag, auto out_tag) {
    using xt = decltype(x_tag);
    using ot = decltype(out_tag);
    unshuffle_forward_cpu_kernel<xt, ot>(xc.const_data_ptr<xt>(), ids.const_data_ptr<int64_t>(),
                                         tok.const_data_ptr<ot>(), pos.const_data_ptr<ot>(), out.mutable_data_ptr<ot>(),
                                         n, keep, patches, dd);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unshuffle_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_restore,
                                                          int64_t len_keep, at::ScalarType x_dtype,
                                                          at::ScalarType mask_token_dtype) {
  unshuffle_check_backward(grad_out, ids_restore, len_keep, x_dtype, mask_token_dtype);
  TORCH_CHECK(grad_out.device().is_cpu(), "unshuffle_backward (CPU implementation): tensors must be on the CPU, got ",
              grad_out.device());
  const int64_t n = grad_out.size(0), patches = ids_restore.size(1), dd = grad_out.size(2);
  at::Tensor g = grad_out.contiguous();
  if (g.scalar_type() != x_dtype && g.scalar_type() != at::kFloat) g = g.to(at::kFloat);  // exact: wider
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  at::Tensor grad_x = at::empty({n, len_keep + 1, dd}, grad_out.options().dtype(x_dtype));
  at::Tensor partial = at::empty({n, dd}, grad_out.options().dtype(at::kFloat));  // (N, Dd) per-sample sums
  at::Tensor grad_tok = at::empty({1, 1, dd}, grad_out.options().dtype(mask_token_dtype));
  if (n > 0 && dd > 0) {
    fastmae_unshuffle::dispatch_x_wide(x_dtype, g.scalar_type(), [&](auto x_tag, auto g_tag) {
      using xt = decltype(x_tag);
      using gt = decltype(g_tag);
      unshuffle_backward_cpu_kernel<xt, gt>(g.const_data_ptr<gt>(), ids.const_data_ptr<int64_t>(),
                                            grad_x.mutable_data_ptr<xt>(), partial.mutable_data_ptr<float>(), n,
                                            len_keep, patches, dd);
    });
  }
  if (dd > 0) {
    const float* partial_p = partial.const_data_ptr<float>();
    AT_DISPATCH_SWITCH(
        mask_token_dtype, "unshuffle_backward_cpu",
        AT_DISPATCH_CASE(at::kFloat, [&] { sum_partials_cpu(partial_p, grad_tok.mutable_data_ptr<scalar_t>(), n, dd); })
        AT_DISPATCH_CASE(at::kBFloat16,
                         [&] { sum_partials_cpu(partial_p, grad_tok.mutable_data_ptr<scalar_t>(), n, dd); })
        AT_DISPATCH_CASE(at::kHalf,
                         [&] { sum_partials_cpu(partial_p, grad_tok.mutable_data_ptr<scalar_t>(), n, dd); }));
  }
  return {grad_x, grad_tok};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_C, CPU, m) {
  m.impl("unshuffle", &unshuffle_cpu);
  m.impl("unshuffle_backward", &unshuffle_backward_cpu);
}
