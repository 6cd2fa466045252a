// Block variant of the bf16 head_dim-64 backward, chosen at run time by
// MGD_BWD_D64_BLOCKS=128x128 (built with MGD_BWD_D64_VARIANTS): the key-major kernel
// streams 128-query blocks, the query-major kernel 128-key blocks.
#include "bwd_launch.cuh"

namespace mgd {
template cudaError_t launch_backward<cutlass::bfloat16_t, 64, 128, 128>(const BackwardArgs&,
                                                                        cudaStream_t);
}  // namespace mgd
