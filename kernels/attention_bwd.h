// Public entry point of the CUDA attention backward (no CUDA or CuTe headers needed).
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

#include "attention_dbwd.h"  // DType

namespace mgd {

struct BackwardCall {
  DType dtype;
  int batch, seq, heads, head_dim;  // layout [batch, seq, heads, head_dim]
  float scale;
  bool causal;
  bool deterministic;                 // the split form: dQ in its own query-major pass
  const void *q, *k, *v, *o, *do_;    // inputs, dtype
  const float* lse;                   // [batch, heads, seq]
  const float* dlse;                  // [batch, heads, seq] cotangent of lse, or nullptr
  void *dq, *dk, *dv;                 // outputs, dtype
  void* workspace;                    // backward_workspace_bytes()
};

// Bytes of device workspace one call needs (row statistics of every query row).
size_t backward_workspace_bytes(int batch, int seq, int heads, int head_dim, bool deterministic);

// Fused mode's dQ reduction: a bulk reduce of smem-staged chunks (default) or per-thread
// red.global.add when MGD_BWD_BULK_REDUCE=0 (read once per process).
bool backward_bulk_reduce();

// Launches the backward on `stream`. Returns cudaErrorInvalidValue for shapes or
// dtypes the kernels do not cover (head_dim other than 64 or 128), and for bf16 at
// head_dim 64 when MGD_BWD_D64_BLOCKS (read once per process: 128x128, the default, 64x64,
// 128x64, 64x128 or lean128) names a block variant this build lacks or is not one of those.
cudaError_t backward(const BackwardCall& call, cudaStream_t stream);

}  // namespace mgd
