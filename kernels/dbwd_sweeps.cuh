// The three sweeps of the attention double backward (see kernels/DESIGN.md):
//   sweep 1, query-major: row statistics dd and b, and dO'            (5 products)
//   sweep 2, key-major:   K' and V'                                    (8 products)
//   sweep 3, query-major: Q'                                           (7 products)
// Each CTA = one producer warpgroup (TMA into a staged mbarrier pipeline) and two
// consumer warpgroups (wgmma), each owning 64 resident rows.
#pragma once

#include "dbwd_common.cuh"

namespace mgd {

// Pipeline barriers: `full` completes when a stage's bytes have landed, `empty`
// when all consumer threads are done reading it; `resident` guards the tiles
// loaded once per CTA.
template <int kStages>
struct Barriers {
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
// Sweep 1 (query-major). Per key block: S = Q K^T, ddS = s (ddQ K^T + Q ddK^T),
// P = exp(s S - lse), dd += rowsum(ddS P), A += P ddV + (P ddS) V.
// Then dO' = A - dd O and b = rowsum(dO A) - 2 D dd (see DESIGN.md for why).
// ---------------------------------------------------------------------------------
template <class Cfg>
struct Sweep1 {
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
    alignas(1024) E ddq[cosize_v<Resident>];
    alignas(1024) E k[cosize_v<Stream>];
    alignas(1024) E v[cosize_v<Stream>];
    alignas(1024) E ddk[cosize_v<Stream>];
    alignas(1024) E ddv[cosize_v<Stream>];
    Barriers<S> bar;
  };

