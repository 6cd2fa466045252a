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
#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace {

const mgd_ffi::Checker check("mgd_attention_forward");

ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, int32_t causal,
                   float scale) {
  mgd_ffi::Shape shape;
  if (auto e = check.read(q, &shape); e.failure()) return e;
  if (auto e = check.like_q(q, {&k, &v, &*o}, "k, v and o"); e.failure()) return e;
  if (auto e = check.row_stats(shape, {&*lse}, "lse"); e.failure()) return e;
  if (!(scale > 0.f)) return check.invalid("scale must be positive");
  if (shape.batch * shape.heads > 0x7fffffff || (shape.seq + 127) / 128 > 65535)
    return check.invalid("shape too large for the launch grid");
  const int64_t batch = shape.batch, seq = shape.seq, heads = shape.heads, head_dim = shape.head_dim;
  const mgd::DType dtype = shape.dtype;

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

  return check.failed(mgd::attention_forward(call, stream));
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
