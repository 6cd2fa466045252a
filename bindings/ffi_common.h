// What the three attention FFI handlers share: reading the [..., T, H, D] layout of q
// (leading dimensions folded into the batch, so vmap's broadcast_all batching works
// unchanged), the dtype, and the checks every operand gets before a launch.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "attention_dbwd.h"  // mgd::DType
#include "xla/ffi/api/ffi.h"

namespace mgd_ffi {

namespace ffi = xla::ffi;

struct Shape {
  int64_t batch, seq, heads, head_dim;
  mgd::DType dtype;
  int64_t rows() const { return batch * heads * seq; }  // elements of an lse [..., H, T]
};

// Errors name the FFI target, so that a message reaching Python says which op refused.
class Checker {
 public:
  explicit Checker(const char* target) : target_(target) {}

  ffi::Error invalid(const std::string& what) const {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target_) + ": " + what);
  }

  ffi::Error failed(cudaError_t err) const {
    if (err == cudaSuccess) return ffi::Error::Success();
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(target_) + ": " + cudaGetErrorString(err));
  }

  // The shape and dtype of q: bf16 or fp16, rank >= 3, head_dim 64 or 128.
  ffi::Error read(const ffi::AnyBuffer& q, Shape* shape) const {
    auto dims = q.dimensions();
    if (dims.size() < 3) return invalid("q must have rank >= 3 [..., T, H, D]");
    const int64_t n = dims.size();
    shape->seq = dims[n - 3];
    shape->heads = dims[n - 2];
    shape->head_dim = dims[n - 1];
    shape->batch = 1;
    for (int64_t i = 0; i < n - 3; ++i) shape->batch *= dims[i];
    switch (q.element_type()) {
      case ffi::DataType::BF16: shape->dtype = mgd::DType::kBFloat16; break;
      case ffi::DataType::F16: shape->dtype = mgd::DType::kFloat16; break;
      default: return invalid("q must be bfloat16 or float16");
    }
    if (shape->head_dim != 64 && shape->head_dim != 128) return invalid("head_dim must be 64 or 128");
    if (shape->seq <= 0 || shape->batch <= 0 || shape->heads <= 0)
      return invalid("B, T and H must be positive");
    return ffi::Error::Success();
  }

  // Each buffer has q's dtype and size (self-attention: Tq = Tk).
  ffi::Error like_q(const ffi::AnyBuffer& q, std::initializer_list<const ffi::AnyBuffer*> xs,
                    const char* names) const {
    for (const ffi::AnyBuffer* x : xs) {
      if (x->element_type() != q.element_type() || x->element_count() != q.element_count())
        return invalid(std::string(names) + " must match q in dtype and size");
    }
    return ffi::Error::Success();
  }

  // Each buffer is float32 [..., H, T].
  ffi::Error row_stats(const Shape& shape, std::initializer_list<const ffi::AnyBuffer*> xs,
                       const char* names) const {
    for (const ffi::AnyBuffer* x : xs) {
      if (x->element_type() != ffi::DataType::F32 || x->element_count() != shape.rows())
        return invalid(std::string(names) + " must be float32 [..., H, T]");
    }
    return ffi::Error::Success();
  }

 private:
  const char* target_;
};

}  // namespace mgd_ffi