  struct Params {
    TmaRes tma_q, tma_ddq;
    TmaStream tma_k, tma_v, tma_ddk, tma_ddv;
    const void *o, *do_;
    const float* lse;
    void* gdo;
    RowStats* stats;
    int batch, seq, heads, padded;
    float scale;
    bool causal;
  };
  static constexpr int kStageBytes = 4 * N * D * int(sizeof(E));
  static constexpr int kResidentBytes = 2 * kRowsPerCta * D * int(sizeof(E));
};

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    sweep1_kernel(CUTE_GRID_CONSTANT typename Sweep1<Cfg>::Params const p) {
  using K = Sweep1<Cfg>;
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
  Tensor sddQ = make_tensor(make_smem_ptr(sh.ddq), typename K::Resident{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename K::Stream{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename K::Stream{});
  Tensor sddK = make_tensor(make_smem_ptr(sh.ddk), typename K::Stream{});
  Tensor sddV = make_tensor(make_smem_ptr(sh.ddv), typename K::Stream{});

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) {
      uint64_t* res = &sh.bar.resident;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(res, K::kResidentBytes);
      for (int w = 0; w < kConsumerWarpgroups; ++w) {
        int blk = m_blk * kConsumerWarpgroups + w;
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_q, sQ, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_ddq, sddQ, res, p.batch, p.seq, p.heads, b, h, blk, w);
      }
      for (int n = 0; n < n_end; ++n) {
        int s = n % S;
        uint32_t phase = (n / S) & 1;
        cutlass::arch::ClusterBarrier::wait(&sh.bar.empty[s], phase ^ 1);
        uint64_t* full = &sh.bar.full[s];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, K::kStageBytes);
        tma_load_rows<N, D>(p.tma_k, sK, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_v, sV, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_ddk, sddK, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_ddv, sddV, full, p.batch, p.seq, p.heads, b, h, n, s);
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

  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));      // (MMA, M, K, WG)
  Tensor tSrddQ = thr_s.make_fragment_A(thr_s.partition_A(sddQ));
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));      // (MMA, N, K, S)
  Tensor tSrddK = thr_s.make_fragment_B(thr_s.partition_B(sddK));
  Tensor sVt = make_tensor(make_smem_ptr(sh.v), typename K::StreamT{});
  Tensor sddVt = make_tensor(make_smem_ptr(sh.ddv), typename K::StreamT{});
  Tensor tOrVt = thr_o.make_fragment_B(thr_o.partition_B(sVt));    // (MMA, D, N, S)
  Tensor tOrddVt = thr_o.make_fragment_B(thr_o.partition_B(sddVt));

  Tensor cS = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor cO = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor tOcO = thr_o.partition_C(cO);

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accDD = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accA = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor rP = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<N>>{}));
  Tensor rPddS = make_fragment_like(rP);
  static_assert(decltype(size(rP))::value == decltype(size(accS))::value);
  clear(accA);

  // Row statistics of this thread's two rows (slot 0: r, slot 1: r + 8).
  const int64_t row_stride = int64_t(p.heads) * D;
  const int64_t bh_base = (int64_t(b) * p.seq * p.heads + h) * D;
  float lse_log2[2], dvec[2] = {0.f, 0.f}, dd_part[2] = {0.f, 0.f};
  CUTE_UNROLL
  for (int slot = 0; slot < 2; ++slot) {
    int row = row0 + get<0>(tScS(2 * slot));
    lse_log2[slot] = row < p.seq
                         ? p.lse[(int64_t(b) * p.heads + h) * p.seq + row] * float(M_LOG2E)
                         : INFINITY;
  }
  CUTE_UNROLL
  for (int i = 0; i < size(accA); i += 2) {
    int row = row0 + get<0>(tOcO(i));
    if (row < p.seq) {
      int64_t off = bh_base + row * row_stride + get<1>(tOcO(i));
      float2 o = load_pair<E>(p.o, off), g = load_pair<E>(p.do_, off);
      dvec[row_slot(i)] += o.x * g.x + o.y * g.y;
    }
  }
  dvec[0] = quad_sum(dvec[0]);
  dvec[1] = quad_sum(dvec[1]);

  const float scale_log2 = p.scale * float(M_LOG2E);
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.resident, 0);

  for (int n = 0; n < n_end; ++n) {
    int s = n % S;
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full[s], (n / S) & 1);
    const int col0 = n * N;
    const bool active = !p.causal || col0 <= row0 + kRowsPerWarpgroup - 1;
    if (active) {
      wgmma<true>(mma_s, tSrQ(_, _, _, w), tSrK(_, _, _, s), accS);
      wgmma<true>(mma_s, tSrddQ(_, _, _, w), tSrK(_, _, _, s), accDD);
      wgmma<false>(mma_s, tSrQ(_, _, _, w), tSrddK(_, _, _, s), accDD);
      warpgroup_wait<0>();
      const bool mask = col0 + N > p.seq || (p.causal && col0 + N - 1 > row0);
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        int slot = row_slot(i);
        float pr = exp2_approx(accS(i) * scale_log2 - lse_log2[slot]);
        if (mask) {
          int row = row0 + get<0>(tScS(i)), col = col0 + get<1>(tScS(i));
          if (col >= p.seq || (p.causal && col > row)) pr = 0.f;
        }
        float dds = accDD(i) * p.scale;
        dd_part[slot] += pr * dds;
        rP(i) = E(pr);
        rPddS(i) = E(pr * dds);
      }
      wgmma<false>(mma_o, rP, tOrddVt(_, _, _, s), accA);
      wgmma<false>(mma_o, rPddS, tOrVt(_, _, _, s), accA);
      warpgroup_wait<0>();
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }

  float dd[2] = {quad_sum(dd_part[0]), quad_sum(dd_part[1])};
  float bpart[2] = {0.f, 0.f};
  E* gdo = static_cast<E*>(p.gdo);
  CUTE_UNROLL
  for (int i = 0; i < size(accA); i += 2) {
    int slot = row_slot(i);
    int row = row0 + get<0>(tOcO(i));
    if (row < p.seq) {
      int64_t off = bh_base + row * row_stride + get<1>(tOcO(i));
      float2 o = load_pair<E>(p.o, off), g = load_pair<E>(p.do_, off);
      bpart[slot] += g.x * accA(i) + g.y * accA(i + 1);
      gdo[off] = E(accA(i) - dd[slot] * o.x);
      gdo[off + 1] = E(accA(i + 1) - dd[slot] * o.y);
    }
  }
  CUTE_UNROLL
  for (int slot = 0; slot < 2; ++slot) {
    float bsum = quad_sum(bpart[slot]);
    if (tid % 4 == 0) {
      int row = row0 + get<0>(tScS(2 * slot));
      RowStats st;
      st.lse_log2 = lse_log2[slot];
      st.d = dvec[slot];
      st.dd = dd[slot];
      st.b = bsum - 2.f * dvec[slot] * dd[slot];
      p.stats[(int64_t(b) * p.heads + h) * p.padded + row] = st;
    }
  }
}

