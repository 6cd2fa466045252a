// Forward of attention with log-sum-exp: tile configuration, shared storage, the TMA
// producer and the consumer main loop (S = Q K^T, online softmax, O += P V).
// A CTA runs tiles of Cfg::kRowsPerCta query rows one after another (one tile unless
// persistent): Cfg::kConsumerWGs consumer warpgroups of 64 rows each, fed by one producer
// thread through two Q buffers, a K ring and a V ring of mbarrier-guarded stages.
#pragma once

#include "dbwd_common.cuh"
#include "fwd_softmax.cuh"

// 0 keeps D=64 on two consumer warpgroups (128-row tiles), as D=128.
#ifndef MGD_FWD_D64_THREE_WG
#define MGD_FWD_D64_THREE_WG 1
#endif

namespace mgd {

template <class Element, int kHeadDim>
struct FwdConfig {
  using Tiles = TileConfig<Element, kHeadDim>;
  using E = Element;
  static constexpr int D = kHeadDim;
  // D=64: three consumer warpgroups (192-row tiles), so that more score rows share each
  // K/V block and one warpgroup's softmax hides behind two others' short (K = 64) products.
  static constexpr int kConsumerWGs = kHeadDim == 64 && MGD_FWD_D64_THREE_WG ? 3 : 2;
  static constexpr int kRowsPerCta = kRowsPerWarpgroup * kConsumerWGs;
  static constexpr int kThreads = 128 * (kConsumerWGs + 1);
  // setmaxnreg budgets: 128 * (24 + kConsumerWGs * consumer) <= 65536 registers of one SM.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kConsumerWGs == 3 ? 160 : 240;
  static_assert(128 * (kProducerRegisters + kConsumerWGs * kConsumerRegisters) <= 65536);
  // 128-key blocks: a 64 x 128 score tile is 64 fp32 registers per thread, which leaves
  // room for the D-wide O accumulator and the bf16 copy of P (160 at D=64, 240 at D=128).
  static constexpr int N = 128;
  // Stages of the K and V rings: 2 x Q (64 KB) + 2 x (K + V) (128 KB) at D = 128;
  // 2 x Q (48 KB) + 4 x (K + V) (128 KB) at D = 64 with 192-row tiles.
  static constexpr int kStages = kHeadDim == 128 ? 2 : kConsumerWGs == 3 ? 4 : 3;
  // Two Q buffers, so that the next tile's Q loads while this tile still reads its own.
  static constexpr int kQBuffers = 2;
  // Slot kConsumerWGs * buffer + warpgroup holds one warpgroup's 64 rows.
  using SmemQ = typename Tiles::template Smem<kRowsPerWarpgroup, kConsumerWGs * kQBuffers>;
  using SmemKV = typename Tiles::template Smem<N, kStages>;
  using SmemVt = typename Tiles::template SmemT<N, kStages>;
  using TmaQ = RowTma<Tiles, kRowsPerWarpgroup>;
  using TmaKV = RowTma<Tiles, N>;
  using MmaS = typename Tiles::template MmaScores<N>;
  using MmaO = typename Tiles::template MmaOut<N>;
  static constexpr int kQBytes = kRowsPerCta * D * int(sizeof(E));
  static constexpr int kTileBytes = N * D * int(sizeof(E));
};

// K and V have separate rings so that a K stage is handed back as soon as its
// Q K^T is done, while the V stage of the same block is still being read by P V.
template <int kStages, int kQBuffers, int kConsumers>
struct FwdBarriers {
  uint64_t full_k[kStages], empty_k[kStages];
  uint64_t full_v[kStages], empty_v[kStages];
  uint64_t full_q[kQBuffers], empty_q[kQBuffers];

