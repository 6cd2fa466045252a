// Picks the backward instantiation for the call's dtype and head dimension.
#include "attention_bwd.h"
#include "bwd_kernels.cuh"

namespace mgd {

template <class E, int D>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream);

size_t backward_workspace_bytes(int batch, int seq, int heads, int head_dim, bool deterministic) {
  (void)head_dim;
  (void)deterministic;
  return size_t(batch) * heads * padded_rows(seq) * sizeof(BwdRowStats);
}

cudaError_t backward(const BackwardCall& c, cudaStream_t stream) {
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || c.batch > 65535 || c.heads > 65535)
    return cudaErrorInvalidValue;
  BackwardArgs a{c.q,  c.k,  c.v,  c.o, c.do_, c.lse, c.dlse, c.dq, c.dk, c.dv,
                 static_cast<BwdRowStats*>(c.workspace), c.batch, c.seq, c.heads, c.head_dim,
                 c.scale, c.causal};
  const bool bf16 = c.dtype == DType::kBFloat16;
  switch (c.head_dim) {
    case 64:
      return bf16 ? launch_backward<cutlass::bfloat16_t, 64>(a, stream)
                  : launch_backward<cutlass::half_t, 64>(a, stream);
    case 128:
      return bf16 ? launch_backward<cutlass::bfloat16_t, 128>(a, stream)
                  : launch_backward<cutlass::half_t, 128>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace mgd