// ---------------------------------------------------------------------------------
// Sweep 2 (key-major). Resident K, V, ddK, ddV; per query block, transposed tiles
// S^T = K Q^T, dP^T = V dO^T, ddS^T = s (K ddQ^T + ddK Q^T), X^T = ddV dO^T, then
// K' += dS^T ddQ + dS'^T Q and V' += ddP^T dO.
// ---------------------------------------------------------------------------------
template <class Cfg>
struct Sweep2 {
  using E = typename Cfg::E;
  static constexpr int D = Cfg::D;
  static constexpr int N = Cfg::kQueryBlock;
  static constexpr int S = Cfg::kQueryStages;
  using Resident = typename Cfg::template Smem<kRowsPerWarpgroup, kConsumerWarpgroups>;
  using Stream = typename Cfg::template Smem<N, S>;
  using StreamT = typename Cfg::template SmemT<N, S>;
  using TmaRes = RowTma<Cfg, kRowsPerWarpgroup>;
  using TmaStream = RowTma<Cfg, N>;

  struct Shared {
    alignas(1024) E k[cosize_v<Resident>];
    alignas(1024) E v[cosize_v<Resident>];
    alignas(1024) E ddk[cosize_v<Resident>];
    alignas(1024) E ddv[cosize_v<Resident>];
    alignas(1024) E q[cosize_v<Stream>];
    alignas(1024) E do_[cosize_v<Stream>];
    alignas(1024) E ddq[cosize_v<Stream>];
    alignas(16) RowStats stats[S][N];
    Barriers<S> bar;
  };

  struct Params {
    TmaRes tma_k, tma_v, tma_ddk, tma_ddv;
    TmaStream tma_q, tma_do, tma_ddq;
    const RowStats* stats;
    void *gk, *gv;
    int batch, seq, heads, padded;
    float scale;
    bool causal;
  };
  static constexpr int kStatBytes = N * int(sizeof(RowStats));
  static constexpr int kStageBytes = 3 * N * D * int(sizeof(E)) + kStatBytes;
  static constexpr int kResidentBytes = 4 * kRowsPerCta * D * int(sizeof(E));
};

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    sweep2_kernel(CUTE_GRID_CONSTANT typename Sweep2<Cfg>::Params const p) {
  using K = Sweep2<Cfg>;
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
  Tensor sddK = make_tensor(make_smem_ptr(sh.ddk), typename K::Resident{});
  Tensor sddV = make_tensor(make_smem_ptr(sh.ddv), typename K::Resident{});
  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename K::Stream{});
  Tensor sdO = make_tensor(make_smem_ptr(sh.do_), typename K::Stream{});
  Tensor sddQ = make_tensor(make_smem_ptr(sh.ddq), typename K::Stream{});

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) {
      uint64_t* res = &sh.bar.resident;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(res, K::kResidentBytes);
      for (int w = 0; w < kConsumerWarpgroups; ++w) {
        int blk = n_blk * kConsumerWarpgroups + w;
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_k, sK, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_v, sV, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_ddk, sddK, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_ddv, sddV, res, p.batch, p.seq, p.heads, b, h, blk, w);
      }
      const RowStats* stats = p.stats + (int64_t(b) * p.heads + h) * p.padded;
      for (int m = m_begin; m < num_m; ++m) {
        int it = m - m_begin;
        int s = it % S;
        cutlass::arch::ClusterBarrier::wait(&sh.bar.empty[s], ((it / S) & 1) ^ 1);
        uint64_t* full = &sh.bar.full[s];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, K::kStageBytes);
        tma_load_rows<N, D>(p.tma_q, sQ, full, p.batch, p.seq, p.heads, b, h, m, s);
        tma_load_rows<N, D>(p.tma_do, sdO, full, p.batch, p.seq, p.heads, b, h, m, s);
        tma_load_rows<N, D>(p.tma_ddq, sddQ, full, p.batch, p.seq, p.heads, b, h, m, s);
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
  Tensor tSrddK = thr_s.make_fragment_A(thr_s.partition_A(sddK));
  Tensor tSrddV = thr_s.make_fragment_A(thr_s.partition_A(sddV));
  Tensor tSrQ = thr_s.make_fragment_B(thr_s.partition_B(sQ));     // (MMA, N, K, S)
  Tensor tSrdO = thr_s.make_fragment_B(thr_s.partition_B(sdO));
  Tensor tSrddQ = thr_s.make_fragment_B(thr_s.partition_B(sddQ));
  Tensor sQt = make_tensor(make_smem_ptr(sh.q), typename K::StreamT{});
  Tensor sdOt = make_tensor(make_smem_ptr(sh.do_), typename K::StreamT{});
  Tensor sddQt = make_tensor(make_smem_ptr(sh.ddq), typename K::StreamT{});
  Tensor tOrQt = thr_o.make_fragment_B(thr_o.partition_B(sQt));   // (MMA, D, N, S)
  Tensor tOrdOt = thr_o.make_fragment_B(thr_o.partition_B(sdOt));
  Tensor tOrddQt = thr_o.make_fragment_B(thr_o.partition_B(sddQt));

  Tensor cS = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor cO = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor tOcO = thr_o.partition_C(cO);

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accP = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accDD = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accK = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor accV = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor rdS = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<N>>{}));
  Tensor rddP = make_fragment_like(rdS);
  Tensor rdS2 = make_fragment_like(rdS);
  clear(accK);
  clear(accV);

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
      wgmma<true>(mma_s, tSrK(_, _, _, w), tSrddQ(_, _, _, s), accDD);
      wgmma<false>(mma_s, tSrddK(_, _, _, w), tSrQ(_, _, _, s), accDD);
      warpgroup_wait<0>();
      const bool mask = p.causal && q0 < key0 + kRowsPerWarpgroup - 1;
      const RowStats* st_s = sh.stats[s];
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        int col = get<1>(tScS(i));
        RowStats st = st_s[col];  // rows past T: lse = +inf, so P = 0
        float pr = exp2_approx(accS(i) * scale_log2 - st.lse_log2);
        if (mask && q0 + col < key0 + get<0>(tScS(i))) pr = 0.f;
        float dp = accP(i), dds = accDD(i) * scale;
        rdS(i) = E(scale * pr * (dp - st.d));
        rddP(i) = E(pr * (dds - st.dd));
        accP(i) = dp * (dds - st.dd) - dds * st.d;  // dP' without its dO ddV^T term
        accS(i) = pr;
      }
      wgmma<true>(mma_s, tSrddV(_, _, _, w), tSrdO(_, _, _, s), accDD);  // X^T = ddV dO^T
      wgmma<false>(mma_o, rdS, tOrddQt(_, _, _, s), accK);
      wgmma<false>(mma_o, rddP, tOrdOt(_, _, _, s), accV);
      warpgroup_wait<0>();
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        float b_row = st_s[get<1>(tScS(i))].b;
        rdS2(i) = E(scale * accS(i) * (accDD(i) + accP(i) - b_row));
      }
      wgmma<false>(mma_o, rdS2, tOrQt(_, _, _, s), accK);
      warpgroup_wait<0>();
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }

  store_rows<E, D>(accK, tOcO, p.gk, p.seq, p.heads, b, h, key0);
  store_rows<E, D>(accV, tOcO, p.gv, p.seq, p.heads, b, h, key0);
}

