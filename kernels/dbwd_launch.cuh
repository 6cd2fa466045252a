// Host side: builds the TMA descriptors of one call and launches the three sweeps
// on the caller's stream, each inside an NVTX range named after kernel and shape.
#pragma once

#include <atomic>
#include <cstdio>
#include <nvtx3/nvToolsExt.h>

#include "attention_dbwd.h"  // kSweepRows, kSweepKV, kSweepQ
#include "dbwd_sweeps.cuh"

namespace mgd {

class NvtxRange {
 public:
  NvtxRange(const char* kernel, const DoubleBackwardArgs& a) {
    char name[160];
    std::snprintf(name, sizeof(name), "%s B=%d T=%d H=%d D=%d %s", kernel, a.batch, a.seq,
                  a.heads, a.head_dim, a.causal ? "causal" : "full");
    nvtxRangePushA(name);
  }
  ~NvtxRange() { nvtxRangePop(); }
};

// The shared-memory opt-in is a per-device property of each kernel: set it once per
// device rather than on every call (the calls sit on the host-side critical path).
template <class Kernel>
cudaError_t opt_in_shared_memory(Kernel kernel, int smem_bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess && device < kMaxDevices) done[device].store(true, std::memory_order_release);
  return err;
}

template <class Kernel, class Params>
cudaError_t launch_sweep(Kernel kernel, const Params& params, int smem_bytes, int blocks,
                         const DoubleBackwardArgs& a, cudaStream_t stream) {
  cudaError_t err = opt_in_shared_memory(kernel, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(blocks, a.heads, a.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <class E, int D>
cudaError_t launch_double_backward(const DoubleBackwardArgs& a, cudaStream_t stream) {
  using Cfg = TileConfig<E, D>;
  constexpr int R = kRowsPerWarpgroup;
  const int Bn = a.batch, T = a.seq, H = a.heads;
  const int padded = padded_rows(T);
  const int blocks = padded / kRowsPerCta;

  if (a.sweeps & kSweepRows) {
    using K = Sweep1<Cfg>;
    typename K::Params p{
        make_row_tma<Cfg, R>(a.q, Bn, T, H),   make_row_tma<Cfg, R>(a.ddq, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.k, Bn, T, H), make_row_tma<Cfg, K::N>(a.v, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.ddk, Bn, T, H), make_row_tma<Cfg, K::N>(a.ddv, Bn, T, H),
        a.o, a.do_, a.lse, a.gdo, a.stats, Bn, T, H, padded, a.scale, a.causal};
    NvtxRange range("mgd_dbwd_sweep1_rowstats", a);
    cudaError_t err = launch_sweep(sweep1_kernel<Cfg>, p, int(sizeof(typename K::Shared)), blocks,
                                   a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.sweeps & kSweepKV) {
    using K = Sweep2<Cfg>;
    typename K::Params p{
        make_row_tma<Cfg, R>(a.k, Bn, T, H),     make_row_tma<Cfg, R>(a.v, Bn, T, H),
        make_row_tma<Cfg, R>(a.ddk, Bn, T, H),   make_row_tma<Cfg, R>(a.ddv, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.q, Bn, T, H),  make_row_tma<Cfg, K::N>(a.do_, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.ddq, Bn, T, H), a.stats, a.gk, a.gv, Bn, T, H, padded,
        a.scale, a.causal};
    NvtxRange range("mgd_dbwd_sweep2_dkdv", a);
    cudaError_t err = launch_sweep(sweep2_kernel<Cfg>, p, int(sizeof(typename K::Shared)), blocks,
                                   a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.sweeps & kSweepQ) {
    using K = Sweep3<Cfg>;
    typename K::Params p{
        make_row_tma<Cfg, R>(a.q, Bn, T, H),     make_row_tma<Cfg, R>(a.do_, Bn, T, H),
        make_row_tma<Cfg, R>(a.ddq, Bn, T, H),   make_row_tma<Cfg, K::N>(a.k, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.v, Bn, T, H),  make_row_tma<Cfg, K::N>(a.ddk, Bn, T, H),
        make_row_tma<Cfg, K::N>(a.ddv, Bn, T, H), a.stats, a.gq, Bn, T, H, padded, a.scale,
        a.causal};
    NvtxRange range("mgd_dbwd_sweep3_dq", a);
    cudaError_t err = launch_sweep(sweep3_kernel<Cfg>, p, int(sizeof(typename K::Shared)), blocks,
                                   a, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace mgd
