// Standalone driver of the attention forward, for compute-sanitizer and the device-side
// checks (kernels/tools/fwd_checks.sh): runs one shape on random inputs, checks that every
// output element was written and is finite, compares sampled rows of o and lse with a
// float64 computation on the host, prints a checksum of o and lse (every schedule computes
// each tile the same way, so fwd_checks.sh requires equal checksums across
// MGD_FWD_PERSISTENT, MGD_FWD_MAX_CTAS and MGD_FWD_PINGPONG), and optionally times the
// kernel with CUDA events.
//   fwd_driver B T H D causal(0/1) fp16(0/1) [iterations]
// Exit status 1 on any failed check.
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

#include "attention_fwd.h"

#define CHECK(x)                                                                            \
  do {                                                                                      \
    cudaError_t e = (x);                                                                    \
    if (e != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float uniform() {  // xorshift: the check only needs non-degenerate data
  rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
  return float((rng_state >> 40) & 0xffffff) / float(1 << 24);
}

static float to_float(uint16_t bits, bool fp16) {
  if (fp16) { __half h; std::memcpy(&h, &bits, 2); return __half2float(h); }
  __nv_bfloat16 h; std::memcpy(&h, &bits, 2); return __bfloat162float(h);
}

int main(int argc, char** argv) {
  if (argc < 7) { std::fprintf(stderr, "usage: %s B T H D causal fp16 [iters]\n", argv[0]); return 2; }
  const int B = std::atoi(argv[1]), T = std::atoi(argv[2]), H = std::atoi(argv[3]), D = std::atoi(argv[4]);
  const bool causal = std::atoi(argv[5]) != 0, fp16 = std::atoi(argv[6]) != 0;
  const int iters = argc > 7 ? std::atoi(argv[7]) : 0;
  const size_t n = size_t(B) * T * H * D, nl = size_t(B) * H * T;
  std::vector<uint16_t> host[3];
  for (auto& x : host) {
    x.resize(n);
    for (size_t i = 0; i < n; ++i) {
      float f = 4.f * uniform() - 2.f;
      if (fp16) { __half h = __float2half(f); std::memcpy(&x[i], &h, 2); }
      else { __nv_bfloat16 h = __float2bfloat16(f); std::memcpy(&x[i], &h, 2); }
    }
  }
  void* in[3];
  for (int j = 0; j < 3; ++j) {
    CHECK(cudaMalloc(&in[j], n * 2));
    CHECK(cudaMemcpy(in[j], host[j].data(), n * 2, cudaMemcpyHostToDevice));
  }
  void* o; float* lse;
  CHECK(cudaMalloc(&o, n * 2));
  CHECK(cudaMalloc(&lse, nl * 4));
  CHECK(cudaMemset(o, 0xff, n * 2));  // NaN poison: unwritten elements show up
  CHECK(cudaMemset(lse, 0xff, nl * 4));

  mgd::ForwardCall c{};
  c.dtype = fp16 ? mgd::DType::kFloat16 : mgd::DType::kBFloat16;
  c.batch = B; c.seq = T; c.heads = H; c.head_dim = D; c.scale = 1.f / std::sqrt(float(D));
  c.causal = causal; c.q = in[0]; c.k = in[1]; c.v = in[2]; c.o = o; c.lse = lse;
  CHECK(mgd::attention_forward(c, 0));
  CHECK(cudaDeviceSynchronize());

  std::vector<uint16_t> ho(n);
  std::vector<float> hl(nl);
  CHECK(cudaMemcpy(ho.data(), o, n * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hl.data(), lse, nl * 4, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += !std::isfinite(to_float(ho[i], fp16));
  for (size_t i = 0; i < nl; ++i) bad += !std::isfinite(hl[i]);

  // float64 reference on sampled rows of every (b, h): first, last, middle and random.
  double err_o = 0, err_l = 0, ref_norm = 0, diff_norm = 0;
  std::vector<double> p(T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      // The last three sit at the ends of the first 128- and 192-row tiles.
      int rows[8] = {0, T - 1, T / 2, int(uniform() * T) % T, int(uniform() * T) % T,
                     std::min(T - 1, 127), std::min(T - 1, 191), std::min(T - 1, 192)};
      for (int row : rows) {
        auto at = [&](int j, int t, int d) { return to_float(host[j][((size_t(b) * T + t) * H + h) * D + d], fp16); };
        int keys = causal ? row + 1 : T;
        double mx = -1e300;
        for (int t = 0; t < keys; ++t) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += double(at(0, row, d)) * at(1, t, d);
          p[t] = s * c.scale;
          mx = std::max(mx, p[t]);
        }
        double sum = 0;
        for (int t = 0; t < keys; ++t) { p[t] = std::exp(p[t] - mx); sum += p[t]; }
        err_l = std::max(err_l, std::fabs(mx + std::log(sum) - hl[(size_t(b) * H + h) * T + row]));
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int t = 0; t < keys; ++t) acc += p[t] * at(2, t, d);
          acc /= sum;
          double got = to_float(ho[((size_t(b) * T + row) * H + h) * D + d], fp16);
          err_o = std::max(err_o, std::fabs(got - acc));
          ref_norm += acc * acc;
          diff_norm += (got - acc) * (got - acc);
        }
      }
    }
  uint64_t sum = 0xcbf29ce484222325ull;  // FNV-1a over the bytes of o, then lse
  auto hash = [&](const void* data, size_t bytes) {
    for (size_t i = 0; i < bytes; ++i) sum = (sum ^ static_cast<const uint8_t*>(data)[i]) * 0x100000001b3ull;
  };
  hash(ho.data(), n * 2);
  hash(hl.data(), nl * 4);
  const double rel = std::sqrt(diff_norm / std::max(ref_norm, 1e-30));
  const double tol = fp16 ? 3e-3 : 1.5e-2;
  const bool ok = bad == 0 && rel < tol && err_l < 1e-3;
  std::printf("B=%d T=%d H=%d D=%d causal=%d %s: non-finite %zu, sampled rows: o rel_l2 %.2e "
              "(max abs %.2e), lse max abs %.2e -> %s, checksum %016llx\n", B, T, H, D, int(causal),
              fp16 ? "fp16" : "bf16", bad, rel, err_o, err_l, ok ? "ok" : "FAILED",
              static_cast<unsigned long long>(sum));

  if (iters > 0) {
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0)); CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; ++i) CHECK(mgd::attention_forward(c, 0));
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) {
      CHECK(cudaEventRecord(e0));
      CHECK(mgd::attention_forward(c, 0));
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[iters / 2];
    const double flop = 2.0 * 2.0 * B * H * double(T) * T * D * (causal ? 0.5 : 1.0);
    std::printf("forward median %.4f ms over %d runs: %.1f TFLOP/s\n", med, iters, flop / med / 1e9);
  }
  return ok ? 0 : 1;
}
