// Typed XLA FFI handler of the CUDA attention backward.
//
// Inputs:  q, k, v, o, do  [..., T, H, D] bf16/fp16, lse, dlse [..., H, T] f32
// Outputs: dq, dk, dv  [..., T, H, D], workspace  u8[...] (row statistics)
// Attrs:   causal (i32, 0/1), has_dlse (i32, 0/1: without it dlse is ignored),
//          deterministic (i32, 0/1), scale (f32)
// Leading dimensions beyond [T, H, D] are folded into the batch, so the handler
// serves vmap's broadcast_all batching unchanged.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attention_bwd.h"
#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace {

const mgd_ffi::Checker check("mgd_attention_backward");

ffi::Error Backward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer lse, ffi::AnyBuffer dlse,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                    int32_t causal, int32_t has_dlse, int32_t deterministic, float scale) {
  mgd_ffi::Shape shape;
  if (auto e = check.read(q, &shape); e.failure()) return e;
  if (auto e = check.like_q(q, {&k, &v, &o, &do_}, "k, v, o, do"); e.failure()) return e;
  if (auto e = check.row_stats(shape, {&lse, &dlse}, "lse and dlse"); e.failure()) return e;
  if (shape.seq > (int64_t(1) << 30) || shape.batch > 65535 || shape.heads > 65535)
    return check.invalid("shape too large for the launch grid");
  const int64_t batch = shape.batch, seq = shape.seq, heads = shape.heads, head_dim = shape.head_dim;
  const mgd::DType dtype = shape.dtype;
  const size_t need = mgd::backward_workspace_bytes(int(batch), int(seq), int(heads),
                                                    int(head_dim), deterministic != 0);
  if (workspace->size_bytes() < need) return check.invalid("workspace too small");

  mgd::BackwardCall call{};
  call.dtype = dtype;
  call.batch = int(batch);
  call.seq = int(seq);
  call.heads = int(heads);
  call.head_dim = int(head_dim);
  call.scale = scale;
  call.causal = causal != 0;
  call.deterministic = deterministic != 0;
  call.q = q.untyped_data();
  call.k = k.untyped_data();
  call.v = v.untyped_data();
  call.o = o.untyped_data();
  call.do_ = do_.untyped_data();
  call.lse = static_cast<const float*>(lse.untyped_data());
  call.dlse = has_dlse ? static_cast<const float*>(dlse.untyped_data()) : nullptr;
  call.dq = dq->untyped_data();
  call.dk = dk->untyped_data();
  call.dv = dv->untyped_data();
  call.workspace = workspace->untyped_data();

  return check.failed(mgd::backward(call, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::AnyBuffer>()  // do
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // dlse
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int32_t>("causal")
                                  .Attr<int32_t>("has_dlse")
                                  .Attr<int32_t>("deterministic")
                                  .Attr<float>("scale"));

// Workspace bytes for a call, for the Python side to size the workspace output.
extern "C" size_t MgdBackwardWorkspaceBytes(int batch, int seq, int heads, int head_dim,
                                            int deterministic) {
  return mgd::backward_workspace_bytes(batch, seq, heads, head_dim, deterministic != 0);
}
