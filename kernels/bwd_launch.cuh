// Host side of the attention backward: builds the TMA descriptors of one call and
// launches preprocess, key-major (dK, dV) and query-major (dQ) kernels on the
// caller's stream, each inside an NVTX range named after kernel and shape.
#pragma once

#include <cstdio>
#include <nvtx3/nvToolsExt.h>

#include "bwd_kernels.cuh"
#include "dbwd_launch.cuh"  // opt_in_shared_memory

namespace mgd {

class BwdNvtxRange {
 public:
  BwdNvtxRange(const char* kernel, const BackwardArgs& a) {
    char name[160];
    std::snprintf(name, sizeof(name), "%s B=%d T=%d H=%d D=%d %s", kernel, a.batch, a.seq,
                  a.heads, a.head_dim, a.causal ? "causal" : "full");
    nvtxRangePushA(name);
  }
  ~BwdNvtxRange() { nvtxRangePop(); }
};

template <class Kernel, class Params>
cudaError_t launch_bwd_main(Kernel kernel, const Params& params, int smem_bytes,
                            const BackwardArgs& a, cudaStream_t stream) {
  cudaError_t err = opt_in_shared_memory(kernel, smem_bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(padded_rows(a.seq) / kRowsPerCta, a.heads, a.batch);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// Fused mode's key-major kernel (dK, dV and the dQ partials), reducing by kDq.
template <class Cfg, DqMode kDq>
cudaError_t launch_fused(const BackwardArgs& a, cudaStream_t stream) {
  using K = BwdKeyMajor<Cfg, kDq>;
  constexpr int R = kRowsPerWarpgroup;
  const int Bn = a.batch, T = a.seq, H = a.heads;
  typename K::Params p{make_row_tma<Cfg, R>(a.k, Bn, T, H),    make_row_tma<Cfg, R>(a.v, Bn, T, H),
                       make_row_tma<Cfg, K::N>(a.q, Bn, T, H), make_row_tma<Cfg, K::N>(a.do_, Bn, T, H),
                       a.stats, a.dq_accum, a.dk, a.dv, Bn, T, H, padded_rows(T), a.scale, a.causal};
  BwdNvtxRange range(kDq == DqMode::kBulk ? "mgd_bwd_dkdv_dq_fused_bulk" : "mgd_bwd_dkdv_dq_fused", a);
  return launch_bwd_main(bwd_dkdv_kernel<Cfg, kDq>, p, int(sizeof(typename K::Shared)), a, stream);
}

// kQB, kKB: the split form's key-major query block and query-major key block at D=64
// (BwdConfig); kFQB: the fused mode's query block (128 only at D=64); kPBf16: dS from P's
// bf16 copy in the key-major kernel.
template <class E, int D, int kQB = 64, int kKB = 64, int kFQB = 64, bool kPBf16 = false>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  using Cfg = BwdConfig<E, D, kQB, kKB, kPBf16>;
  constexpr int R = kRowsPerWarpgroup;
  const int Bn = a.batch, T = a.seq, H = a.heads;
  const int padded = padded_rows(T);

  {
    BwdNvtxRange range("mgd_bwd_preprocess", a);
    dim3 grid(padded / kPreprocessRowsPerBlock, H, Bn);
    bwd_preprocess_kernel<E, D><<<grid, 32 * kPreprocessRowsPerBlock, 0, stream>>>(
        static_cast<const E*>(a.o), static_cast<const E*>(a.do_), a.lse, a.dlse, a.stats, T, H,
        padded);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!a.deterministic) {
    const size_t accum_bytes = size_t(Bn) * H * padded * D * sizeof(float);
    cudaError_t err = cudaMemsetAsync(a.dq_accum, 0, accum_bytes, stream);
    if (err != cudaSuccess) return err;
    using CfgFused = BwdConfig<E, D, kFQB, kKB, kPBf16>;
    err = a.bulk_reduce ? launch_fused<CfgFused, DqMode::kBulk>(a, stream)
                        : launch_fused<CfgFused, DqMode::kRed>(a, stream);
    if (err != cudaSuccess) return err;
    BwdNvtxRange range("mgd_bwd_dq_convert", a);
    if (a.bulk_reduce) {
      dim3 grid(padded / kDqChunk * (D / kDqChunk), H, Bn);
      bwd_dq_convert_chunks_kernel<E, D><<<grid, 128, 0, stream>>>(
          a.dq_accum, static_cast<E*>(a.dq), T, H, padded);
      return cudaGetLastError();
    }
    const int64_t threads = int64_t(Bn) * T * H * D / 4;
    const int block = 256;
    bwd_dq_convert_kernel<E, D><<<unsigned((threads + block - 1) / block), block, 0, stream>>>(
        a.dq_accum, static_cast<E*>(a.dq), Bn, T, H, padded);
    return cudaGetLastError();
  }
  {
    using K = BwdKeyMajor<Cfg, DqMode::kNone>;
    typename K::Params p{make_row_tma<Cfg, R>(a.k, Bn, T, H),    make_row_tma<Cfg, R>(a.v, Bn, T, H),
                         make_row_tma<Cfg, K::N>(a.q, Bn, T, H), make_row_tma<Cfg, K::N>(a.do_, Bn, T, H),
                         a.stats, nullptr, a.dk, a.dv, Bn, T, H, padded, a.scale, a.causal};
    BwdNvtxRange range("mgd_bwd_dkdv", a);
    cudaError_t err = launch_bwd_main(bwd_dkdv_kernel<Cfg, DqMode::kNone>, p,
                                      int(sizeof(typename K::Shared)), a, stream);
    if (err != cudaSuccess) return err;
  }
  {
    using K = BwdQueryMajor<Cfg>;
    typename K::Params p{make_row_tma<Cfg, R>(a.q, Bn, T, H),    make_row_tma<Cfg, R>(a.do_, Bn, T, H),
                         make_row_tma<Cfg, K::N>(a.k, Bn, T, H), make_row_tma<Cfg, K::N>(a.v, Bn, T, H),
                         a.stats, a.dq, Bn, T, H, padded, a.scale, a.causal};
    BwdNvtxRange range("mgd_bwd_dq", a);
    cudaError_t err = launch_bwd_main(bwd_dq_kernel<Cfg>, p, int(sizeof(typename K::Shared)), a,
                                      stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace mgd
