// Typed XLA FFI handlers of the CUDA attention double backward: the whole of it in one
// call, or one call per part of the work, so that XLA drops the parts whose outputs a
// program does not use:
//
//   mgd_attention_double_backward       sweeps 1-3 -> gq, gk, gv, gdo, workspace
//   mgd_attention_double_backward_rows  sweep 1 -> gdo, workspace (row statistics)
//   mgd_attention_double_backward_kv    sweep 2 (reads the workspace) -> gk, gv
//   mgd_attention_double_backward_q     sweep 3 (reads the workspace) -> gq
//
// Inputs of each:  q, k, v, o, do, ddq, ddk, ddv  [..., T, H, D] bf16/fp16, lse [..., H, T] f32
//                  (kv and q also take the rows call's workspace)
// Attrs:           causal (i32, 0/1), scale (f32)
// Leading dimensions beyond [T, H, D] are folded into the batch, so the handlers serve
// vmap's broadcast_all batching unchanged (the workspace is folded the same way).
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attention_dbwd.h"
#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace {

const mgd_ffi::Checker check_all("mgd_attention_double_backward");
const mgd_ffi::Checker check_rows("mgd_attention_double_backward_rows");
const mgd_ffi::Checker check_kv("mgd_attention_double_backward_kv");
const mgd_ffi::Checker check_q("mgd_attention_double_backward_q");

struct Inputs {
  ffi::AnyBuffer q, k, v, o, do_, ddq, ddk, ddv, lse;
};

// Checks the inputs and the workspace size; fills everything of `call` but the outputs.
ffi::Error prepare(const mgd_ffi::Checker& check, const Inputs& in, size_t workspace_bytes,
                   int32_t causal, float scale, int sweeps, mgd::DoubleBackwardCall* call) {
  mgd_ffi::Shape shape;
  if (auto e = check.read(in.q, &shape); e.failure()) return e;
  if (auto e = check.like_q(in.q, {&in.k, &in.v, &in.o, &in.do_, &in.ddq, &in.ddk, &in.ddv},
                            "k, v, o, do, ddq, ddk, ddv");
      e.failure())
    return e;
  if (auto e = check.row_stats(shape, {&in.lse}, "lse"); e.failure()) return e;
  if (shape.seq > (int64_t(1) << 30) || shape.batch > 65535 || shape.heads > 65535)
    return check.invalid("shape too large for the launch grid");
  const size_t need =
      mgd::double_backward_workspace_bytes(int(shape.batch), int(shape.seq), int(shape.heads));
  if (workspace_bytes < need) return check.invalid("workspace too small");

  *call = mgd::DoubleBackwardCall{};
  call->dtype = shape.dtype;
  call->batch = int(shape.batch);
  call->seq = int(shape.seq);
  call->heads = int(shape.heads);
  call->head_dim = int(shape.head_dim);
  call->scale = scale;
  call->causal = causal != 0;
  call->sweeps = sweeps;
  call->q = in.q.untyped_data();
  call->k = in.k.untyped_data();
  call->v = in.v.untyped_data();
  call->o = in.o.untyped_data();
  call->do_ = in.do_.untyped_data();
  call->ddq = in.ddq.untyped_data();
  call->ddk = in.ddk.untyped_data();
  call->ddv = in.ddv.untyped_data();
  call->lse = static_cast<const float*>(in.lse.untyped_data());
  return ffi::Error::Success();
}

ffi::Error All(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
               ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer ddq, ffi::AnyBuffer ddk,
               ffi::AnyBuffer ddv, ffi::AnyBuffer lse, ffi::Result<ffi::AnyBuffer> gq,
               ffi::Result<ffi::AnyBuffer> gk, ffi::Result<ffi::AnyBuffer> gv,
               ffi::Result<ffi::AnyBuffer> gdo, ffi::Result<ffi::AnyBuffer> workspace,
               int32_t causal, float scale) {
  mgd::DoubleBackwardCall call;
  if (auto e = prepare(check_all, {q, k, v, o, do_, ddq, ddk, ddv, lse}, workspace->size_bytes(),
                       causal, scale, mgd::kAllSweeps, &call);
      e.failure())
    return e;
  if (auto e = check_all.like_q(q, {&*gq, &*gk, &*gv, &*gdo}, "gq, gk, gv and gdo"); e.failure())
    return e;
  call.gq = gq->untyped_data();
  call.gk = gk->untyped_data();
  call.gv = gv->untyped_data();
  call.gdo = gdo->untyped_data();
  call.workspace = workspace->untyped_data();
  return check_all.failed(mgd::double_backward(call, stream));
}

