// Forward of attention with log-sum-exp: tile configuration, shared storage, the TMA
// producer and the consumer main loop (S = Q K^T, online softmax, O += P V).
// One CTA owns 128 query rows: two consumer warpgroups of 64 rows each, fed by one
// producer thread through a K ring and a V ring of mbarrier-guarded stages.
#pragma once

#include "dbwd_common.cuh"
#include "fwd_softmax.cuh"

namespace mgd {

template <class Element, int kHeadDim>
struct FwdConfig {
  using Tiles = TileConfig<Element, kHeadDim>;
  using E = Element;
  static constexpr int D = kHeadDim;
  // 128-key blocks: a 64 x 128 score tile is 64 fp32 registers per thread, which
  // leaves room for the D-wide O accumulator and the bf16 copy of P at 240 registers.
  static constexpr int N = 128;
  // Stages of the K and V rings: Q (32 KB) + 2 x (K + V) (128 KB) at D = 128.
  static constexpr int kStages = kHeadDim == 128 ? 2 : 3;
  using SmemQ = typename Tiles::template Smem<kRowsPerWarpgroup, kConsumerWarpgroups>;
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
template <int kStages>
struct FwdBarriers {
  uint64_t full_k[kStages], empty_k[kStages];
  uint64_t full_v[kStages], empty_v[kStages];
  uint64_t q;

  CUTE_DEVICE void init() {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full_k[s], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&full_v[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty_k[s], 128 * kConsumerWarpgroups);
      cutlass::arch::ClusterBarrier::init(&empty_v[s], 128 * kConsumerWarpgroups);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&q, 1);
  }
};

template <class Cfg>
struct FwdShared {
  using E = typename Cfg::E;
  alignas(1024) E q[cosize_v<typename Cfg::SmemQ>];
  alignas(1024) E k[cosize_v<typename Cfg::SmemKV>];
  alignas(1024) E v[cosize_v<typename Cfg::SmemKV>];
  FwdBarriers<Cfg::kStages> bar;
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
  // The two consumer warpgroups take turns issuing their products (named barriers),
  // so that one warpgroup's softmax runs while the other's products occupy the tensor cores.
  bool pingpong;
};

// The work of one CTA: 128 query rows of one (batch, head) and its key-block range.
struct FwdTile {
  int b, h, m_blk, n_end;
};

template <class Cfg>
CUTE_DEVICE FwdTile fwd_tile(FwdParams<Cfg> const& p) {
  FwdTile t;
  const int num_m = gridDim.y;
  // Under causal masking the last query blocks see the most keys: run them first.
  t.m_blk = p.causal ? num_m - 1 - int(blockIdx.y) : int(blockIdx.y);
  t.h = int(blockIdx.x) % p.heads;
  t.b = int(blockIdx.x) / p.heads;
  const int num_n = (p.seq + Cfg::N - 1) / Cfg::N;
  t.n_end = p.causal ? min(num_n, ((t.m_blk + 1) * kRowsPerCta + Cfg::N - 1) / Cfg::N) : num_n;
  return t;
}

// One elected thread: Q once, then K_n and V_n into their rings.
template <class Cfg>
CUTE_DEVICE void fwd_produce(FwdParams<Cfg> const& p, FwdShared<Cfg>& sh, FwdTile const& t) {
  constexpr int D = Cfg::D, N = Cfg::N, S = Cfg::kStages;
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename Cfg::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename Cfg::SmemKV{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename Cfg::SmemKV{});
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.q, Cfg::kQBytes);
  for (int w = 0; w < kConsumerWarpgroups; ++w) {
    int blk = t.m_blk * kConsumerWarpgroups + w;
    tma_load_rows<kRowsPerWarpgroup, D>(p.tma_q, sQ, &sh.bar.q, p.batch, p.seq, p.heads, t.b, t.h,
                                        blk, w);
  }
  for (int n = 0; n < t.n_end; ++n) {
    const int s = n % S;
    const uint32_t phase = ((n / S) & 1) ^ 1;
    cutlass::arch::ClusterBarrier::wait(&sh.bar.empty_k[s], phase);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.full_k[s], Cfg::kTileBytes);
    tma_load_rows<N, D>(p.tma_k, sK, &sh.bar.full_k[s], p.batch, p.seq, p.heads, t.b, t.h, n, s);
    cutlass::arch::ClusterBarrier::wait(&sh.bar.empty_v[s], phase);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sh.bar.full_v[s], Cfg::kTileBytes);
    tma_load_rows<N, D>(p.tma_v, sV, &sh.bar.full_v[s], p.batch, p.seq, p.heads, t.b, t.h, n, s);
  }
}

