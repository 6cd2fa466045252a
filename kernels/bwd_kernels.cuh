// The attention backward (dQ, dK, dV from o, lse, dO; see docs/attention-math.md),
// deterministic split form:
//   preprocess:        per query row, lse * log2(e) and D = rowsum(dO * O) - dlse
//   key-major kernel:  resident K, V (128 keys); streams Q, dO and the row statistics;
//                      S^T = K Q^T, dP^T = V dO^T, P^T, dS^T; dV += P^T dO, dK += dS^T Q
//   query-major kernel: resident Q, dO (128 rows); streams K, V;
//                      S = Q K^T, dP = dO V^T, P, dS; dQ += dS K
// Each main CTA = one TMA producer warpgroup and two wgmma consumer warpgroups of 64
// resident rows, as in the double backward's sweeps (kernels/DESIGN.md).
#pragma once

#include "dbwd_common.cuh"

namespace mgd {

// Row statistics of one query row: (lse * log2(e), D - dlse). Rows past T (up to the
// padded length) carry lse = +inf, so P = 0 there.
struct BwdRowStats {
  float lse_log2, d;
};

// Arguments of one backward call, all device pointers, layout [B, T, H, D]
// (lse, dlse [B, H, T]; dlse may be null). `stats` holds B * H * padded_rows(T) rows.
struct BackwardArgs {
  const void *q, *k, *v, *o, *do_;
  const float *lse, *dlse;
  void *dq, *dk, *dv;
  BwdRowStats* stats;
  float* dq_accum;  // fused mode: fp32 dQ, [B, H, padded_rows(T), D], zeroed before the main kernel
  int batch, seq, heads, head_dim;
  float scale;
  bool causal;
  bool deterministic;
};

template <class Element, int kHeadDim>
struct BwdConfig : TileConfig<Element, kHeadDim> {
  // Key-major kernel: dK and dV accumulators (2 * D/2 registers per thread) plus two
  // 64 x 64 score tiles fit the 240 consumer registers at both head dims.
  static constexpr int kQueryBlock = 64;
  static constexpr int kQueryStages = kHeadDim == 128 ? 3 : 4;
  // Query-major kernel: only the dQ accumulator is long-lived.
  static constexpr int kKeyBlock = 64;
  static constexpr int kKeyStages = kHeadDim == 128 ? 3 : 4;
};

// Stage barriers of a TMA ring: `full` completes when a stage's bytes have landed,
// `empty` when every consumer thread is done reading it; `resident` guards the
// tiles loaded once per CTA.
template <int kStages>
struct BwdBarriers {
  uint64_t full[kStages];
  uint64_t empty[kStages];
  uint64_t resident;

  CUTE_DEVICE void init() {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], 128 * kConsumerWarpgroups);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&resident, 1);
  }
};

// ---------------------------------------------------------------------------------
// Preprocess: one warp per query row of the padded length.
// ---------------------------------------------------------------------------------
constexpr int kPreprocessRowsPerBlock = 8;

template <class E, int D>
__global__ void __launch_bounds__(32 * kPreprocessRowsPerBlock)
    bwd_preprocess_kernel(const E* __restrict__ o, const E* __restrict__ do_,
                          const float* __restrict__ lse, const float* __restrict__ dlse,
                          BwdRowStats* __restrict__ stats, int seq, int heads, int padded) {
  constexpr int kPerLane = D / 32;
  const int row = blockIdx.x * kPreprocessRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= padded) return;
  float acc = 0.f;
  if (row < seq) {
    const int64_t off = ((int64_t(b) * seq + row) * heads + h) * D + lane * kPerLane;
    CUTE_UNROLL
    for (int j = 0; j < kPerLane; ++j) acc += float(o[off + j]) * float(do_[off + j]);
  }
  CUTE_UNROLL
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, m);
  if (lane == 0) {
    const int64_t bh = int64_t(b) * heads + h;
    BwdRowStats st{INFINITY, 0.f};
    if (row < seq) {
      st.lse_log2 = lse[bh * seq + row] * float(M_LOG2E);
      st.d = acc - (dlse != nullptr ? dlse[bh * seq + row] : 0.f);
    }
    stats[bh * padded + row] = st;
  }
}

