// Public entry point of the CUDA double backward (no CUDA or CuTe headers needed).
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

namespace mgd {

enum class DType { kBFloat16, kFloat16 };

constexpr int kSweepRows = 1, kSweepKV = 2, kSweepQ = 4;
constexpr int kAllSweeps = kSweepRows | kSweepKV | kSweepQ;

struct DoubleBackwardCall {
  DType dtype;
  int batch, seq, heads, head_dim;  // layout [batch, seq, heads, head_dim]
  float scale;
  bool causal;
  const void *q, *k, *v, *o, *do_, *ddq, *ddk, *ddv;  // inputs, dtype
  const float* lse;                                   // [batch, heads, seq]
  void *gq, *gk, *gv, *gdo;                           // outputs, dtype
  void* workspace;                                    // double_backward_workspace_bytes()
  // Which sweeps run (bits kSweepRows | kSweepKV | kSweepQ): sweep 1 writes gdo and the
  // row statistics in the workspace, which sweeps 2 (gk, gv) and 3 (gq) read, so a caller
  // that needs only some outputs launches only their sweeps.
  int sweeps = kAllSweeps;
};

// Bytes of device workspace one call needs (row statistics of every query row).
size_t double_backward_workspace_bytes(int batch, int seq, int heads);

// Launches the three sweeps on `stream`. Returns cudaErrorInvalidValue for shapes or
// dtypes the kernels do not cover (head_dim other than 64 or 128).
cudaError_t double_backward(const DoubleBackwardCall& call, cudaStream_t stream);

}  // namespace mgd
