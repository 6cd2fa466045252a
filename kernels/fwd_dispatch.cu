// Picks the forward instantiation for the call's dtype and head dimension.
#include "attention_fwd.h"
#include "dbwd_common.cuh"

namespace mgd {

template <class E, int D>
cudaError_t launch_forward(const ForwardCall& c, cudaStream_t stream);

cudaError_t attention_forward(const ForwardCall& c, cudaStream_t stream) {
  // Tile-count limits depend on the rows per tile: launch_forward checks them.
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || !(c.scale > 0.f))
    return cudaErrorInvalidValue;
  const bool bf16 = c.dtype == DType::kBFloat16;
  switch (c.head_dim) {
    case 64:
      return bf16 ? launch_forward<cutlass::bfloat16_t, 64>(c, stream)
                  : launch_forward<cutlass::half_t, 64>(c, stream);
    case 128:
      return bf16 ? launch_forward<cutlass::bfloat16_t, 128>(c, stream)
                  : launch_forward<cutlass::half_t, 128>(c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace mgd
