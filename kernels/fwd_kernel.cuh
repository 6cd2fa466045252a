// The forward kernel: one producer warpgroup (TMA, 24 registers) and Cfg::kConsumerWGs
// consumer warpgroups (wgmma; 2 x 240 registers at D=128, 3 x 160 at D=64), 64 query rows
// each per tile; each CTA runs its tiles of fwd_schedule in order. See kernels/DESIGN.md.
#pragma once

#include "fwd_epilogue.cuh"
#include "fwd_mainloop.cuh"

namespace mgd {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT FwdParams<Cfg> const p) {
  static_assert(sizeof(FwdShared<Cfg>) <= kMaxSharedBytes, "shared memory over the sm_90 limit");
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sh = *reinterpret_cast<FwdShared<Cfg>*>(smem_raw);
  const FwdSchedule sched = fwd_schedule(p);
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sh.bar.init();
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
    if (threadIdx.x == 0) fwd_produce(p, sh, sched);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
    const int w = wg - 1, tid = threadIdx.x % 128;
    typename Cfg::MmaO mma_o;
    Tensor accO = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<Cfg::D>>{});
    // Ping-pong: warpgroup 0 takes the first turn, passed by the last one.
    if (p.pingpong && w == Cfg::kConsumerWGs - 1) turn_pass<Cfg::kConsumerWGs>(w);
    uint32_t g0 = 0;  // K/V blocks consumed so far (ring positions)
    for (int j = 0, i = sched.tile(0); i < sched.count; ++j) {
      const int next = sched.tile(j + 1);
      const FwdTile t = fwd_tile(p, i);
      OnlineSoftmax sm;
      fwd_consume(p, sh, t, w, tid, g0, uint32_t(j), next >= sched.count, accO, sm);
      fwd_epilogue(p, t, w, tid, accO, sm);
      g0 += t.n_end;
      i = next;
    }
  }
}

}  // namespace mgd
