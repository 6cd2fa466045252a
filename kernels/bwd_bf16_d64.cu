// One instantiation per translation unit keeps the (parallel) build short. bf16 at D=64
// streams 128-row blocks in both split-form kernels (n128 score products; measured faster
// than 64-row blocks on an H100).
#include "bwd_launch.cuh"

namespace mgd {
template cudaError_t launch_backward<cutlass::bfloat16_t, 64, 128, 128>(const BackwardArgs&,
                                                                        cudaStream_t);
}  // namespace mgd
