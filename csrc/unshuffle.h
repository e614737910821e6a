// unshuffle: what csrc/unshuffle.cu and csrc/unshuffle_cpu.cpp share besides the argument checks.
#pragma once

#include <ATen/Dispatch.h>

namespace fastmae_unshuffle {

// Calls f(x_tag, wide_tag) with value-initialised objects of (x's C++ type, the wide tensor's C++
// type); the wide dtype (output, grad_out) is x's or fp32: the promotion of x with fp32/bf16/fp16 is one of the two.
template <typename F>
void dispatch_x_wide(at::ScalarType x_dtype, at::ScalarType wide_dtype, F f) {
  TORCH_CHECK(wide_dtype == x_dtype || wide_dtype == at::kFloat,
              "unshuffle: the wide dtype must be x's or float32, got ", wide_dtype, " for x ", x_dtype);
  AT_DISPATCH_SWITCH(x_dtype, "unshuffle",
                     AT_DISPATCH_CASE(at::kFloat, [&] { f(scalar_t{}, float{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       if (wide_dtype == x_dtype) f(scalar_t{}, scalar_t{}); else f(scalar_t{}, float{});
                     })
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       if (wide_dtype == x_dtype) f(scalar_t{}, scalar_t{}); else f(scalar_t{}, float{});
                     }));
}

}  // namespace fastmae_unshuffle
