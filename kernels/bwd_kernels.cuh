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
  bool bulk_reduce;  // fused mode: DqMode::kBulk, else kRed
};

template <class Element, int kHeadDim, int kQueryBlockD64 = 64, int kKeyBlockD64 = 64,
          bool kPBf16 = false>
struct BwdConfig : TileConfig<Element, kHeadDim> {
  // The key-major kernel forms dS from P's bf16 copy rather than the fp32 tile, which
  // frees the S registers early (what lets 128-query blocks keep their wgmma overlap).
  static constexpr bool kDsFromBf16P = kPBf16;
  // Key-major kernel: dK and dV accumulators (2 * D/2 registers per thread) plus two
  // 64 x 64 score tiles fit the 240 consumer registers at both head dims. At D=64 the
  // accumulators are half as wide, which leaves room for 128-query blocks (two 64 x 128
  // score tiles, n128 score products as in FA3's D=64 backward).
  static_assert(kQueryBlockD64 == 64 || kQueryBlockD64 == 128, "query block 64 or 128");
  static_assert(kKeyBlockD64 == 64 || kKeyBlockD64 == 128, "key block 64 or 128");
  static constexpr int kQueryBlock = kHeadDim == 64 ? kQueryBlockD64 : 64;
  static constexpr int kQueryStages = kHeadDim == 128 || kQueryBlock == 128 ? 3 : 4;
  // Query-major kernel: only the dQ accumulator is long-lived; 128-key blocks at D=64
  // likewise take two 64 x 128 score tiles.
  static constexpr int kKeyBlock = kHeadDim == 64 ? kKeyBlockD64 : 64;
  static constexpr int kKeyStages = kHeadDim == 128 || kKeyBlock == 128 ? 3 : 4;
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
// Fused dQ: how the key-major kernel adds its dQ partials to the fp32 accumulator.
// ---------------------------------------------------------------------------------
// kNone: not at all (the split: the query-major kernel writes dQ).
// kRed:  each warpgroup's (query block) x D partial over its own keys, per-thread
//        red.global.add into the row-major accumulator [B, H, padded, D].
// kBulk: 64 x 64 partials staged in shared memory in the wgmma C register order and
//        added by one cp.reduce.async.bulk per warpgroup into the chunked accumulator
//        [B, H, padded / 64, D / 64, 64 * 64] (same order); at D=128 warpgroup w takes
//        columns [64 w, 64 w + 64) over all 128 keys, so one 64 x D reduction per block.
// Either way the order of the additions, hence the last bits of dQ, vary between runs.
enum class DqMode { kNone, kRed, kBulk };

constexpr int kDqChunk = 64;                      // rows and columns of one staged partial
constexpr int kDqChunkFloats = kDqChunk * kDqChunk;

// The product and C layout of one 64 x 64 dQ chunk; the convert pass reads the same layout.
template <class E>
using DqChunkMma = decltype(make_tiled_mma(
    GMMA::ss_op_selector<E, E, float, Shape<Int<kDqChunk>, Int<kDqChunk>, Int<kRowsPerWarpgroup>>,
                         GMMA::Major::K, GMMA::Major::MN>()));

// Bulk async-group helpers of the issuing thread (PTX ISA: cp.reduce.async.bulk).
CUTE_DEVICE void bulk_reduce_add_f32(float* gmem, const float* smem, int bytes) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               "cp.async.bulk.commit_group;\n" ::"l"(gmem), "r"(s), "r"(bytes)
               : "memory");
}
// Waits until this thread's bulk operations have finished reading shared memory.
CUTE_DEVICE void bulk_wait_read_all() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Waits until this thread's bulk operations have completed.
CUTE_DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Named barriers of the key-major kernel (ids above CUTLASS's reserved ones).
constexpr int kBarDsWarpgroup = 1;  // + w: one consumer warpgroup's 128 threads
constexpr int kBarDsBoth = 3;       // both consumer warpgroups: both dS tiles are in smem

// ---------------------------------------------------------------------------------
// Key-major kernel: dK and dV of 128 keys per CTA.
// ---------------------------------------------------------------------------------
template <class Cfg, DqMode kDq = DqMode::kNone>
struct BwdKeyMajor {
  static constexpr bool kFuseDQ = kDq != DqMode::kNone;
  using E = typename Cfg::E;
  static constexpr int D = Cfg::D;
  static constexpr int N = Cfg::kQueryBlock;
  // The bulk mode at 128-query blocks needs its dQ staging room: two stages fit.
  static constexpr int S = kDq == DqMode::kBulk && N == 128 ? 2 : Cfg::kQueryStages;
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

  // Bulk mode: the resident keys as (64 keys, 64 columns, chunk + kDqChunks * warpgroup),
  // the same bytes as Resident (its SW128 atoms tile rows, then D, then warpgroups), and
  // their MN-major transpose, the B operand of one 64 x 64 chunk of dQ.
  static constexpr int kDqChunks = D / kDqChunk;
  // Query chunks of 64 rows per query block: at D=64 a 128-query block reduces two, one
  // after the other through the same stage.
  static constexpr int kRowChunks = N / kDqChunk;
  static_assert(kDq != DqMode::kBulk || N == kDqChunk || (N == 2 * kDqChunk && D == kDqChunk),
                "bulk mode: 64-query blocks, or 128-query blocks at D=64");
  // D=128: each warpgroup takes one column chunk over both warpgroups' keys.
  static constexpr bool kSplitD = kDq == DqMode::kBulk && kDqChunks == kConsumerWarpgroups;
  // The dS buffers seen as 64-query chunks, (64, 64 keys, chunk + kRowChunks * buffer): the
  // same bytes as DsLayout (its SW128 atoms tile the query rows first).
  using DsChunks = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<E>{},
      Shape<Int<kDqChunk>, Int<kRowsPerWarpgroup>, Int<kRowChunks * 2 * kConsumerWarpgroups>>{}));
  using ResidentChunks = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<E>{},
      Shape<Int<kRowsPerWarpgroup>, Int<kDqChunk>, Int<kDqChunks * kConsumerWarpgroups>>{}));
  using ResidentChunksT = decltype(composition(
      ResidentChunks{},
      make_layout(Shape<Int<kDqChunk>, Int<kRowsPerWarpgroup>, Int<kDqChunks * kConsumerWarpgroups>>{},
                  Stride<Int<kRowsPerWarpgroup>, _1, Int<kRowsPerWarpgroup * kDqChunk>>{})));
  static_assert(cosize_v<ResidentChunks> == cosize_v<Resident>);
  static_assert(cosize_v<DsChunks> == cosize_v<DsLayout>);

  struct Shared {
    alignas(1024) E k[cosize_v<Resident>];
    alignas(1024) E v[cosize_v<Resident>];
    alignas(1024) E q[cosize_v<Stream>];
    alignas(1024) E do_[cosize_v<Stream>];
    alignas(1024) E ds[kFuseDQ ? cosize_v<DsLayout> : 1];
    alignas(16) BwdRowStats stats[S][N];
    BwdBarriers<S> bar;
    // Bulk mode: one staged fp32 chunk per consumer warpgroup (bulk copies need 16 B).
    alignas(128) float dq_stage[kDq == DqMode::kBulk ? kConsumerWarpgroups * kDqChunkFloats : 4];
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

template <class Cfg, DqMode kDq>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_dkdv_kernel(CUTE_GRID_CONSTANT typename BwdKeyMajor<Cfg, kDq>::Params const p) {
  using K = BwdKeyMajor<Cfg, kDq>;
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
  // Bulk mode: 64 x 64 chunks of dQ from the same dS buffers and the resident keys.
  DqChunkMma<E> mma_dqc;
  auto thr_dqc = mma_dqc.get_thread_slice(tid);
  Tensor sKc = make_tensor(make_smem_ptr(sh.k), typename K::ResidentChunksT{});
  Tensor sDsc = make_tensor(make_smem_ptr(sh.ds), typename K::DsChunks{});
  Tensor tCrDs = thr_dqc.make_fragment_A(thr_dqc.partition_A(sDsc));  // (MMA, 1, K, chunk)
  Tensor tCrKt = thr_dqc.make_fragment_B(thr_dqc.partition_B(sKc));   // (MMA, 64, K, chunk)
  float4* stage = reinterpret_cast<float4*>(sh.dq_stage + w * kDqChunkFloats) + tid;
  // Bulk mode: one 64 x 64 dQ chunk (64-row chunk `row_chunk` of the padded rows) staged in
  // register order (conflict-free 16 B stores; the convert pass reads this order), then
  // added to the accumulator by one bulk reduce from one thread.
  auto stage_and_reduce = [&](auto const& accDQ, int row_chunk) {
    CUTE_UNROLL
    for (int v = 0; v < size(accDQ) / 4; ++v) {
      stage[v * 128] = make_float4(accDQ(4 * v), accDQ(4 * v + 1), accDQ(4 * v + 2),
                                   accDQ(4 * v + 3));
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by the bulk op
    cutlass::arch::NamedBarrier::sync(128, kBarDsWarpgroup + w);
    if (tid == 0) {
      const int chunk = K::kSplitD ? w : 0;
      float* dst = p.dq_accum +
                   ((bh * (p.padded / kDqChunk) + row_chunk) * K::kDqChunks + chunk) * kDqChunkFloats;
      bulk_reduce_add_f32(dst, sh.dq_stage + w * kDqChunkFloats, kDqChunkFloats * 4);
    }
  };

  const float scale = p.scale, scale_log2 = p.scale * float(M_LOG2E);
  const bool key_tail = K::kFuseDQ && key0 + kRowsPerWarpgroup > p.seq;
  cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.resident, 0);

  for (int m = m_begin; m < num_m; ++m) {
    int it = m - m_begin;
    int s = it % S;
    cutlass::arch::ClusterTransactionBarrier::wait(&sh.bar.full[s], (it / S) & 1);
    const int q0 = m * N;
    const bool active = !p.causal || q0 + N - 1 >= key0;
    // Split D: the dQ product reads both warpgroups' dS, so a masked one contributes zeros.
    if (K::kSplitD && !active) {
      CUTE_UNROLL
      for (int i = 0; i < size(rdS); ++i) rdS(i) = E(0.f);
    }
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
        // Keys past T (zero rows of K): P = 0, so dS stays finite where dQ multiplies it.
        if (key_tail && key0 + get<0>(tScS(i)) >= p.seq) pr = 0.f;
        accS(i) = pr;
        rP(i) = E(pr);
      }
      wgmma<false>(mma_o, rP, tOrdOt(_, _, _, s), accV);
      warpgroup_wait<1>();  // dP^T is ready; dV still runs
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) {
        const float pr = Cfg::kDsFromBf16P ? float(rP(i)) : accS(i);
        rdS(i) = E(scale * pr * (accP(i) - st_s[get<1>(tScS(i))].d));
      }
      if constexpr (kDq == DqMode::kRed) {
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
        // (wgmma C layout per 64-row tile of kTile elements: row slot (i >> 1) & 1 adds
        // 8 rows, (i % kTile) >> 2 adds 8 columns; tile i / kTile adds 64 rows).
        constexpr int kTile = kRowsPerWarpgroup * D / 128;
        float* acc = p.dq_accum + (bh * p.padded + q0 + get<0>(tQcQ(0))) * D + get<1>(tQcQ(0));
        CUTE_UNROLL
        for (int i = 0; i < size(accDQ); i += 2) {
          const int off = (i / kTile * kRowsPerWarpgroup + row_slot(i) * 8) * D +
                          (i % kTile >> 2) * 8;
          atomicAdd(reinterpret_cast<float2*>(acc + off), make_float2(accDQ(i), accDQ(i + 1)));
        }
      } else if constexpr (kDq == DqMode::kNone) {
        wgmma<false>(mma_o, rdS, tOrQt(_, _, _, s), accK);
        warpgroup_wait<0>();
      }
    }
    if constexpr (kDq == DqMode::kBulk) {
      if (active || K::kSplitD) {
        // dS buffers: 2 w + parity; a buffer is rewritten two iterations later, after
        // both warpgroups passed the next iteration's barrier, so its readers are done.
        const int par = it & 1;
        Tensor tSsDsT = thr_s.partition_C(sDsT(_, _, 2 * w + par));
        CUTE_UNROLL
        for (int i = 0; i < size(rdS); ++i) tSsDsT(i) = rdS(i);
        cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by wgmma
        if (tid == 0) bulk_wait_read_all();        // the last reduce has read the stage
        if constexpr (K::kSplitD) {
          cutlass::arch::NamedBarrier::sync(128 * kConsumerWarpgroups, kBarDsBoth);
        } else {
          cutlass::arch::NamedBarrier::sync(128, kBarDsWarpgroup + w);
        }
        if (active) {
          wgmma<false>(mma_o, rdS, tOrQt(_, _, _, s), accK);
          // D=128: rdS is free before the dQ accumulator is live (else ptxas serializes wgmma)
          if constexpr (D == 128) warpgroup_wait<0>();
        }
        Tensor accDQ = partition_fragment_C(mma_dqc, Shape<Int<kDqChunk>, Int<kDqChunk>>{});
        if constexpr (K::kSplitD) {  // columns [64 w, 64 w + 64) over all 128 keys
          wgmma<true>(mma_dqc, tCrDs(_, _, _, par), tCrKt(_, _, _, w), accDQ);
          wgmma<false>(mma_dqc, tCrDs(_, _, _, 2 + par), tCrKt(_, _, _, w + K::kDqChunks), accDQ);
          warpgroup_wait<0>();
          stage_and_reduce(accDQ, m);
        } else {  // D=64: all columns over this warpgroup's keys, one 64-query chunk at a time
          CUTE_UNROLL
          for (int c = 0; c < K::kRowChunks; ++c) {
            wgmma<true>(mma_dqc, tCrDs(_, _, _, c + K::kRowChunks * (2 * w + par)),
                        tCrKt(_, _, _, w), accDQ);
            warpgroup_wait<0>();
            if (c > 0) {  // the stage is free once the previous chunk's reduce has read it
              if (tid == 0) bulk_wait_read_all();
              cutlass::arch::NamedBarrier::sync(128, kBarDsWarpgroup + w);
            }
            stage_and_reduce(accDQ, m * K::kRowChunks + c);
          }
        }
      }
    }
    cutlass::arch::ClusterBarrier::arrive(&sh.bar.empty[s]);
  }
  if constexpr (kDq == DqMode::kBulk) {
    if (tid == 0) bulk_wait_all();  // shared memory stays allocated until the reads are done
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

// Bulk mode's postprocess: one CTA of 128 threads per 64 x 64 chunk of the chunked
// accumulator; thread t reads its 32 values (16 B loads, coalesced) and places them by
// the C layout of DqChunkMma, the order the key-major kernel staged them in.
template <class E, int D>
__global__ void __launch_bounds__(128)
    bwd_dq_convert_chunks_kernel(const float* __restrict__ accum, E* __restrict__ dq, int seq,
                                 int heads, int padded) {
  constexpr int C = D / kDqChunk;
  const int m = blockIdx.x / C, c = blockIdx.x % C;
  const int h = blockIdx.y, b = blockIdx.z;
  const int t = threadIdx.x;
  const float4* chunk = reinterpret_cast<const float4*>(
      accum + (((int64_t(b) * heads + h) * (padded / kDqChunk) + m) * C + c) * kDqChunkFloats);
  DqChunkMma<E> mma;
  auto thr = mma.get_thread_slice(t);
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kDqChunk>, Int<kDqChunk>>{}));
  static_assert(decltype(size(coord))::value * 128 == kDqChunkFloats);
  E* base = dq + (int64_t(b) * seq * heads + h) * D + c * kDqChunk;
  CUTE_UNROLL
  for (int v = 0; v < size(coord) / 4; ++v) {
    const float4 x = chunk[v * 128 + t];
    const float val[4] = {x.x, x.y, x.z, x.w};
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int row = m * kDqChunk + get<0>(coord(4 * v + j));
      if (row < seq) base[int64_t(row) * heads * D + get<1>(coord(4 * v + j))] = E(val[j]);
    }
  }
}

}  // namespace mgd