// ---------------------------------------------------------------------------------
// Key-major kernel: dK and dV of 128 keys per CTA.
// ---------------------------------------------------------------------------------
// kFuseDQ: the kernel also reduces dQ += dS K into an fp32 accumulator with
// red.global.add (order of the additions, hence the bits of dQ, vary between runs).
template <class Cfg, bool kFuseDQ = false>
struct BwdKeyMajor {
  using E = typename Cfg::E;
  static constexpr int D = Cfg::D;
  static constexpr int N = Cfg::kQueryBlock;
  static constexpr int S = Cfg::kQueryStages;
  using Resident = typename Cfg::template Smem<kRowsPerWarpgroup, kConsumerWarpgroups>;
  using Stream = typename Cfg::template Smem<N, S>;
  using StreamT = typename Cfg::template SmemT<N, S>;
  using TmaRes = RowTma<Cfg, kRowsPerWarpgroup>;
  using TmaStream = RowTma<Cfg, N>;
  // dS of one warpgroup as (queries, its 64 keys), K-major, two buffers per warpgroup:
  // (N, 64, 2 * kConsumerWarpgroups); DsT is the same bytes seen as (keys, queries, buf).
  using DsLayout = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<E>{},
      Shape<Int<N>, Int<kRowsPerWarpgroup>, Int<2 * kConsumerWarpgroups>>{}));
  using DsT = decltype(composition(
      DsLayout{}, make_layout(Shape<Int<kRowsPerWarpgroup>, Int<N>, Int<2 * kConsumerWarpgroups>>{},
                              Stride<Int<N>, _1, Int<N * kRowsPerWarpgroup>>{})));
  // The resident keys seen as (D, 64 keys, warpgroup): the MN-major B operand of dQ += dS K.
  using ResidentT = typename Cfg::template SmemT<kRowsPerWarpgroup, kConsumerWarpgroups>;
  // dQ (N queries x D) += dS (N x 64 keys) K (64 keys x D), both operands in smem.
  using MmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<N>, Int<D>, Int<kRowsPerWarpgroup>>,
                           GMMA::Major::K, GMMA::Major::MN>()));

  struct Shared {
    alignas(1024) E k[cosize_v<Resident>];
    alignas(1024) E v[cosize_v<Resident>];
    alignas(1024) E q[cosize_v<Stream>];
    alignas(1024) E do_[cosize_v<Stream>];
    alignas(1024) E ds[kFuseDQ ? cosize_v<DsLayout> : 1];
    alignas(16) BwdRowStats stats[S][N];
    BwdBarriers<S> bar;
  };

  struct Params {
    TmaRes tma_k, tma_v;
    TmaStream tma_q, tma_do;
    const BwdRowStats* stats;
    float* dq_accum;
    void *gk, *gv;
    int batch, seq, heads, padded;
    float scale;
    bool causal;
  };
  static constexpr int kStatBytes = N * int(sizeof(BwdRowStats));
  static_assert(kStatBytes % 16 == 0, "bulk copies move multiples of 16 bytes");
  static constexpr int kStageBytes = 2 * N * D * int(sizeof(E)) + kStatBytes;
  static constexpr int kResidentBytes = 2 * kRowsPerCta * D * int(sizeof(E));
};

