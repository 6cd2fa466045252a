// Typed XLA FFI handler of the CUDA attention double backward.
//
// Inputs:  q, k, v, o, do, ddq, ddk, ddv  [..., T, H, D] bf16/fp16, lse [..., H, T] f32
// Outputs: gq, gk, gv, gdo  [..., T, H, D], workspace  u8[...] (row statistics)
// Attrs:   causal (i32, 0/1), scale (f32)
// Leading dimensions beyond [T, H, D] are folded into the batch, so the handler
// serves vmap's broadcast_all batching unchanged.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attention_dbwd.h"
#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace {

const mgd_ffi::Checker check("mgd_attention_double_backward");

ffi::Error DoubleBackward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer do_,
                          ffi::AnyBuffer ddq, ffi::AnyBuffer ddk, ffi::AnyBuffer ddv,
                          ffi::AnyBuffer lse, ffi::Result<ffi::AnyBuffer> gq,
                          ffi::Result<ffi::AnyBuffer> gk, ffi::Result<ffi::AnyBuffer> gv,
                          ffi::Result<ffi::AnyBuffer> gdo,
                          ffi::Result<ffi::AnyBuffer> workspace, int32_t causal, float scale) {
  mgd_ffi::Shape shape;
  if (auto e = check.read(q, &shape); e.failure()) return e;
  if (auto e = check.like_q(q, {&k, &v, &o, &do_, &ddq, &ddk, &ddv}, "k, v, o, do, ddq, ddk, ddv");
      e.failure())
    return e;
  if (auto e = check.row_stats(shape, {&lse}, "lse"); e.failure()) return e;
  if (shape.seq > (int64_t(1) << 30) || shape.batch > 65535 || shape.heads > 65535)
    return check.invalid("shape too large for the launch grid");
  const int64_t batch = shape.batch, seq = shape.seq, heads = shape.heads, head_dim = shape.head_dim;
  const mgd::DType dtype = shape.dtype;
  const size_t need = mgd::double_backward_workspace_bytes(int(batch), int(seq), int(heads));
  if (workspace->size_bytes() < need) return check.invalid("workspace too small");

  mgd::DoubleBackwardCall call{};
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
  call.o = o.untyped_data();
  call.do_ = do_.untyped_data();
  call.ddq = ddq.untyped_data();
  call.ddk = ddk.untyped_data();
  call.ddv = ddv.untyped_data();
  call.lse = static_cast<const float*>(lse.untyped_data());
  call.gq = gq->untyped_data();
  call.gk = gk->untyped_data();
  call.gv = gv->untyped_data();
  call.gdo = gdo->untyped_data();
  call.workspace = workspace->untyped_data();

  return check.failed(mgd::double_backward(call, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionDoubleBackward, DoubleBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::AnyBuffer>()  // do
                                  .Arg<ffi::AnyBuffer>()  // ddq
                                  .Arg<ffi::AnyBuffer>()  // ddk
                                  .Arg<ffi::AnyBuffer>()  // ddv
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // gq
                                  .Ret<ffi::AnyBuffer>()  // gk
                                  .Ret<ffi::AnyBuffer>()  // gv
                                  .Ret<ffi::AnyBuffer>()  // gdo
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

// Workspace bytes for a call, for the Python side to size the workspace output.
extern "C" size_t MgdDoubleBackwardWorkspaceBytes(int batch, int seq, int heads) {
  return mgd::double_backward_workspace_bytes(batch, seq, heads);
}
