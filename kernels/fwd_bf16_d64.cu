// One instantiation per translation unit keeps the (parallel) build short.
#include "fwd_launch.cuh"

namespace mgd {
template cudaError_t launch_forward<cutlass::bfloat16_t, 64>(const ForwardCall&, cudaStream_t);
}  // namespace mgd
