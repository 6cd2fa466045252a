// Online softmax of the forward, per consumer thread: each thread holds two query rows
// (row slots r and r + 8 of the wgmma C layout), a quad of four threads one row's columns.
#pragma once

#include "dbwd_common.cuh"

namespace mgd {

CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return x;
}

struct OnlineSoftmax {
  // Running row max of the raw scores (before the scale) and this thread's share of
  // the row sum of exp2((S - max) * scale * log2 e); the quad's shares add up at the end.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  // Turns the scores of one key block into unnormalized probabilities in place and
  // returns in `corr` the factor by which earlier partial outputs must be rescaled.
  template <bool kFirst, class Acc>
  CUTE_DEVICE void update(Acc& s, float scale_log2, float (&corr)[2]) {
    float m[2] = {row_max[0], row_max[1]};
    CUTE_UNROLL
    for (int i = 0; i < size(s); ++i) m[row_slot(i)] = fmaxf(m[row_slot(i)], s(i));
    float offset[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      m[r] = quad_max(m[r]);
      // A row with every key masked so far keeps max -inf; its probabilities are 0.
      offset[r] = m[r] == -INFINITY ? 0.f : m[r] * scale_log2;
      corr[r] = kFirst ? 1.f : exp2_approx(row_max[r] * scale_log2 - offset[r]);
      row_max[r] = m[r];
    }
    float block_sum[2] = {0.f, 0.f};
    CUTE_UNROLL
    for (int i = 0; i < size(s); ++i) {
      const int r = row_slot(i);
      s(i) = exp2_approx(fmaf(s(i), scale_log2, -offset[r]));
      block_sum[r] += s(i);
    }
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) row_sum[r] = kFirst ? block_sum[r] : row_sum[r] * corr[r] + block_sum[r];
  }

  template <class Acc>
  CUTE_DEVICE void rescale(Acc& o, float const (&corr)[2]) {
    CUTE_UNROLL
    for (int i = 0; i < size(o); ++i) o(i) *= corr[row_slot(i)];
  }
};

}  // namespace mgd