template <class Cfg, bool kFuseDQ>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_dkdv_kernel(CUTE_GRID_CONSTANT typename BwdKeyMajor<Cfg, kFuseDQ>::Params const p) {
  using K = BwdKeyMajor<Cfg, kFuseDQ>;
  using E = typename K::E;
  static_assert(sizeof(typename K::Shared) <= kMaxSharedBytes, "shared memory over the sm_90 limit");
  constexpr int D = K::D, N = K::N, S = K::S;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sh = *reinterpret_cast<typename K::Shared*>(smem_raw);

  const int n_blk = blockIdx.x;  // key block; under causal the first ones are heaviest
  const int h = blockIdx.y, b = blockIdx.z;
  const int num_m = (p.seq + N - 1) / N;
  const int m_begin = p.causal ? (n_blk * kRowsPerCta) / N : 0;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sh.bar.init();
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename K::Resident{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename K::Resident{});
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename K::Stream{});
  Tensor sdO = make_tensor(make_smem_ptr(sh.do_), typename K::Stream{});

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) {
      uint64_t* res = &sh.bar.resident;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(res, K::kResidentBytes);
      for (int w = 0; w < kConsumerWarpgroups; ++w) {
        int blk = n_blk * kConsumerWarpgroups + w;
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_k, sK, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_v, sV, res, p.batch, p.seq, p.heads, b, h, blk, w);
      }
      const BwdRowStats* stats = p.stats + (int64_t(b) * p.heads + h) * p.padded;
      for (int m = m_begin; m < num_m; ++m) {
        int it = m - m_begin;
        int s = it % S;
        cutlass::arch::ClusterBarrier::wait(&sh.bar.empty[s], ((it / S) & 1) ^ 1);
        uint64_t* full = &sh.bar.full[s];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, K::kStageBytes);
        tma_load_rows<N, D>(p.tma_q, sQ, full, p.batch, p.seq, p.heads, b, h, m, s);
        tma_load_rows<N, D>(p.tma_do, sdO, full, p.batch, p.seq, p.heads, b, h, m, s);
        SM90_BULK_COPY_G2S::copy(stats + m * N, full, &sh.stats[s][0], K::kStatBytes);
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  const int w = wg - 1;
  const int tid = threadIdx.x % 128;
  const int key0 = n_blk * kRowsPerCta + w * kRowsPerWarpgroup;

  typename Cfg::template MmaScores<N> mma_s;
  typename Cfg::template MmaOut<N> mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);

  Tensor tSrK = thr_s.make_fragment_A(thr_s.partition_A(sK));     // (MMA, M, K, WG)
  Tensor tSrV = thr_s.make_fragment_A(thr_s.partition_A(sV));
  Tensor tSrQ = thr_s.make_fragment_B(thr_s.partition_B(sQ));     // (MMA, N, K, S)
  Tensor tSrdO = thr_s.make_fragment_B(thr_s.partition_B(sdO));
  Tensor sQt = make_tensor(make_smem_ptr(sh.q), typename K::StreamT{});
  Tensor sdOt = make_tensor(make_smem_ptr(sh.do_), typename K::StreamT{});
  Tensor tOrQt = thr_o.make_fragment_B(thr_o.partition_B(sQt));   // (MMA, D, N, S)
  Tensor tOrdOt = thr_o.make_fragment_B(thr_o.partition_B(sdOt));

  Tensor cS = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor cO = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor tOcO = thr_o.partition_C(cO);

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accP = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accK = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor accV = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor rP = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<N>>{}));
  Tensor rdS = make_fragment_like(rP);
  static_assert(decltype(size(rP))::value == decltype(size(accS))::value);
  clear(accK);
  clear(accV);

  // Fused dQ: this warpgroup's dS to smem, then dQ partial over its 64 keys.
  typename K::MmaDQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor sDs = make_tensor(make_smem_ptr(sh.ds), typename K::DsLayout{});
  Tensor sDsT = make_tensor(make_smem_ptr(sh.ds), typename K::DsT{});
  Tensor sKt = make_tensor(make_smem_ptr(sh.k), typename K::ResidentT{});
  Tensor tQrDs = thr_dq.make_fragment_A(thr_dq.partition_A(sDs));   // (MMA, M, K, buf)
  Tensor tQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));   // (MMA, D, K, WG)
  Tensor cQ = make_identity_tensor(Shape<Int<N>, Int<D>>{});
  Tensor tQcQ = thr_dq.partition_C(cQ);
  const int64_t bh = int64_t(b) * p.heads + h;

  const float scale = p.scale, scale_log2 = p.scale * float(M_LOG2E);
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.resident, 0);

  for (int m = m_begin; m < num_m; ++m) {
    int it = m - m_begin;
    int s = it % S;
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full[s], (it / S) & 1);
    const int q0 = m * N;
    const bool active = !p.causal || q0 + N - 1 >= key0;
    if (active) {
      wgmma<true>(mma_s, tSrK(_, _, _, w), tSrQ(_, _, _, s), accS);
      wgmma<true>(mma_s, tSrV(_, _, _, w), tSrdO(_, _, _, s), accP);
      warpgroup_wait<1>();  // S^T is ready; dP^T still runs
      const bool mask = p.causal && q0 < key0 + kRowsPerWarpgroup - 1;
      const BwdRowStats* st_s = sh.stats[s];
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        int col = get<1>(tScS(i));
        float pr = exp2_approx(accS(i) * scale_log2 - st_s[col].lse_log2);
        if (mask && q0 + col < key0 + get<0>(tScS(i))) pr = 0.f;
        accS(i) = pr;
        rP(i) = E(pr);
      }
      wgmma<false>(mma_o, rP, tOrdOt(_, _, _, s), accV);
      warpgroup_wait<1>();  // dP^T is ready; dV still runs
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        rdS(i) = E(scale * accS(i) * (accP(i) - st_s[get<1>(tScS(i))].d));
      }
      if constexpr (kFuseDQ) {
        const int buf = 2 * w + (it & 1);  // double-buffered: reuse two iterations later
        Tensor tSsDsT = thr_s.partition_C(sDsT(_, _, buf));  // this thread's dS^T elements
        CUTE_UNROLL
        for (int i = 0; i < size(rdS); ++i) tSsDsT(i) = rdS(i);
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by wgmma
        cutlass::arch::NamedBarrier::sync(128, 1 + w);
        wgmma<false>(mma_o, rdS, tOrQt(_, _, _, s), accK);
        warpgroup_wait<0>();  // rdS is free before the dQ accumulator is live
        Tensor accDQ = partition_fragment_C(mma_dq, Shape<Int<N>, Int<D>>{});
        wgmma<true>(mma_dq, tQrDs(_, _, _, buf), tQrKt(_, _, _, w), accDQ);
        warpgroup_wait<0>();
        // One base pointer per thread; element i sits at a compile-time offset from it
        // (wgmma C layout: row slot (i >> 1) & 1 adds 8 rows, i >> 2 adds 8 columns).
        float* acc = p.dq_accum + (bh * p.padded + q0 + get<0>(tQcQ(0))) * D + get<1>(tQcQ(0));
        CUTE_UNROLL
        for (int i = 0; i < size(accDQ); i += 2) {
          atomicAdd(reinterpret_cast<float2*>(acc + row_slot(i) * 8 * D + (i >> 2) * 8),
                    make_float2(accDQ(i), accDQ(i + 1)));
        }
      } else {
        wgmma<false>(mma_o, rdS, tOrQt(_, _, _, s), accK);
        warpgroup_wait<0>();
      }
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }

  store_rows<E, D>(accK, tOcO, p.gk, p.seq, p.heads, b, h, key0);
  store_rows<E, D>(accV, tOcO, p.gv, p.seq, p.heads, b, h, key0);
}