// ---------------------------------------------------------------------------------
// Sweep 3 (query-major). Resident Q, dO, ddQ; per key block S, dP, ddS, X = dO ddV^T,
// then Q' += dS ddK + dS' K.
// ---------------------------------------------------------------------------------
template <class Cfg>
struct Sweep3 {
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
    alignas(1024) E ddq[cosize_v<Resident>];
    alignas(1024) E k[cosize_v<Stream>];
    alignas(1024) E v[cosize_v<Stream>];
    alignas(1024) E ddk[cosize_v<Stream>];
    alignas(1024) E ddv[cosize_v<Stream>];
    Barriers<S> bar;
  };

  struct Params {
    TmaRes tma_q, tma_do, tma_ddq;
    TmaStream tma_k, tma_v, tma_ddk, tma_ddv;
    const RowStats* stats;
    void* gq;
    int batch, seq, heads, padded;
    float scale;
    bool causal;
  };
  static constexpr int kStageBytes = 4 * N * D * int(sizeof(E));
  static constexpr int kResidentBytes = 3 * kRowsPerCta * D * int(sizeof(E));
};

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    sweep3_kernel(CUTE_GRID_CONSTANT typename Sweep3<Cfg>::Params const p) {
  using K = Sweep3<Cfg>;
  using E = typename K::E;
  static_assert(sizeof(typename K::Shared) <= kMaxSharedBytes, "shared memory over the sm_90 limit");
  constexpr int D = K::D, N = K::N, S = K::S;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sh = *reinterpret_cast<typename K::Shared*>(smem_raw);

  const int num_m = gridDim.x;
  const int m_blk = p.causal ? num_m - 1 - int(blockIdx.x) : int(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int num_n = (p.seq + N - 1) / N;
  const int n_end = p.causal ? min(num_n, ((m_blk + 1) * kRowsPerCta + N - 1) / N) : num_n;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sh.bar.init();
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(sh.q), typename K::Resident{});
  Tensor sdO = make_tensor(make_smem_ptr(sh.do_), typename K::Resident{});
  Tensor sddQ = make_tensor(make_smem_ptr(sh.ddq), typename K::Resident{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename K::Stream{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename K::Stream{});
  Tensor sddK = make_tensor(make_smem_ptr(sh.ddk), typename K::Stream{});
  Tensor sddV = make_tensor(make_smem_ptr(sh.ddv), typename K::Stream{});

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x == 0) {
      uint64_t* res = &sh.bar.resident;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(res, K::kResidentBytes);
      for (int w = 0; w < kConsumerWarpgroups; ++w) {
        int blk = m_blk * kConsumerWarpgroups + w;
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_q, sQ, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_do, sdO, res, p.batch, p.seq, p.heads, b, h, blk, w);
        tma_load_rows<kRowsPerWarpgroup, D>(p.tma_ddq, sddQ, res, p.batch, p.seq, p.heads, b, h, blk, w);
      }
      for (int n = 0; n < n_end; ++n) {
        int s = n % S;
        cutlass::arch::ClusterBarrier::wait(&sh.bar.empty[s], ((n / S) & 1) ^ 1);
        uint64_t* full = &sh.bar.full[s];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, K::kStageBytes);
        tma_load_rows<N, D>(p.tma_k, sK, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_v, sV, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_ddk, sddK, full, p.batch, p.seq, p.heads, b, h, n, s);
        tma_load_rows<N, D>(p.tma_ddv, sddV, full, p.batch, p.seq, p.heads, b, h, n, s);
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
  Tensor tSrddQ = thr_s.make_fragment_A(thr_s.partition_A(sddQ));
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));
  Tensor tSrV = thr_s.make_fragment_B(thr_s.partition_B(sV));
  Tensor tSrddK = thr_s.make_fragment_B(thr_s.partition_B(sddK));
  Tensor tSrddV = thr_s.make_fragment_B(thr_s.partition_B(sddV));
  Tensor sKt = make_tensor(make_smem_ptr(sh.k), typename K::StreamT{});
  Tensor sddKt = make_tensor(make_smem_ptr(sh.ddk), typename K::StreamT{});
  Tensor tOrKt = thr_o.make_fragment_B(thr_o.partition_B(sKt));
  Tensor tOrddKt = thr_o.make_fragment_B(thr_o.partition_B(sddKt));

  Tensor cS = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor tScS = thr_s.partition_C(cS);
  Tensor cO = make_identity_tensor(Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor tOcO = thr_o.partition_C(cO);

  Tensor accS = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accP = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accDD = partition_fragment_C(mma_s, Shape<Int<kRowsPerWarpgroup>, Int<N>>{});
  Tensor accQ = partition_fragment_C(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<D>>{});
  Tensor rdS = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRowsPerWarpgroup>, Int<N>>{}));
  Tensor rdS2 = make_fragment_like(rdS);
  clear(accQ);

  RowStats st[2];
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
      wgmma<true>(mma_s, tSrddQ(_, _, _, w), tSrK(_, _, _, s), accDD);
      wgmma<false>(mma_s, tSrQ(_, _, _, w), tSrddK(_, _, _, s), accDD);
      warpgroup_wait<0>();
      const bool mask = col0 + N > p.seq || (p.causal && col0 + N - 1 > row0);
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        const RowStats& r = st[row_slot(i)];
        float pr = exp2_approx(accS(i) * scale_log2 - r.lse_log2);
        if (mask) {
          int row = row0 + get<0>(tScS(i)), col = col0 + get<1>(tScS(i));
          if (col >= p.seq || (p.causal && col > row)) pr = 0.f;
        }
        float dp = accP(i), dds = accDD(i) * scale;
        rdS(i) = E(scale * pr * (dp - r.d));
        accP(i) = dp * (dds - r.dd) - dds * r.d;  // dP' without its dO ddV^T term
        accS(i) = pr;
      }
      wgmma<true>(mma_s, tSrdO(_, _, _, w), tSrddV(_, _, _, s), accDD);  // X = dO ddV^T
      wgmma<false>(mma_o, rdS, tOrddKt(_, _, _, s), accQ);
      warpgroup_wait<0>();
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        rdS2(i) = E(scale * accS(i) * (accDD(i) + accP(i) - st[row_slot(i)].b));
      }
      wgmma<false>(mma_o, rdS2, tOrKt(_, _, _, s), accQ);
      warpgroup_wait<0>();
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }

  store_rows<E, D>(accQ, tOcO, p.gq, p.seq, p.heads, b, h, row0);
}

}  // namespace mgd
