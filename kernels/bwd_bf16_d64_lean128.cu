// Block variant of the bf16 head_dim-64 backward, chosen at run time by
// MGD_BWD_D64_BLOCKS=lean128 (built with MGD_BWD_D64_VARIANTS): 128x128 blocks with dS
// formed from P's bf16 copy (no wgmma serialized for want of registers, no spills), and
// the fused mode's key-major kernel on 128-query blocks (two 64-query dQ chunks per block
// through one bulk-reduce stage, two query stages).
#include "bwd_launch.cuh"

namespace mgd {
template cudaError_t launch_backward<cutlass::bfloat16_t, 64, 128, 128, 128, true>(
    const BackwardArgs&, cudaStream_t);
}  // namespace mgd
