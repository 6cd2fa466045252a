// Picks the backward instantiation for the call's dtype and head dimension.
#include <cstdlib>
#include <cstring>

#include "attention_bwd.h"
#include "bwd_kernels.cuh"

namespace mgd {

template <class E, int D>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream);

// Row statistics first, then (fused mode) the fp32 dQ accumulator at a 256 B boundary.
static size_t stats_bytes(int batch, int seq, int heads) {
  return (size_t(batch) * heads * padded_rows(seq) * sizeof(BwdRowStats) + 255) / 256 * 256;
}

size_t backward_workspace_bytes(int batch, int seq, int heads, int head_dim, bool deterministic) {
  size_t bytes = stats_bytes(batch, seq, heads);
  if (!deterministic) bytes += size_t(batch) * heads * padded_rows(seq) * head_dim * sizeof(float);
  return bytes;
}

bool backward_bulk_reduce() {
  static const bool on = [] {
    const char* s = std::getenv("MGD_BWD_BULK_REDUCE");
    return s == nullptr || std::strcmp(s, "0") != 0;
  }();
  return on;
}

cudaError_t backward(const BackwardCall& c, cudaStream_t stream) {
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || c.batch > 65535 || c.heads > 65535)
    return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(c.workspace);
  float* accum = c.deterministic
                     ? nullptr
                     : reinterpret_cast<float*>(ws + stats_bytes(c.batch, c.seq, c.heads));
  BackwardArgs a{c.q,  c.k,  c.v,  c.o, c.do_, c.lse, c.dlse, c.dq, c.dk, c.dv,
                 reinterpret_cast<BwdRowStats*>(ws), accum, c.batch, c.seq, c.heads, c.head_dim,
                 c.scale, c.causal, c.deterministic, backward_bulk_reduce()};
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
