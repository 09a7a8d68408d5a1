// Matrix-vector products for one-token decoding on the CPU, with weights in float32, bfloat16,
// float16 or int8 (one float32 scale per output row). Weights are stored (out, in): every output is the
// dot product of one contiguous weight row with the input, so each thread streams its own rows
// from memory exactly once and the input vector stays in L1. Decoding reads every weight once
// per token, so its speed is memory bandwidth divided by bytes per weight: this is what makes
// 16-bit and 8-bit weights pay on CPUs where torch has no fast path for them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RWKV_CLI_AVX2 1
#endif

namespace {

constexpr int64_t kRowsPerTask = 16;  // output rows a thread takes at a time

// Widen 8 weights to float32 lanes.
#ifdef RWKV_CLI_AVX2
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const at::BFloat16* w) {
  // bfloat16 is the high half of a float32: widen to 32 bits and shift into place.
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8(const at::Half* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));  // F16C
}
inline __m256 load8(const int8_t* w) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float to_float(float w) { return w; }
inline float to_float(at::BFloat16 w) { return static_cast<float>(w); }
inline float to_float(at::Half w) { return static_cast<float>(w); }
inline float to_float(int8_t w) { return static_cast<float>(w); }

// Dot products of four consecutive weight rows with x.
template <typename W>
void dot4(const W* rows, int64_t n, const float* x, float* out) {
  const W* r0 = rows;
  const W* r1 = rows + n;
  const W* r2 = rows + 2 * n;
  const W* r3 = rows + 3 * n;
  int64_t i = 0;
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#ifdef RWKV_CLI_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(load8(r0 + i), xv, a0);
    a1 = _mm256_fmadd_ps(load8(r1 + i), xv, a1);
    a2 = _mm256_fmadd_ps(load8(r2 + i), xv, a2);
    a3 = _mm256_fmadd_ps(load8(r3 + i), xv, a3);
  }
  s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
#endif
  for (; i < n; ++i) {
    s0 += to_float(r0[i]) * x[i];
    s1 += to_float(r1[i]) * x[i];
    s2 += to_float(r2[i]) * x[i];
    s3 += to_float(r3[i]) * x[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <typename W>
float dot1(const W* row, int64_t n, const float* x) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += to_float(row[i]) * x[i];
  return sum;
}

template <typename W>
void gemv_rows(const W* weight, int64_t n_in, const float* x, const float* scale, float* y,
               int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + 4 <= end; o += 4) dot4(weight + o * n_in, n_in, x, y + o);
  for (; o < end; ++o) y[o] = dot1(weight + o * n_in, n_in, x);
  if (scale != nullptr) {
    for (int64_t j = begin; j < end; ++j) y[j] *= scale[j];
  }
}

// y (T, out) = x (T, in) @ weight (out, in)ᵀ, times scale (out,) when given.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "gemv: x must be float32 (T, in)");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "gemv: weight must be (out, in) with in = ", x.size(1));
  TORCH_CHECK(weight.is_contiguous(), "gemv: weight must be contiguous");
  const bool quantized = weight.scalar_type() == at::kChar;
  TORCH_CHECK(!quantized || scale.has_value(), "gemv: int8 weights need a scale");
  const float* scale_ptr = nullptr;
  at::Tensor scale_c;
  if (scale.has_value()) {
    scale_c = scale->contiguous();
    TORCH_CHECK(scale_c.scalar_type() == at::kFloat && scale_c.numel() == weight.size(0),
                "gemv: scale must be float32 (out,)");
    scale_ptr = scale_c.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  const int64_t tokens = xc.size(0), n_in = xc.size(1), n_out = weight.size(0);
  at::Tensor y = at::empty({tokens, n_out}, xc.options());
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = xc.data_ptr<float>() + t * n_in;
    float* yt = y.data_ptr<float>() + t * n_out;
    auto run = [&](auto* w) {
      at::parallel_for(0, n_out / 4, kRowsPerTask / 4, [&](int64_t begin, int64_t end) {
        gemv_rows(w, n_in, xt, scale_ptr, yt, begin * 4, end * 4);
      });
      gemv_rows(w, n_in, xt, scale_ptr, yt, n_out / 4 * 4, n_out);
    };
    switch (weight.scalar_type()) {
      case at::kFloat: run(weight.data_ptr<float>()); break;
      case at::kBFloat16: run(weight.data_ptr<at::BFloat16>()); break;
      case at::kHalf: run(weight.data_ptr<at::Half>()); break;
      case at::kChar: run(weight.data_ptr<int8_t>()); break;
      default: TORCH_CHECK(false, "gemv: weights must be float32, bfloat16, float16 or int8");
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rwkv_cli, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor");
  m.impl("gemv", c10::DispatchKey::CPU, gemv);
}