  CUTE_DEVICE void init() {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full_k[s], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&full_v[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty_k[s], 128 * kConsumers);
      cutlass::arch::ClusterBarrier::init(&empty_v[s], 128 * kConsumers);
    }
    for (int b = 0; b < kQBuffers; ++b) {
      cutlass::arch::ClusterTransactionBarrier::init(&full_q[b], 1);
      cutlass::arch::ClusterBarrier::init(&empty_q[b], 128 * kConsumers);
    }
  }
};

template <class Cfg>
struct FwdShared {
  using E = typename Cfg::E;
  alignas(1024) E q[cosize_v<typename Cfg::SmemQ>];
  alignas(1024) E k[cosize_v<typename Cfg::SmemKV>];
  alignas(1024) E v[cosize_v<typename Cfg::SmemKV>];
  FwdBarriers<Cfg::kStages, Cfg::kQBuffers, Cfg::kConsumerWGs> bar;
};

template <class Cfg>
struct FwdParams {
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaKV tma_k, tma_v;
  void* o;
  float* lse;
  int batch, seq, heads;
  float scale;
  bool causal;
  // The consumer warpgroups take turns issuing their products (named barriers), so that
  // one warpgroup's softmax runs while the others' products occupy the tensor cores.
  bool pingpong;
};

// One tile: Cfg::kRowsPerCta query rows of one (batch, head) and its key-block range.
struct FwdTile {
  int b, h, m_blk, n_end;
};

// Tile i in launch order: query blocks outermost, (batch, head) innermost.
template <class Cfg>
CUTE_DEVICE FwdTile fwd_tile(FwdParams<Cfg> const& p, int i) {
  FwdTile t;
  const int num_bh = p.batch * p.heads;
  const int num_m = (p.seq + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
  const int m_idx = i / num_bh, bh = i - m_idx * num_bh;
  // Under causal masking the last query blocks see the most keys: run them first.
  t.m_blk = p.causal ? num_m - 1 - m_idx : m_idx;
  t.h = bh % p.heads;
  t.b = bh / p.heads;
  const int num_n = (p.seq + Cfg::N - 1) / Cfg::N;
  t.n_end = p.causal ? min(num_n, ((t.m_blk + 1) * Cfg::kRowsPerCta + Cfg::N - 1) / Cfg::N) : num_n;
  return t;
}

// This CTA's tiles: in round r, tile r * G + c on even r and r * G + G - 1 - c on odd r
// (CTA c of G): with heavy tiles first, the reversal of every other round evens out the
// CTAs' total key blocks. The persistent grid is 1-D with G <= #SMs; the one-tile-per-CTA
// grid is (B * H, query blocks), where round 0 is the only one.
struct FwdSchedule {
  int c, ctas, count;
  // Increasing in r; int is enough for count <= 2^29 (launch_forward).
  CUTE_DEVICE int tile(int r) const { return r * ctas + ((r & 1) ? ctas - 1 - c : c); }
};

template <class Cfg>
CUTE_DEVICE FwdSchedule fwd_schedule(FwdParams<Cfg> const& p) {
  const int num_m = (p.seq + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
  return {int(blockIdx.x + blockIdx.y * gridDim.x), int(gridDim.x * gridDim.y),
          p.batch * p.heads * num_m};
}

// Invariant, counters never reset between tiles: K/V block g -> stage g % S, phase g / S; tile j -> Q buffer j % 2, phase j / 2.
// (g counts the CTA's K/V blocks over all its tiles, j its tiles; full barriers are waited
// with parity phase & 1, empty barriers by the producer with (phase & 1) ^ 1.)

// One elected thread: per tile, Q into its buffer, then K_n and V_n into their rings.
template <class Cfg>
CUTE_DEVICE void fwd_produce(FwdParams<Cfg> const& p, FwdShared<Cfg>& sh, FwdSchedule const& sched) {
  constexpr int D = Cfg::D, N = Cfg::N, S = Cfg::kStages;
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename Cfg::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename Cfg::SmemKV{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename Cfg::SmemKV{});
  int s = 0;             // stage of the next K/V block (g % S)
  uint32_t phase = 0;    // (g / S) & 1
  for (int j = 0, i = sched.tile(0); i < sched.count; i = sched.tile(++j)) {
    const FwdTile t = fwd_tile(p, i);
    const int qb = j % Cfg::kQBuffers;
    cutlass::arch::ClusterBarrier::wait(&sh.bar.empty_q[qb], ((j / Cfg::kQBuffers) & 1) ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.full_q[qb], Cfg::kQBytes);
    for (int w = 0; w < Cfg::kConsumerWGs; ++w) {
      int blk = t.m_blk * Cfg::kConsumerWGs + w;
      tma_load_rows<kRowsPerWarpgroup, D>(p.tma_q, sQ, &sh.bar.full_q[qb], p.batch, p.seq, p.heads,
                                          t.b, t.h, blk, qb * Cfg::kConsumerWGs + w);
    }
    for (int n = 0; n < t.n_end; ++n) {
      cutlass::arch::ClusterBarrier::wait(&sh.bar.empty_k[s], phase ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.full_k[s], Cfg::kTileBytes);
      tma_load_rows<N, D>(p.tma_k, sK, &sh.bar.full_k[s], p.batch, p.seq, p.heads, t.b, t.h, n, s);
      cutlass::arch::ClusterBarrier::wait(&sh.bar.empty_v[s], phase ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.full_v[s], Cfg::kTileBytes);
      tma_load_rows<N, D>(p.tma_v, sV, &sh.bar.full_v[s], p.batch, p.seq, p.heads, t.b, t.h, n, s);
      if (++s == S) { s = 0; phase ^= 1; }
    }
  }
}

// Named barrier 1 + w (0 is __syncthreads): "consumer warpgroup w may issue"; synced by
// w's 128 threads, arrived at by the 128 of the warpgroup before it in the round robin.
CUTE_DEVICE void turn_wait(int w) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + w), "r"(256) : "memory");
}
// Hands the turn to warpgroup (w + 1) % kWGs.
template <int kWGs>
CUTE_DEVICE void turn_pass(int w) {
  const int next = kWGs == 2 ? 1 - w : (w + 1 == kWGs ? 0 : w + 1);
  asm volatile("bar.arrive %0, %1;" ::"r"(1 + next), "r"(256) : "memory");
}

