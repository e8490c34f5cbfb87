// Batch-1 decode kernels for x86 CPUs with AVX512-BF16: one token's matrix-vector products, which read every
// weight once and are bound by memory bandwidth.
//
// Why our own: PyTorch's bf16 GEMV (torch.mv -> MKL) reads the large expert matrices at ~90% of the bandwidth
// but pays ~40 us per call, so the small attention matrices run at 8-13 GB/s; torch.compile lowers a GEMV to a
// single-accumulator loop at 0.6-0.7x torch.mv. Here 8 rows are read together with `vdpbf16ps` (bf16 pairs
// multiplied and added into float32), with a software prefetch 512 bytes ahead on each row, split over
// ATen's threads.
//
// Numerics follow the eager PyTorch path: products accumulate in float32 and each linear's output is
// rounded to bf16 once; the expert block rounds where `moe.swiglu` does (w1 x, w3 x, silu, the product,
// w2 h) and weights and sums the k experts in float32, rounded once at the end.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 8;           // rows read together: 8 independent accumulators
constexpr int64_t kAhead = 256;        // prefetch distance in elements (512 bytes)
constexpr int64_t kStep = 32;          // bf16 elements per 512-bit register

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest, ties to even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// y[r] = dot(W[r, :], x) in float32 for rows [r0, r1) of a row-major W with K columns (K % 32 == 0).
void dot_rows(const uint16_t* W, const uint16_t* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const uint16_t* w = W + r * K;
    __m512 acc[kRows];
    for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kStep) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int i = 0; i < kRows; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + i * K + k + kAhead), _MM_HINT_T0);
      for (int i = 0; i < kRows; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(w + i * K + k), xv);
    }
    for (int i = 0; i < kRows; ++i) y[r + i] = _mm512_reduce_add_ps(acc[i]);
  }
  for (; r < r1; ++r) {
    const uint16_t* w = W + r * K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kStep)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    y[r] = _mm512_reduce_add_ps(acc);
  }
}

// Rows [0, N) in blocks of kRows, the blocks split over ATen's threads; `each(r0, r1)` then runs on the
// rows a thread computed (e.g. rounding them), while they are still in its cache.
template <typename Each>
void gemv_rows(const uint16_t* W, const uint16_t* x, float* y, int64_t N, int64_t K, Each each) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRows, r1 = std::min(N, b1 * kRows);
    dot_rows(W, x, y, r0, r1, K);
    each(r0, r1);
  });
}

const uint16_t* bf16_data(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

void check_weight(const torch::Tensor& w, const char* name, int64_t dims) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.dim() == dims,
              name, " must be a contiguous bfloat16 CPU tensor with ", dims, " dims, got ", w.sizes(), " ",
              w.scalar_type());
}

}  // namespace

// W [N, K] @ x [K] -> [N], bf16 (float32 accumulation, rounded once). K must be a multiple of 32.
torch::Tensor gemv(const torch::Tensor& W, const torch::Tensor& x) {
  check_weight(W, "W", 2);
  check_weight(x, "x", 1);
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.size(0) == K && K % kStep == 0, "gemv: W ", W.sizes(), " and x ", x.sizes(),
              " need x of W's columns, a multiple of 32");
  auto out = torch::empty({N}, x.options());
  std::vector<float> y(N);
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  gemv_rows(bf16_data(W), bf16_data(x), y.data(), N, K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = float_to_bf16(y[r]);
  });
  return out;
}

// One token through its k chosen experts: sum_j weights[j] * w2[e_j] (silu(w1[e_j] x) * (w3[e_j] x)).
// x [D] bf16; w1, w3 [E, F, D] and w2 [E, D, F] bf16; weights [k] float32; idx [k] int64 -> [D] bf16.
torch::Tensor experts(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2, const torch::Tensor& w3,
                      const torch::Tensor& weights, const torch::Tensor& idx) {
  check_weight(x, "x", 1);
  check_weight(w1, "w1", 3);
  check_weight(w2, "w2", 3);
  check_weight(w3, "w3", 3);
  const int64_t E = w1.size(0), F = w1.size(1), D = w1.size(2);
  TORCH_CHECK(w3.sizes() == w1.sizes() && w2.size(0) == E && w2.size(1) == D && w2.size(2) == F && x.size(0) == D,
              "experts: shapes x ", x.sizes(), " w1 ", w1.sizes(), " w2 ", w2.sizes(), " w3 ", w3.sizes(),
              " do not fit together");
  TORCH_CHECK(D % kStep == 0 && F % kStep == 0, "experts: dim ", D, " and hidden dim ", F, " must be multiples of 32");
  auto idx64 = idx.to(torch::kLong).contiguous();
  auto wts = weights.to(torch::kFloat).contiguous();
  TORCH_CHECK(idx64.numel() == wts.numel(), "experts: ", idx64.numel(), " ids for ", wts.numel(), " weights");
  const int64_t* ids = idx64.data_ptr<int64_t>();
  const float* wt = wts.data_ptr<float>();

  std::vector<float> h1(F), h3(F), y(D), acc(D, 0.0f);
  std::vector<uint16_t> h(F);
  const uint16_t* xs = bf16_data(x);
  for (int64_t j = 0; j < idx64.numel(); ++j) {
    const int64_t e = ids[j];
    TORCH_CHECK(e >= 0 && e < E, "experts: expert id ", e, " is out of range for ", E, " experts");
    const uint16_t* a = bf16_data(w1) + e * F * D;
    const uint16_t* b = bf16_data(w3) + e * F * D;
    gemv_rows(a, xs, h1.data(), F, D, [](int64_t, int64_t) {});
    gemv_rows(b, xs, h3.data(), F, D, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float g = round_bf16(h1[r]);
        const float s = round_bf16(g / (1.0f + std::exp(-g)));
        h[r] = float_to_bf16(s * round_bf16(h3[r]));
      }
    });
    const float scale = wt[j];
    gemv_rows(bf16_data(w2) + e * D * F, h.data(), y.data(), D, F, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) acc[r] += round_bf16(y[r]) * scale;
    });
  }
  auto out = torch::empty({D}, x.options());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t r = 0; r < D; ++r) o[r] = float_to_bf16(acc[r]);
  return out;
}

TORCH_LIBRARY(mixtral_cpu, m) {
  m.def("gemv(Tensor W, Tensor x) -> Tensor");
  m.def("experts(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor weights, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("experts", &experts);
}
