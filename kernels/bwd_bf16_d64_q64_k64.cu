// Block variant of the bf16 head_dim-64 backward, chosen at run time by
// MGD_BWD_D64_BLOCKS=64x64 (built with MGD_BWD_D64_VARIANTS): 64-query blocks in the
// key-major kernel, 64-key blocks in the query-major kernel.
#include "bwd_launch.cuh"

namespace mgd {
template cudaError_t launch_backward<cutlass::bfloat16_t, 64, 64, 64>(const BackwardArgs&,
                                                                      cudaStream_t);
}  // namespace mgd
