// Picks the instantiation for the call's dtype and head dimension.
#include "attention_dbwd.h"
#include "dbwd_common.cuh"

namespace mgd {

template <class E, int D>
cudaError_t launch_double_backward(const DoubleBackwardArgs& a, cudaStream_t stream);

size_t double_backward_workspace_bytes(int batch, int seq, int heads) {
  return size_t(batch) * heads * padded_rows(seq) * sizeof(RowStats);
}

cudaError_t double_backward(const DoubleBackwardCall& c, cudaStream_t stream) {
  DoubleBackwardArgs a{c.q,  c.k,  c.v,  c.o,  c.do_, c.ddq, c.ddk, c.ddv, c.lse,
                       c.gq, c.gk, c.gv, c.gdo, static_cast<RowStats*>(c.workspace),
                       c.batch, c.seq, c.heads, c.head_dim, c.scale, c.causal, c.sweeps};
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || c.batch > 65535 || c.heads > 65535)
    return cudaErrorInvalidValue;
  if (c.sweeps <= 0 || c.sweeps > kAllSweeps) return cudaErrorInvalidValue;
  const bool bf16 = c.dtype == DType::kBFloat16;
  switch (c.head_dim) {
    case 64:
      return bf16 ? launch_double_backward<cutlass::bfloat16_t, 64>(a, stream)
                  : launch_double_backward<cutlass::half_t, 64>(a, stream);
    case 128:
      return bf16 ? launch_double_backward<cutlass::bfloat16_t, 128>(a, stream)
                  : launch_double_backward<cutlass::half_t, 128>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace mgd
