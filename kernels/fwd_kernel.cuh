// The forward kernel: one producer warpgroup (TMA, 24 registers) and two consumer
// warpgroups (wgmma, 240 registers), 128 query rows per CTA. See kernels/DESIGN.md.
#pragma once

#include "fwd_epilogue.cuh"
#include "fwd_mainloop.cuh"

namespace mgd {

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT FwdParams<Cfg> const p) {
  static_assert(sizeof(FwdShared<Cfg>) <= kMaxSharedBytes, "shared memory over the sm_90 limit");
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sh = *reinterpret_cast<FwdShared<Cfg>*>(smem_raw);
  const FwdTile t = fwd_tile(p);
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sh.bar.init();
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) fwd_produce(p, sh, t);
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
    const int tid = threadIdx.x % 128;
    typename Cfg::MmaO mma_o;
    Tensor accO = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<Cfg::D>>{});
    OnlineSoftmax sm;
    fwd_consume(p, sh, t, wg - 1, tid, accO, sm);
    fwd_epilogue(p, t, wg - 1, tid, accO, sm);
  }
}

}  // namespace mgd
