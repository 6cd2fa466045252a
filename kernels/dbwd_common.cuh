// Shared pieces of the three double-backward sweeps: tile shapes, shared-memory
// layouts, TMA descriptors, and the small device helpers every sweep uses.
// The math and the sweep structure are explained in kernels/DESIGN.md.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

namespace mgd {

using namespace cute;

// One consumer warpgroup owns 64 resident rows (the M of one wgmma); two consumer
// warpgroups share each streamed tile, and one producer warpgroup (one elected
// thread) feeds them through TMA.
constexpr int kRowsPerWarpgroup = 64;
constexpr int kConsumerWarpgroups = 2;
constexpr int kRowsPerCta = kRowsPerWarpgroup * kConsumerWarpgroups;
constexpr int kThreads = 128 * (kConsumerWarpgroups + 1);
// setmaxnreg budgets: 24 for the producer, 240 for the consumers,
// 128*24 + 256*240 = 64512 <= 65536 registers of one SM.
constexpr int kProducerRegisters = 24;
// Largest dynamic shared memory one CTA may opt in to on sm_90.
constexpr int kMaxSharedBytes = 227 * 1024;
constexpr int kConsumerRegisters = 240;

// Row statistics handed from sweep 1 to sweeps 2 and 3, one float4 per query row:
// (lse * log2(e), D = rowsum(dO * O), dd = rowsum(ddS * P), b = rowsum(dP' * P)).
// Rows past T (up to the padded length) carry lse = +inf, so P = 0 there.
struct RowStats {
  float lse_log2, d, dd, b;
};

// Arguments of one double-backward call, all device pointers, layout [B, T, H, D]
// (lse [B, H, T]). `stats` is a workspace of B * H * padded_rows(T) RowStats.
struct DoubleBackwardArgs {
  const void *q, *k, *v, *o, *do_, *ddq, *ddk, *ddv;
  const float* lse;
  void *gq, *gk, *gv, *gdo;
  RowStats* stats;
  int batch, seq, heads, head_dim;
  float scale;
  bool causal;
  int sweeps;  // kSweepRows | kSweepKV | kSweepQ
};

inline int padded_rows(int seq) {
  return (seq + kRowsPerCta - 1) / kRowsPerCta * kRowsPerCta;
}

template <class Element, int kHeadDim>
struct TileConfig {
  using E = Element;
  static constexpr int D = kHeadDim;
  // Query-major sweeps (1: row statistics and dO'; 3: Q') stream key blocks of kKeyBlock.
  static constexpr int kKeyBlock = 64;
  // A 64-key tile takes longer to arrive from L2 than to consume at D=64, so the
  // producer runs up to three tiles ahead there; at D=128 two stages fill shared memory.
  static constexpr int kKeyStages = kHeadDim == 128 ? 2 : 4;
  // The key-major sweep (2: K', V') keeps K', V' accumulators (2 * D/2 registers per
  // thread) and four score-sized tiles live, so it streams narrower query blocks at D=128.
  static constexpr int kQueryBlock = kHeadDim == 128 ? 32 : 64;
  static constexpr int kQueryStages = kHeadDim == 128 ? 3 : 4;

  // Row-major tiles of `rows` x D with D contiguous, swizzled for TMA and wgmma.
  template <int rows, int stages>
  using Smem = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{},
                                      Shape<Int<rows>, Int<D>, Int<stages>>{}));
  // The same bytes seen as (D, rows, stages): the MN-major B operand of the
  // products that reduce over the rows of the tile (P V, dS^T ddQ, ...).
  template <int rows, int stages>
  using SmemT = decltype(composition(
      Smem<rows, stages>{},
      make_layout(Shape<Int<D>, Int<rows>, Int<stages>>{},
                  Stride<Int<rows>, _1, Int<rows * D>>{})));

  // Scores-shaped products: (64 rows) x (n streamed rows), reduction over D.
  template <int n>
  using MmaScores = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<kRowsPerWarpgroup>, Int<n>, Int<D>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  // Output-shaped products: (64 rows) x D, reduction over n streamed rows, A in registers.
  template <int n>
  using MmaOut = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<Int<kRowsPerWarpgroup>, Int<D>, Int<n>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
};

