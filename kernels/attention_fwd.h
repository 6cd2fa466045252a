// Public entry point of the CUDA attention forward with log-sum-exp
// (no CUDA or CuTe headers needed beyond the runtime API).
#pragma once

#include <cuda_runtime_api.h>

#include "attention_dbwd.h"  // mgd::DType

namespace mgd {

struct ForwardCall {
  DType dtype;
  int batch, seq, heads, head_dim;  // layout [batch, seq, heads, head_dim]
  float scale;                      // > 0
  bool causal;                      // query i sees keys j <= i (top-left aligned)
  const void *q, *k, *v;            // inputs, dtype
  void* o;                          // output, dtype, [batch, seq, heads, head_dim]
  float* lse;                       // output, [batch, heads, seq], natural log
};

// Launches the forward on `stream`. Returns cudaErrorInvalidValue for shapes, scales or
// dtypes the kernel does not cover (head_dim other than 64 or 128).
cudaError_t attention_forward(const ForwardCall& call, cudaStream_t stream);

}  // namespace mgd