// ---------------------------------------------------------------------------------
// Query-major kernel: dQ of 128 query rows per CTA, in a fixed key order.
// ---------------------------------------------------------------------------------
template <class Cfg>
struct BwdQueryMajor {
  using E = typename Cfg::E;
  static constexpr int D = Cfg::D;
  static constexpr int N = Cfg::kKeyBlock;
  static constexpr int S = Cfg::kKeyStages;
  using Resident = typename Cfg::template Smem<kRowsPerWarpgroup, kConsumerWarpgroups>;
  using Stream = typename Cfg::template Smem<N, S>;
  using StreamT = typename Cfg::template SmemT<N, S>;
  using TmaRes = RowTma<Cfg, kRowsPerWarpgroup>;
  using TmaStream = RowTma<Cfg, N>;

  struct Shared {
    alignas(1024) E q[cosize_v<Resident>];
    alignas(1024) E do_[cosize_v<Resident>];
    alignas(1024) E k[cosize_v<Stream>];
    alignas(1024) E v[cosize_v<Stream>];
    BwdBarriers<S> bar;
  };

  struct Params {
    TmaRes tma_q, tma_do;
    TmaStream tma_k, tma_v;
    const BwdRowStats* stats;
    void* gq;
    int batch, seq, heads, padded;
    float scale;
    bool causal;
  };
  static constexpr int kStageBytes = 2 * N * D * int(sizeof(E));
  static constexpr int kResidentBytes = 2 * kRowsPerCta * D * int(sizeof(E));
};

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_dq_kernel(CUTE_GRID_CONSTANT typename BwdQueryMajor<Cfg>::Params const p) {
  using K = BwdQueryMajor<Cfg>;
  using E = typename K::E;
  static_assert(sizeof(typename K::Shared) <= kMaxSharedBytes, "shared memory over the sm_90 limit");
  constexpr int D = K::D, N = K::N, S = K::S;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sh = *reinterpret_cast<typename K::Shared*>(smem_raw);

  const int num_m = gridDim.x;
  const int m_blk = p.causal ? num_m - 1 - int(blockIdx.x) : int(blockIdx.x);  // heavy first
  const int h = blockIdx.y, b = blockIdx.z;
  const int num_n = (p.seq + N - 1) / N;
  const int n_end = p.causal ? min(num_n, ((m_blk + 1) * kRowsPerCta + N - 1) / N) : num_n;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sh.bar.init();
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename K::Resident{});
  Tensor sdO = make_tensor(make_smem_ptr(sh.do_), typename K::Resident{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename K::Stream{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename K::Stream{});

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) {
      uint64_t* res = &sh.bar.resident;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(res, K::kResidentBytes);
      for (int w = 0; w < kConsumerWarpgroups; ++w) {
        int blk = m_blk * kConsumerWarpgroups + w;
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_q, sQ, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_do, sdO, res, p.batch, p.seq, p.heads, b, h, blk, w);
      }
      for (int n = 0; n < n_end; ++n) {
        int s = n % S;
        cutlass::arch::ClusterBarrier::wait(&sh.bar.empty[s], ((n / S) & 1) ^ 1);
        uint64_t* full = &sh.bar.full[s];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, K::kStageBytes);
        tma_load_rows<N, D>(p.tma_k, sK, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_v, sV, full, p.batch, p.seq, p.heads, b, h, n, s);
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
  const int w = wg - 1;
  const int tid = threadIdx.x % 128;
  const int row0 = m_blk * kRowsPerCta + w * kRowsPerWarpgroup;

  typename Cfg::template MmaScores<N> mma_s;
  typename Cfg::template MmaOut<N> mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);

  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));
  Tensor tSrdO = thr_s.make_fragment_A(thr_s.partition_A(sdO));
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));
  Tensor tSrV = thr_s.make_fragment_B(thr_s.partition_B(sV));
  Tensor sKt = make_tensor(make_smem_ptr(sh.k), typename K::StreamT{});
  Tensor tOrKt = thr_o.make_fragment_B(thr_o.partition_B(sKt));

  Tensor cS = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor cO = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor tOcO = thr_o.partition_C(cO);

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accP = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accQ = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor rdS = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<N>>{}));
  clear(accQ);

  BwdRowStats st[2];
  CUTE_UNROLL
  for (int slot = 0; slot < 2; ++slot) {
    int row = row0 + get<0>(tScS(2 * slot));
    st[slot] = p.stats[(int64_t(b) * p.heads + h) * p.padded + row];
  }

  const float scale = p.scale, scale_log2 = p.scale * float(M_LOG2E);
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.resident, 0);

  for (int n = 0; n < n_end; ++n) {
    int s = n % S;
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full[s], (n / S) & 1);
    const int col0 = n * N;
    const bool active = !p.causal || col0 <= row0 + kRowsPerWarpgroup - 1;
    if (active) {
      wgmma<true>(mma_s, tSrQ(_, _, _, w), tSrK(_, _, _, s), accS);
      wgmma<true>(mma_s, tSrdO(_, _, _, w), tSrV(_, _, _, s), accP);
      warpgroup_wait<1>();  // S is ready; dP still runs
      const bool mask = col0 + N > p.seq || (p.causal && col0 + N - 1 > row0);
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        float pr = exp2_approx(accS(i) * scale_log2 - st[row_slot(i)].lse_log2);
        if (mask) {
          int row = row0 + get<0>(tScS(i)), col = col0 + get<1>(tScS(i));
          if (col >= p.seq || (p.causal && col > row)) pr = 0.f;
        }
        accS(i) = pr;
      }
      warpgroup_wait<0>();
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        rdS(i) = E(scale * accS(i) * (accP(i) - st[row_slot(i)].d));
      }
      wgmma<false>(mma_o, rdS, tOrKt(_, _, _, s), accQ);
      warpgroup_wait<0>();
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }

  store_rows<E, D>(accQ, tOcO, p.gq, p.seq, p.heads, b, h, row0);
}

// ---------------------------------------------------------------------------------
// Fused mode's postprocess: dQ from the fp32 accumulator to the input dtype (the scale
// is already folded into dS). One thread per 4 elements, in the output's order.
// ---------------------------------------------------------------------------------
template <class E, int D>
__global__ void bwd_dq_convert_kernel(const float* __restrict__ accum, E* __restrict__ dq,
                                      int batch, int seq, int heads, int padded) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const int64_t total = int64_t(batch) * seq * heads * D;
  if (i >= total) return;
  const int d = int(i % D);
  const int64_t row = i / D;  // (b, t, h)
  const int h = int(row % heads);
  const int64_t bt = row / heads;
  const int t = int(bt % seq);
  const int b = int(bt / seq);
  const float4 x = *reinterpret_cast<const float4*>(
      accum + ((int64_t(b) * heads + h) * padded + t) * D + d);
  dq[i] = E(x.x);
  dq[i + 1] = E(x.y);
  dq[i + 2] = E(x.z);
  dq[i + 3] = E(x.w);
}

}  // namespace mgd