ffi::Error Rows(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer ddq, ffi::AnyBuffer ddk,
                ffi::AnyBuffer ddv, ffi::AnyBuffer lse, ffi::Result<ffi::AnyBuffer> gdo,
                ffi::Result<ffi::AnyBuffer> workspace, int32_t causal, float scale) {
  mgd::DoubleBackwardCall call;
  if (auto e = prepare(check_rows, {q, k, v, o, do_, ddq, ddk, ddv, lse}, workspace->size_bytes(),
                       causal, scale, mgd::kSweepRows, &call);
      e.failure())
    return e;
  if (auto e = check_rows.like_q(q, {&*gdo}, "gdo"); e.failure()) return e;
  call.gdo = gdo->untyped_data();
  call.workspace = workspace->untyped_data();
  return check_rows.failed(mgd::double_backward(call, stream));
}

ffi::Error KeysValues(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer ddq, ffi::AnyBuffer ddk,
                      ffi::AnyBuffer ddv, ffi::AnyBuffer lse, ffi::AnyBuffer workspace,
                      ffi::Result<ffi::AnyBuffer> gk, ffi::Result<ffi::AnyBuffer> gv,
                      int32_t causal, float scale) {
  mgd::DoubleBackwardCall call;
  if (auto e = prepare(check_kv, {q, k, v, o, do_, ddq, ddk, ddv, lse}, workspace.size_bytes(),
                       causal, scale, mgd::kSweepKV, &call);
      e.failure())
    return e;
  if (auto e = check_kv.like_q(q, {&*gk, &*gv}, "gk and gv"); e.failure()) return e;
  call.gk = gk->untyped_data();
  call.gv = gv->untyped_data();
  call.workspace = workspace.untyped_data();  // read only by sweep 2
  return check_kv.failed(mgd::double_backward(call, stream));
}

ffi::Error Queries(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer ddq, ffi::AnyBuffer ddk,
                   ffi::AnyBuffer ddv, ffi::AnyBuffer lse, ffi::AnyBuffer workspace,
                   ffi::Result<ffi::AnyBuffer> gq, int32_t causal, float scale) {
  mgd::DoubleBackwardCall call;
  if (auto e = prepare(check_q, {q, k, v, o, do_, ddq, ddk, ddv, lse}, workspace.size_bytes(),
                       causal, scale, mgd::kSweepQ, &call);
      e.failure())
    return e;
  if (auto e = check_q.like_q(q, {&*gq}, "gq"); e.failure()) return e;
  call.gq = gq->untyped_data();
  call.workspace = workspace.untyped_data();  // read only by sweep 3
  return check_q.failed(mgd::double_backward(call, stream));
}

// The nine inputs every part takes.
auto bind_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::AnyBuffer>()   // q
      .Arg<ffi::AnyBuffer>()   // k
      .Arg<ffi::AnyBuffer>()   // v
      .Arg<ffi::AnyBuffer>()   // o
      .Arg<ffi::AnyBuffer>()   // do
      .Arg<ffi::AnyBuffer>()   // ddq
      .Arg<ffi::AnyBuffer>()   // ddk
      .Arg<ffi::AnyBuffer>()   // ddv
      .Arg<ffi::AnyBuffer>();  // lse
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionDoubleBackward, All,
                              bind_inputs()
                                  .Ret<ffi::AnyBuffer>()  // gq
                                  .Ret<ffi::AnyBuffer>()  // gk
                                  .Ret<ffi::AnyBuffer>()  // gv
                                  .Ret<ffi::AnyBuffer>()  // gdo
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionDoubleBackwardRows, Rows,
                              bind_inputs()
                                  .Ret<ffi::AnyBuffer>()  // gdo
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionDoubleBackwardKV, KeysValues,
                              bind_inputs()
                                  .Arg<ffi::AnyBuffer>()  // workspace of the rows call
                                  .Ret<ffi::AnyBuffer>()  // gk
                                  .Ret<ffi::AnyBuffer>()  // gv
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgdAttentionDoubleBackwardQ, Queries,
                              bind_inputs()
                                  .Arg<ffi::AnyBuffer>()  // workspace of the rows call
                                  .Ret<ffi::AnyBuffer>()  // gq
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

// Workspace bytes for a call, for the Python side to size the workspace output.
extern "C" size_t MgdDoubleBackwardWorkspaceBytes(int batch, int seq, int heads) {
  return mgd::double_backward_workspace_bytes(batch, seq, heads);
}