// Named barriers 1 and 2 (0 is __syncthreads): "consumer warpgroup w may issue".
CUTE_DEVICE void turn_wait(int w) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + w), "r"(256) : "memory");
}
CUTE_DEVICE void turn_pass(int w) {
  asm volatile("bar.arrive %0, %1;" ::"r"(2 - w), "r"(256) : "memory");
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

// The consumer warpgroup's main loop. The Q K^T of block n is issued together with
// the P V of block n - 1, and the softmax of block n runs while that P V is in flight.
// On return accO holds the unnormalized P V and `sm` the row max and partial sums.
template <class Cfg, class AccO>
CUTE_DEVICE void fwd_consume(FwdParams<Cfg> const& p, FwdShared<Cfg>& sh, FwdTile const& t, int w,
                             int tid, AccO& accO, OnlineSoftmax& sm) {
  using E = typename Cfg::E;
  constexpr int N = Cfg::N, S = Cfg::kStages;
  constexpr int R = kRowsPerWarpgroup;
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename Cfg::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename Cfg::SmemKV{});
  Tensor sVt = make_tensor(make_smem_ptr(sh.v), typename Cfg::SmemVt{});

  typename Cfg::MmaS mma_s;
  typename Cfg::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));    // (MMA, M, K, WG)
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));    // (MMA, N, K, S)
  Tensor tOrVt = thr_o.make_fragment_B(thr_o.partition_B(sVt));  // (MMA, D, N, S)
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<R>, Int<N>>{}));

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<R>, Int<N>>{});
  Tensor rP = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<R>, Int<N>>{}));
  // The C fragment of the scores and the A fragment of P V enumerate a row's columns
  // in the same order, so P converts element by element.
  static_assert(decltype(size(rP))::value == decltype(size(accS))::value);

  const int row0 = t.m_blk * kRowsPerCta + w * R;
  const float scale_log2 = p.scale * float(M_LOG2E);
  auto needs_mask = [&](int n) {
    int col0 = n * N;
    return col0 + N > p.seq || (p.causal && col0 + N - 1 > row0);
  };
  auto convert_p = [&]() {
    CUTE_UNROLL
    for (int i = 0; i < size(accS); ++i) rP(i) = E(accS(i));
  };

  // Ping-pong: warpgroup 0 issues first; each issue point passes the turn to the other
  // warpgroup, except warpgroup 1's last, so that every arrival is matched by a wait.
  const bool pp = p.pingpong;
  if (pp && w == 1) turn_pass(w);
  auto issue_begin = [&]() { if (pp) turn_wait(w); };
  auto issue_end = [&](bool last) { if (pp && !(last && w == 1)) turn_pass(w); };

  clear(accO);
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.q, 0);

  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_k[0], 0);
  issue_begin();
  wgmma<true>(mma_s, tSrQ(_, _, _, w), tSrK(_, _, _, 0), accS);
  issue_end(false);
  warpgroup_wait<0>();
  cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_k[0]);
  if (needs_mask(0)) fwd_mask(accS, tScS, row0, 0, p.seq, p.causal);
  float corr[2];
  sm.template update<true>(accS, scale_log2, corr);
  convert_p();

  for (int n = 1; n < t.n_end; ++n) {
    const int s = n % S, sp = (n - 1) % S;
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_k[s], (n / S) & 1);
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_v[sp], ((n - 1) / S) & 1);
    issue_begin();
    wgmma<true>(mma_s, tSrQ(_, _, _, w), tSrK(_, _, _, s), accS);
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

  const int sl = (t.n_end - 1) % S;
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full_v[sl], ((t.n_end - 1) / S) & 1);
  issue_begin();
  wgmma<false>(mma_o, rP, tOrVt(_, _, _, sl), accO);
  issue_end(true);
  warpgroup_wait<0>();
  cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty_v[sl]);
}

}  // namespace mgd
