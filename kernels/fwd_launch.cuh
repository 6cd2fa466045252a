// Host side of the forward: TMA descriptors of one call and the launch on the caller's
// stream (grid: (batch * heads, query blocks), heavy query blocks first under causal).
#pragma once

#include "attention_fwd.h"
#include "dbwd_launch.cuh"  // opt_in_shared_memory
#include "fwd_kernel.cuh"

#include <cstdlib>

namespace mgd {

// Ping-pong of the consumer warpgroups: MGD_FWD_PINGPONG=1 turns it on (read once per
// process; the switch exists to time both schedules on the same build).
inline bool fwd_pingpong() {
  static const bool on = [] {
    const char* env = std::getenv("MGD_FWD_PINGPONG");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}

template <class E, int D>
cudaError_t launch_forward(const ForwardCall& c, cudaStream_t stream) {
  using Cfg = FwdConfig<E, D>;
  using Tiles = typename Cfg::Tiles;
  FwdParams<Cfg> p{make_row_tma<Tiles, kRowsPerWarpgroup>(c.q, c.batch, c.seq, c.heads),
                   make_row_tma<Tiles, Cfg::N>(c.k, c.batch, c.seq, c.heads),
                   make_row_tma<Tiles, Cfg::N>(c.v, c.batch, c.seq, c.heads),
                   c.o, c.lse, c.batch, c.seq, c.heads, c.scale, c.causal,
                   fwd_pingpong()};
  const int smem = int(sizeof(FwdShared<Cfg>));
  cudaError_t err = opt_in_shared_memory(fwd_kernel<Cfg>, smem);
  if (err != cudaSuccess) return err;
  dim3 grid(c.batch * c.heads, (c.seq + kRowsPerCta - 1) / kRowsPerCta);
  fwd_kernel<Cfg><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mgd
