// Host side of the forward: TMA descriptors of one call and the launch on the caller's
// stream: persistent (one CTA per SM looping over the tiles) or one CTA per tile.
#pragma once

#include "attention_fwd.h"
#include "dbwd_launch.cuh"  // opt_in_shared_memory
#include "fwd_kernel.cuh"

#include <algorithm>
#include <atomic>
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

// Persistent grid, on unless MGD_FWD_PERSISTENT=0 (read once per process, to time both
// launches on the same build).
inline bool fwd_persistent() {
  static const bool on = [] {
    const char* env = std::getenv("MGD_FWD_PERSISTENT");
    return !(env != nullptr && env[0] == '0');
  }();
  return on;
}

// MGD_FWD_MAX_CTAS=n caps the persistent grid at n CTAs, so that small shapes in the
// checks run many tiles per CTA (read once per process; 0 or unset: no cap).
inline int fwd_max_ctas() {
  static const int n = [] {
    const char* env = std::getenv("MGD_FWD_MAX_CTAS");
    return env != nullptr ? std::atoi(env) : 0;
  }();
  return n;
}

// SM count of the current device, asked once per device.
inline cudaError_t fwd_sm_count(int* count) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int n = dev < kMaxDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    if (dev < kMaxDevices) cached[dev].store(n, std::memory_order_relaxed);
  }
  *count = n;
  return cudaSuccess;
}

template <class E, int D>
cudaError_t launch_forward(const ForwardCall& c, cudaStream_t stream) {
  using Cfg = FwdConfig<E, D>;
  using Tiles = typename Cfg::Tiles;
  // Tiles are numbered in int up to 3 x their count (FwdSchedule); the one-tile-per-CTA
  // grid has y <= 65535.
  const int64_t tiles_m = (int64_t(c.seq) + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
  if (int64_t(c.batch) * c.heads * tiles_m > (int64_t(1) << 29) || tiles_m > 65535)
    return cudaErrorInvalidValue;
  FwdParams<Cfg> p{make_row_tma<Tiles, kRowsPerWarpgroup>(c.q, c.batch, c.seq, c.heads),
                   make_row_tma<Tiles, Cfg::N>(c.k, c.batch, c.seq, c.heads),
                   make_row_tma<Tiles, Cfg::N>(c.v, c.batch, c.seq, c.heads),
                   c.o, c.lse, c.batch, c.seq, c.heads, c.scale, c.causal,
                   fwd_pingpong()};
  const int smem = int(sizeof(FwdShared<Cfg>));
  cudaError_t err = opt_in_shared_memory(fwd_kernel<Cfg>, smem);
  if (err != cudaSuccess) return err;
  const int num_bh = c.batch * c.heads;
  const int num_m = (c.seq + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
  dim3 grid(num_bh, num_m);
  if (fwd_persistent()) {
    // One CTA per SM (1 fits: 384 threads at 168 registers, or 512 at 128, at entry);
    // tile order in fwd_schedule.
    int ctas = 0;
    err = fwd_sm_count(&ctas);
    if (err != cudaSuccess) return err;
    if (fwd_max_ctas() > 0) ctas = std::min(ctas, fwd_max_ctas());
    grid = dim3(std::min(int64_t(ctas), int64_t(num_bh) * num_m), 1);
  }
  fwd_kernel<Cfg><<<grid, Cfg::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mgd
