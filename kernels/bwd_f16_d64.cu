// One instantiation per translation unit keeps the (parallel) build short.
#include "bwd_launch.cuh"

namespace mgd {
template cudaError_t launch_backward<cutlass::half_t, 64>(const BackwardArgs&, cudaStream_t);
}  // namespace mgd
