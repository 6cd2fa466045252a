// Standalone driver of the attention backward, for the device-side checks in
// scripts/cuda_checks_bwd.sh: runs one shape on fresh random inputs, checks that every
// output element was written and finite, that two runs agree bit for bit, and times it.
//   bwd_driver B T H D causal(0/1) fp16(0/1) [iterations] [dlse(0/1)] [fused(0/1)]
// fused=1 runs the non-deterministic mode (dQ reduced in fp32 by the key-major kernel):
// there a rerun may differ in the last bits, which is reported but not a failure; the
// outputs are also compared with the deterministic mode's (dQ within 2^-6 of max |dQ|,
// dK and dV within 2^-8 of their max). MGD_BWD_BULK_REDUCE=0 picks the per-thread
// red.global dQ reduction instead of the bulk one (read once per process).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_bwd.h"

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,               \
                   cudaGetErrorString(e));                                         \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static float uniform() {  // xorshift; the kernels only need non-degenerate data
  rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
  return float((rng_state >> 40) & 0xffffff) / float(1 << 24);
}

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s B T H D causal fp16 [iters] [dlse] [fused]\n", argv[0]);
    return 2;
  }
  int B = std::atoi(argv[1]), T = std::atoi(argv[2]), H = std::atoi(argv[3]), D = std::atoi(argv[4]);
  bool causal = std::atoi(argv[5]) != 0, fp16 = std::atoi(argv[6]) != 0;
  int iters = argc > 7 ? std::atoi(argv[7]) : 0;
  bool with_dlse = argc > 8 && std::atoi(argv[8]) != 0;
  bool fused = argc > 9 && std::atoi(argv[9]) != 0;
  size_t n = size_t(B) * T * H * D;
  // One random host buffer; each input gets it rotated by a different offset.
  std::vector<uint16_t> host(n);
  for (size_t i = 0; i < n; ++i) {
    float x = 2.f * uniform() - 1.f;
    if (fp16) { __half h = __float2half(x); std::memcpy(&host[i], &h, 2); }
    else { __nv_bfloat16 h = __float2bfloat16(x); std::memcpy(&host[i], &h, 2); }
  }
  auto fill = [&](void* dev, size_t shift) {
    shift %= n;
    CHECK(cudaMemcpy(dev, host.data() + shift, (n - shift) * 2, cudaMemcpyHostToDevice));
    if (shift) CHECK(cudaMemcpy(static_cast<char*>(dev) + (n - shift) * 2, host.data(), shift * 2,
                                cudaMemcpyHostToDevice));
  };
  void* in[5]; void* out[3];
  for (int j = 0; j < 5; ++j) { CHECK(cudaMalloc(&in[j], n * 2)); fill(in[j], 7919u * j + 13u * j * j); }
  for (auto& p : out) { CHECK(cudaMalloc(&p, n * 2)); CHECK(cudaMemset(p, 0xff, n * 2)); }  // NaN poison
  // A plausible lse: log of the causal row length plus a margin keeps P bounded.
  std::vector<float> lse(size_t(B) * H * T);
  for (size_t i = 0; i < lse.size(); ++i) lse[i] = std::log(float((i % T) + 1)) + 1.f;
  float *d_lse, *d_dlse;
  CHECK(cudaMalloc(&d_lse, lse.size() * 4));
  CHECK(cudaMemcpy(d_lse, lse.data(), lse.size() * 4, cudaMemcpyHostToDevice));
  for (auto& x : lse) x = 0.5f * uniform() - 0.25f;
  CHECK(cudaMalloc(&d_dlse, lse.size() * 4));
  CHECK(cudaMemcpy(d_dlse, lse.data(), lse.size() * 4, cudaMemcpyHostToDevice));

  mgd::BackwardCall c{};
  c.dtype = fp16 ? mgd::DType::kFloat16 : mgd::DType::kBFloat16;
  c.batch = B; c.seq = T; c.heads = H; c.head_dim = D; c.scale = 1.f / std::sqrt(float(D));
  c.causal = causal;
  c.deterministic = !fused;
  c.q = in[0]; c.k = in[1]; c.v = in[2]; c.o = in[3]; c.do_ = in[4];
  c.lse = d_lse; c.dlse = with_dlse ? d_dlse : nullptr;
  c.dq = out[0]; c.dk = out[1]; c.dv = out[2];
  size_t ws_bytes = mgd::backward_workspace_bytes(B, T, H, D, c.deterministic);
  CHECK(cudaMalloc(&c.workspace, ws_bytes));

  CHECK(mgd::backward(c, 0));
  CHECK(cudaDeviceSynchronize());
  std::vector<std::vector<uint16_t>> first(3, std::vector<uint16_t>(n));
  int bad = 0;
  const uint16_t exp_mask = fp16 ? 0x7c00 : 0x7f80;
  for (int j = 0; j < 3; ++j) {
    CHECK(cudaMemcpy(first[j].data(), out[j], n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) {
      if ((first[j][i] & exp_mask) == exp_mask) { ++bad; break; }
    }
  }
  CHECK(mgd::backward(c, 0));
  CHECK(cudaDeviceSynchronize());
  bool same = true;
  for (int j = 0; j < 3; ++j) {
    CHECK(cudaMemcpy(host.data(), out[j], n * 2, cudaMemcpyDeviceToHost));
    same = same && std::memcmp(host.data(), first[j].data(), n * 2) == 0;
  }
  std::printf("bwd B=%d T=%d H=%d D=%d causal=%d %s dlse=%d %s: outputs %s, rerun %s\n", B, T, H,
              D, int(causal), fp16 ? "fp16" : "bf16", int(with_dlse),
              fused ? "fused" : "deterministic",
              bad ? "NOT all written/finite" : "all written and finite",
              same ? "bitwise identical" : "DIFFERS");
  bool agree = true;
  if (fused) {  // the split form as reference: same products, dQ summed in another order
    float max_err[3], max_ref[3];
    c.deterministic = true;
    void* ws_ref;
    CHECK(cudaMalloc(&ws_ref, mgd::backward_workspace_bytes(B, T, H, D, true)));
    void* ws_fused = c.workspace;
    c.workspace = ws_ref;
    CHECK(mgd::backward(c, 0));
    CHECK(cudaDeviceSynchronize());
    auto to_float = [&](uint16_t x) {
      if (fp16) { __half h; std::memcpy(&h, &x, 2); return __half2float(h); }
      __nv_bfloat16 h; std::memcpy(&h, &x, 2); return __bfloat162float(h);
    };
    for (int j = 0; j < 3; ++j) {
      CHECK(cudaMemcpy(host.data(), out[j], n * 2, cudaMemcpyDeviceToHost));
      max_err[j] = max_ref[j] = 0.f;
      for (size_t i = 0; i < n; ++i) {
        float ref = to_float(host[i]), got = to_float(first[j][i]);
        max_ref[j] = std::max(max_ref[j], std::fabs(ref));
        float e = std::fabs(ref - got);
        max_err[j] = (e == e) ? std::max(max_err[j], e) : INFINITY;
      }
    }
    const float tol[3] = {1.f / 64, 1.f / 256, 1.f / 256};
    for (int j = 0; j < 3; ++j) agree = agree && max_err[j] <= tol[j] * max_ref[j];
    std::printf("fused (%s) vs deterministic: max|err|/max|ref| dQ %.2e dK %.2e dV %.2e: %s\n",
                mgd::backward_bulk_reduce() ? "bulk reduce" : "red.global",
                max_err[0] / max_ref[0], max_err[1] / max_ref[1], max_err[2] / max_ref[2],
                agree ? "agree" : "DISAGREE");
    c.deterministic = false;
    c.workspace = ws_fused;
    CHECK(cudaFree(ws_ref));
  }
  if (iters > 0) {
    cudaEvent_t a, b; CHECK(cudaEventCreate(&a)); CHECK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) CHECK(mgd::backward(c, 0));  // warm-up
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) {
      CHECK(cudaEventRecord(a));
      CHECK(mgd::backward(c, 0));
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      CHECK(cudaEventElapsedTime(&ms[i], a, b));
    }
    std::sort(ms.begin(), ms.end());
    double med = ms[iters / 2];
    double flop = 5.0 * 2 * B * H * double(T) * T * D * (causal ? 0.5 : 1.0);
    std::printf("time median %.3f ms, effective %.1f TFLOP/s\n", med, flop / med / 1e9);
  }
  return (bad || !agree || (!same && !fused)) ? 1 : 0;
}