// A [B, T, H, D] tensor as CuTe sees it for TMA: (T, D, H, B).
template <class E, int D>
auto gmem_bthd(const void* ptr, int batch, int seq, int heads) {
  return make_tensor(make_gmem_ptr(static_cast<const E*>(ptr)),
                     make_shape(seq, Int<D>{}, heads, batch),
                     make_stride(int64_t(heads) * D, _1{}, int64_t(D), int64_t(seq) * heads * D));
}

// TMA descriptor loading `rows` x D boxes of one (batch, head) slice; rows past T
// are filled with zeros by the copy engine.
template <class Cfg, int rows>
auto make_row_tma(const void* ptr, int batch, int seq, int heads) {
  auto g = gmem_bthd<typename Cfg::E, Cfg::D>(ptr, batch, seq, heads);
  return make_tma_atom(SM90_TMA_LOAD{}, g,
                       typename Cfg::template Smem<rows, 1>{}(_, _, 0),
                       Shape<Int<rows>, Int<Cfg::D>>{});
}

template <class Cfg, int rows>
using RowTma = decltype(make_row_tma<Cfg, rows>(nullptr, 1, 1, 1));

// Issues the TMA of row block `block` of (batch b, head h) into slot `slot` of a
// staged shared-memory tensor (rows, D, slots), completing on `bar`.
template <int rows, int D, class Tma, class SmemTensor>
CUTE_DEVICE void tma_load_rows(Tma const& tma, SmemTensor const& smem, uint64_t* bar,
                               int batch, int seq, int heads, int b, int h, int block,
                               int slot) {
  Tensor m = tma.get_tma_tensor(make_shape(seq, Int<D>{}, heads, batch));
  Tensor g = local_tile(m(_, _, h, b), Shape<Int<rows>, Int<D>>{}, make_coord(_, 0));
  auto [tg, ts] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem),
                                group_modes<0, 2>(g));
  copy(tma.with(*bar), tg(_, block), ts(_, slot));
}

// One warpgroup-wide product, issued asynchronously: C (+)= A B over all k-blocks.
// The caller waits with warpgroup_wait<N>() before reading C.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
CUTE_DEVICE void wgmma(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !is_same_v<typename TA::value_type, GmmaDescriptor>;
  CUTE_STATIC_ASSERT_V(size<2>(a) == size<2>(b));  // same number of k-blocks
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

CUTE_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Sum over the four threads of a quad, which hold the columns of the same rows.
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x;
}

// Row slot (0: row r, 1: row r + 8) of accumulator element i: the wgmma C layout
// holds (2 columns, 2 row halves, n/8 column groups) per thread, column-major.
CUTE_DEVICE int row_slot(int i) { return (i >> 1) & 1; }

// Writes a (64 x D) fp32 accumulator to rows [row0, row0 + 64) of a [B, T, H, D]
// tensor at (b, h), in the element type, skipping rows past T.
template <class E, int D, class Acc, class Coords>
CUTE_DEVICE void store_rows(Acc const& acc, Coords const& coords, void* out, int seq, int heads,
                            int b, int h, int row0) {
  E* base = static_cast<E*>(out) + (int64_t(b) * seq * heads + h) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    int row = row0 + get<0>(coords(i));
    int col = get<1>(coords(i));
    if (row < seq) {
      E* p = base + int64_t(row) * heads * D + col;
      p[0] = E(acc(i));
      p[1] = E(acc(i + 1));
    }
  }
}

template <class E>
CUTE_DEVICE float2 load_pair(const void* ptr, int64_t offset) {
  const E* p = static_cast<const E*>(ptr) + offset;
  return make_float2(float(p[0]), float(p[1]));
}

}  // namespace mgd
