// One instantiation per translation unit keeps the (parallel) build short.
#include "dbwd_launch.cuh"

namespace mgd {
template cudaError_t launch_double_backward<cutlass::half_t, 64>(const DoubleBackwardArgs&, cudaStream_t);
}  // namespace mgd
