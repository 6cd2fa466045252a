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
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "mgd_attention_backward: " + what);
}

ffi::Error Backward(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer o, ffi::AnyBuffer do_, ffi::AnyBuffer lse, ffi::AnyBuffer dlse,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                    int32_t causal, int32_t has_dlse, int32_t deterministic, float scale) {
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
  for (const ffi::AnyBuffer* x : {&k, &v, &o, &do_}) {
    if (x->element_type() != q.element_type() || x->element_count() != q.element_count())
      return invalid("k, v, o, do must match q in dtype and size");
  }
  for (const ffi::AnyBuffer* x : {&lse, &dlse}) {
    if (x->element_type() != ffi::DataType::F32 || x->element_count() != batch * heads * seq)
      return invalid("lse and dlse must be float32 [..., H, T]");
  }
  if (head_dim != 64 && head_dim != 128) return invalid("head_dim must be 64 or 128");
  if (seq > (int64_t(1) << 30) || batch > 65535 || heads > 65535)
    return invalid("shape too large for the launch grid");
  const size_t need = mgd::backward_workspace_bytes(int(batch), int(seq), int(heads),
                                                    int(head_dim), deterministic != 0);
  if (workspace->size_bytes() < need) return invalid("workspace too small");

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

  cudaError_t err = mgd::backward(call, stream);
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("mgd_attention_backward: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
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
