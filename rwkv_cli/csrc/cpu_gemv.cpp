// Matrix-vector products for one-token decoding on the CPU, with weights in float32, bfloat16,
// float16 or int8 (one float32 scale per output row). Weights are stored (out, in): every output
// is the dot product of one contiguous weight row with the input, so each thread streams its own
// rows from memory exactly once and the input vector stays in L1. Decoding reads every weight
// once per token, so its speed is memory bandwidth divided by bytes per weight: this is what
// makes 16-bit and 8-bit weights pay on CPUs where torch has no fast path for them.
#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RWKV_CLI_AVX2 1
#endif

namespace {

using rwkv_cli::bf16_to_float;
using rwkv_cli::f16_to_float;

// The weight formats, each a distinct type so the templates below pick the right widening.
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float to_float(float w) { return w; }
inline float to_float(BF16 w) { return bf16_to_float(w.bits); }
inline float to_float(F16 w) { return f16_to_float(w.bits); }
inline float to_float(int8_t w) { return static_cast<float>(w); }

#ifdef RWKV_CLI_AVX2
// Widen 8 weights to float32 lanes.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const BF16* w) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8(const F16* w) {
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

// y (tokens, n_out) = x (tokens, n_in) @ weight (n_out, n_in)ᵀ, times scale (n_out,) if given.
template <typename W>
void gemv(const float* x, const void* weight_data, const float* scale, float* y, int64_t tokens,
          int64_t n_in, int64_t n_out) {
  const W* weight = static_cast<const W*>(weight_data);
  const int64_t blocks = n_out / 4;  // four rows at a time; the rest below
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * n_in;
    float* yt = y + t * n_out;
    const bool split = n_out * n_in >= rwkv_cli::kMinWorkToSplit;
#pragma omp parallel for schedule(static) if (split)
    for (int64_t block = 0; block < blocks; ++block) {
      float* out = yt + block * 4;
      dot4(weight + block * 4 * n_in, n_in, xt, out);
      if (scale != nullptr) {
        for (int64_t j = 0; j < 4; ++j) out[j] *= scale[block * 4 + j];
      }
    }
    for (int64_t o = blocks * 4; o < n_out; ++o) {
      yt[o] = dot1(weight + o * n_in, n_in, xt) * (scale != nullptr ? scale[o] : 1.0f);
    }
  }
}

}  // namespace

// One exported function per weight format: rwkv_gemv_f32, _bf16, _f16 and _i8.
#define RWKV_CLI_GEMV(suffix, W)                                                              \
  RWKV_CLI_EXPORT void rwkv_gemv_##suffix(const float* x, const void* w, const float* scale,  \
                                          float* y, int64_t tokens, int64_t n_in,             \
                                          int64_t n_out) {                                    \
    gemv<W>(x, w, scale, y, tokens, n_in, n_out);                                             \
  }
RWKV_CLI_GEMV(f32, float)
RWKV_CLI_GEMV(bf16, BF16)
RWKV_CLI_GEMV(f16, F16)
RWKV_CLI_GEMV(i8, int8_t)