// Sets score entries a row may not see to -inf: keys past T, and under causal
// masking keys after the row. Only blocks that straddle either edge pay for it.
template <class Acc, class Coords>
CUTE_DEVICE void fwd_mask(Acc& s, Coords const& coords, int row0, int col0, int seq, bool causal) {
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) {
    int row = row0 + get<0>(coords(i)), col = col0 + get<1>(coords(i));
    if (col >= seq || (causal && col > row)) s(i) = -INFINITY;
  }
}

// The consumer warpgroup's main loop over one tile. The Q K^T of block n is issued
// together with the P V of block n - 1, and the softmax of block n runs while that P V is
// in flight. `g0` is the CTA-wide number of the tile's first K/V block, `j` the tile's
// number in this CTA (ring positions: see fwd_schedule). On return accO holds the
// unnormalized P V and `sm` the row max and partial sums.
template <class Cfg, class AccO>
CUTE_DEVICE void fwd_consume(FwdParams<Cfg> const& p, FwdShared<Cfg>& sh, FwdTile const& t, int w,
                             int tid, uint32_t g0, uint32_t j, bool last_tile, AccO& accO,
                             OnlineSoftmax& sm) {
  using E = typename Cfg::E;
  constexpr int N = Cfg::N;
  constexpr uint32_t S = Cfg::kStages;
  constexpr int R = kRowsPerWarpgroup;
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename Cfg::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename Cfg::SmemKV{});
  Tensor sVt = make_tensor(make_smem_ptr(sh.v), typename Cfg::SmemVt{});

  typename Cfg::MmaS mma_s;
  typename Cfg::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));    // (MMA, M, K, WG x buffer)
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));    // (MMA, N, K, S)
  Tensor tOrVt = thr_o.make_fragment_B(thr_o.partition_B(sVt));  // (MMA, D, N, S)
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<R>, Int<N>>{}));

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<R>, Int<N>>{});
  Tensor rP = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<R>, Int<N>>{}));
  // The C fragment of the scores and the A fragment of P V enumerate a row's columns
  // in the same order, so P converts element by element.
  static_assert(decltype(size(rP))::value == decltype(size(accS))::value);

  const int row0 = t.m_blk * Cfg::kRowsPerCta + w * R;
  const float scale_log2 = p.scale * float(M_LOG2E);
  auto needs_mask = [&](int n) {
    int col0 = n * N;
    return col0 + N > p.seq || (p.causal && col0 + N - 1 > row0);
  };
  auto convert_p = [&]() {
    CUTE_UNROLL
    for (int i = 0; i < size(accS); ++i) rP(i) = E(accS(i));
  };
  auto stage = [](uint32_t g) { return int(g % S); };
  auto parity = [](uint32_t g) { return (g / S) & 1; };

  // Ping-pong: the turn goes round robin 0, 1, .., kConsumerWGs - 1, 0, .. over all of the
  // CTA's tiles (every warpgroup issues n_end + 1 times per tile; the last warpgroup passed
  // the first turn before its first tile and keeps its last turn of the CTA's last tile,
  // so that every arrival is matched by a wait).
  constexpr int kWGs = Cfg::kConsumerWGs;
  const bool pp = p.pingpong;
  auto issue_begin = [&]() { if (pp) turn_wait(w); };
  auto issue_end = [&](bool last) {
    if (pp && !(last && last_tile && w == kWGs - 1)) turn_pass<kWGs>(w);
  };

  const int qb = int(j % Cfg::kQBuffers);
  const int qslot = qb * kWGs + w;
  clear(accO);
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_q[qb], (j / Cfg::kQBuffers) & 1);

  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_k[stage(g0)], parity(g0));
  issue_begin();
  wgmma<true>(mma_s, tSrQ(_, _, _, qslot), tSrK(_, _, _, stage(g0)), accS);
  issue_end(false);
  warpgroup_wait<0>();
  cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_k[stage(g0)]);
  if (needs_mask(0)) fwd_mask(accS, tScS, row0, 0, p.seq, p.causal);
  float corr[2];
  sm.template update<true>(accS, scale_log2, corr);
  convert_p();

  for (int n = 1; n < t.n_end; ++n) {
    const uint32_t g = g0 + n;
    const int s = stage(g), sp = stage(g - 1);
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_k[s], parity(g));
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_v[sp], parity(g - 1));
    issue_begin();
    wgmma<true>(mma_s, tSrQ(_, _, _, qslot), tSrK(_, _, _, s), accS);
    wgmma<false>(mma_o, rP, tOrVt(_, _, _, sp), accO);
    issue_end(false);
    warpgroup_wait<1>();
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_k[s]);
    if (needs_mask(n)) fwd_mask(accS, tScS, row0, n * N, p.seq, p.causal);
    sm.template update<false>(accS, scale_log2, corr);
    warpgroup_wait<0>();
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_v[sp]);
    sm.rescale(accO, corr);
    convert_p();
  }
  // Every Q K^T of the tile has completed: the producer may refill this Q buffer.
  cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_q[qb]);

  const uint32_t gl = g0 + t.n_end - 1;
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_v[stage(gl)], parity(gl));
  issue_begin();
  wgmma<false>(mma_o, rP, tOrVt(_, _, _, stage(gl)), accO);
  issue_end(true);
  warpgroup_wait<0>();
  cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_v[stage(gl)]);
}

}  // namespace mgd
