// Typed XLA FFI handler of the CUDA attention forward with log-sum-exp.
//
// Inputs:  q, k, v  [..., T, H, D] bf16/fp16
// Outputs: o [..., T, H, D] (dtype of q), lse [..., H, T] f32 (natural log)
// Attrs:   causal (i32, 0/1), scale (f32, > 0)
// Leading dimensions beyond [T, H, D] are folded into the batch, so the handler
// serves vmap's broadcast_all batching unchanged.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attention_fwd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "mgd_attention_forward: " + what);
}

ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, int32_t causal,
                   float scale) {
  auto dims = q.dimensions();
  if (dims.size() < 3) return invalid("q must have rank >= 3 [..., T, H, D]");
  const int64_t n = dims.size();
  const int64_t seq = dims[n - 3], heads = dims[n - 2], head_dim = dims[n - 1];
  int64_t batch = 1;
  for (int64_t i = 0; i < n - 3; ++i) batch *= dims[i];

  mgd::DType dtype;
  switch (q.element_type()) {
    case ffi::DataType::BF16: dtype = mgd::DType::kBFloat16; break;
    case ffi::DataType::F16: dtype = mgd::DType::kFloat16; break;
    default: return invalid("q must be bfloat16 or float16");
  }
  for (const ffi::AnyBuffer* x : {&k, &v}) {
    if (x->element_type() != q.element_type() || x->element_count() != q.element_count())
      return invalid("k and v must match q in dtype and size (self-attention)");
  }
  if (o->element_type() != q.element_type() || o->element_count() != q.element_count())
    return invalid("o must match q in dtype and size");
  if (lse->element_type() != ffi::DataType::F32 || lse->element_count() != batch * heads * seq)
    return invalid("lse must be float32 [..., H, T]");
  if (head_dim != 64 && head_dim != 128) return invalid("head_dim must be 64 or 128");
  if (!(scale > 0.f)) return invalid("scale must be positive");
  if (seq <= 0 || batch <= 0 || heads <= 0) return invalid("B, T and H must be positive");
  if (batch * heads > 0x7fffffff || (seq + 127) / 128 > 65535)
    return invalid("shape too large for the launch grid");

  mgd::ForwardCall call{};
  call.dtype = dtype;
  call.batch = int(batch);
  call.seq = int(seq);
  call.heads = int(heads);
  call.head_dim = int(head_dim);
  call.scale = scale;
  call.causal = causal != 0;
  call.q = q.untyped_data();
  call.k = k.untyped_data();
  call.v = v.untyped_data();
  call.o = o->untyped_data();
  call.lse = static_cast<float*>(lse->untyped_data());

  cudaError_t err = mgd::attention_forward(call, stream);
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("mgd_attention_forward: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));
