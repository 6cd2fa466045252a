// Picks the backward instantiation for the call's dtype and head dimension.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "attention_bwd.h"
#include "bwd_kernels.cuh"

namespace mgd {

template <class E, int D, int kQB = 64, int kKB = 64, int kFQB = 64, bool kPBf16 = false>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream);

#ifndef MGD_BWD_D64_VARIANTS
#define MGD_BWD_D64_VARIANTS 0
#endif

// Row statistics first, then (fused mode) the fp32 dQ accumulator at a 256 B boundary.
static size_t stats_bytes(int batch, int seq, int heads) {
  return (size_t(batch) * heads * padded_rows(seq) * sizeof(BwdRowStats) + 255) / 256 * 256;
}

size_t backward_workspace_bytes(int batch, int seq, int heads, int head_dim, bool deterministic) {
  size_t bytes = stats_bytes(batch, seq, heads);
  if (!deterministic) bytes += size_t(batch) * heads * padded_rows(seq) * head_dim * sizeof(float);
  return bytes;
}

bool backward_bulk_reduce() {
  static const bool on = [] {
    const char* s = std::getenv("MGD_BWD_BULK_REDUCE");
    return s == nullptr || std::strcmp(s, "0") != 0;
  }();
  return on;
}

// bf16 at D=64: MGD_BWD_D64_BLOCKS (read once per process) names the key-major kernel's
// query block x the query-major kernel's key block: 128x128 (unset), 64x64, 128x64, 64x128;
// lean128: 128x128 with dS from P's bf16 copy, and the fused mode on 128-query blocks.
enum class D64Blocks { k128x128, k64x64, k128x64, k64x128, kLean128, kRefused };
static D64Blocks backward_d64_blocks() {
  static const D64Blocks blocks = [] {
    const char* s = std::getenv("MGD_BWD_D64_BLOCKS");
    if (s == nullptr || *s == '\0') return D64Blocks::k128x128;  // empty counts as unset
    const char* const names[] = {"128x128", "64x64", "128x64", "64x128", "lean128"};
    int i = 0;
    while (i < 5 && std::strcmp(s, names[i]) != 0) ++i;
    const char* why =
        i == 5 ? "not one of 128x128, 64x64, 128x64, 64x128, lean128"
        : i > 0 && !MGD_BWD_D64_VARIANTS ? "variants not built (CMake -DMGD_BWD_D64_VARIANTS=ON)"
                                         : nullptr;
    if (why == nullptr) return D64Blocks(i);
    std::fprintf(stderr, "mgd: MGD_BWD_D64_BLOCKS=%s refused: %s\n", s, why);
    return D64Blocks::kRefused;
  }();
  return blocks;
}

// bf16 at D=64 in the block variant MGD_BWD_D64_BLOCKS names.
static cudaError_t launch_bf16_d64(const BackwardArgs& a, cudaStream_t stream) {
  using E = cutlass::bfloat16_t;
  switch (backward_d64_blocks()) {
    case D64Blocks::k128x128:
      return launch_backward<E, 64, 128, 128>(a, stream);
#if MGD_BWD_D64_VARIANTS
    case D64Blocks::k64x64:
      return launch_backward<E, 64, 64, 64>(a, stream);
    case D64Blocks::k128x64:
      return launch_backward<E, 64, 128, 64>(a, stream);
    case D64Blocks::k64x128:
      return launch_backward<E, 64, 64, 128>(a, stream);
    case D64Blocks::kLean128:
      return launch_backward<E, 64, 128, 128, 128, true>(a, stream);
#endif
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t backward(const BackwardCall& c, cudaStream_t stream) {
  if (c.batch <= 0 || c.seq <= 0 || c.heads <= 0 || c.batch > 65535 || c.heads > 65535)
    return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(c.workspace);
  float* accum = c.deterministic
                     ? nullptr
                     : reinterpret_cast<float*>(ws + stats_bytes(c.batch, c.seq, c.heads));
  BackwardArgs a{c.q,  c.k,  c.v,  c.o, c.do_, c.lse, c.dlse, c.dq, c.dk, c.dv,
                 reinterpret_cast<BwdRowStats*>(ws), accum, c.batch, c.seq, c.heads, c.head_dim,
                 c.scale, c.causal, c.deterministic, backward_bulk_reduce()};
  const bool bf16 = c.dtype == DType::kBFloat16;
  switch (c.head_dim) {
    case 64:
      return bf16 ? launch_bf16_d64(a, stream) : launch_backward<cutlass::half_t, 64>(a, stream);
    case 128:
      return bf16 ? launch_backward<cutlass::bfloat16_t, 128>(a, stream)
                  : launch_backward<cutlass::half_t, 128>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace mgd
