// Epilogue of the forward: O = (P V) / rowsum, written in the input dtype, and
// lse = max * scale + ln(rowsum) in float32. Rows past T are not written.
#pragma once

#include "fwd_mainloop.cuh"

namespace mgd {

template <class Cfg, class AccO>
CUTE_DEVICE void fwd_epilogue(FwdParams<Cfg> const& p, FwdTile const& t, int w, int tid,
                              AccO& accO, OnlineSoftmax const& sm) {
  using E = typename Cfg::E;
  constexpr int D = Cfg::D, R = kRowsPerWarpgroup;
  typename Cfg::MmaO mma_o;
  Tensor tOcO = mma_o.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<R>, Int<D>>{}));
  const int row0 = t.m_blk * Cfg::kRowsPerCta + w * R;

  float inv[2], lse[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    float l = quad_sum(sm.row_sum[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    lse[r] = l > 0.f ? sm.row_max[r] * p.scale + logf(l) : -INFINITY;
  }

  E* base = static_cast<E*>(p.o) + (int64_t(t.b) * p.seq * p.heads + t.h) * D;
  const int64_t row_stride = int64_t(p.heads) * D;
  CUTE_UNROLL
  for (int i = 0; i < size(accO); i += 2) {
    const int r = row_slot(i);
    const int row = row0 + get<0>(tOcO(i));
    if (row < p.seq) {
      // Two adjacent columns of one row: one 4-byte store.
      cutlass::Array<E, 2> pair;
      pair[0] = E(accO(i) * inv[r]);
      pair[1] = E(accO(i + 1) * inv[r]);
      *reinterpret_cast<cutlass::Array<E, 2>*>(base + row * row_stride + get<1>(tOcO(i))) = pair;
    }
  }
  if (tid % 4 == 0) {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + get<0>(tOcO(2 * r));
      if (row < p.seq) p.lse[(int64_t(t.b) * p.heads + t.h) * p.seq + row] = lse[r];
    }
  }
}

}  // namespace mgd
