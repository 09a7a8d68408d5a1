// Matrix products with a few input rows, for decoding on the CPU (one token, or one token of each
// of B sequences stepping together), with weights in float32, bfloat16, float16, int8 (one
// float32 scale per output row) or packed int4 (two weights a byte, one float32 scale per
// kInt4Group weights of a row). Weights are stored (out, in): every output is the dot product
// of one contiguous weight row with an input row, so each thread streams its own weight rows from
// memory once for all the input rows, which stay in cache. Decoding reads every weight once per
// step, so its speed is memory bandwidth divided by bytes per weight: this is what makes 16-bit,
// 8-bit and 4-bit weights pay on CPUs where torch has no fast path for them, and what lets B
// sequences step for little more than the price of one.
#include "cpu_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RWKV_CLI_AVX2 1
#endif

namespace {

using rwkv_cli::bf16_to_float;
using rwkv_cli::f16_to_float;

// The element types of the plain formats, each a distinct type so overloads pick the widening.
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float to_float(float w) { return w; }
inline float to_float(BF16 w) { return bf16_to_float(w.bits); }
inline float to_float(F16 w) { return f16_to_float(w.bits); }
inline float to_float(int8_t w) { return static_cast<float>(w); }

// A weight format says where row o of an (n_out, n_in) matrix starts (`row`, a handle that
// `at` and `load8` read columns of) and where its bytes are (`address`, for prefetching).
// Plain formats store one element a weight; int8's per-row scales multiply the sums afterwards.
template <typename E>
struct Plain {
  using Row = const E*;
  const E* data;
  int64_t n;
  Row row(int64_t o) const { return data + o * n; }
  const void* address(int64_t o) const { return data + o * n; }
};
template <typename E>
inline float at(const E* row, int64_t i) { return to_float(row[i]); }

// Packed int4: weight i of a row is (nibble i - 8) x the scale of its group of kInt4Group
// weights; byte i/2 holds weight i in its low nibble when i is even, in its high nibble when odd.
// Rows are a whole number of groups (kernels/cpu_ops.py checks), so no column is left over.
constexpr int64_t kInt4Group = 64;
struct Int4Row {
  const uint8_t* packed;
  const float* scales;
};
struct Int4 {
  using Row = Int4Row;
  const uint8_t* data;
  const float* scales;
  int64_t n;
  Row row(int64_t o) const { return {data + o * n / 2, scales + o * (n / kInt4Group)}; }
  const void* address(int64_t o) const { return data + o * n / 2; }
};
inline float at(Int4Row row, int64_t i) {
  const int nibble = (row.packed[i / 2] >> (4 * (i & 1))) & 15;
  return static_cast<float>(nibble - 8) * row.scales[i / kInt4Group];
}

#ifdef RWKV_CLI_AVX2
// Widen columns [i, i + 8) of a row to float32 lanes.
inline __m256 load8(const float* row, int64_t i) { return _mm256_loadu_ps(row + i); }
inline __m256 load8(const BF16* row, int64_t i) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8(const F16* row, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));  // F16C
}
inline __m256 load8(const int8_t* row, int64_t i) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline __m256 load8(Int4Row row, int64_t i) {  // i is a multiple of 8: four whole bytes
  uint32_t word;
  std::memcpy(&word, row.packed + i / 2, sizeof word);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);  // lane k: nibble k
  const __m256i nibbles = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), _mm256_set1_epi32(15));
  const __m256 values = _mm256_cvtepi32_ps(_mm256_sub_epi32(nibbles, _mm256_set1_epi32(8)));
  return _mm256_mul_ps(values, _mm256_set1_ps(row.scales[i / kInt4Group]));  // as `at` rounds
}
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// a * b + c, rounded once where the CPU has a fused multiply-add. Written out because contracting
// `a * b + c` is the compiler's choice, which could differ between the instantiations of dot4 for
// one row and for many, and then a row would not get the same bits alone as in a batch.
inline float multiply_add(float a, float b, float c) {
#ifdef FP_FAST_FMAF
  return std::fmaf(a, b, c);
#else
  return a * b + c;  // no fused instruction: nothing to contract either
#endif
}

// Input rows a pass over the weights takes (more are taken in groups of this many): their
// partial sums, 4 x 16 vectors, stay in L1 with a column chunk of their inputs (below).
constexpr int64_t kMaxRows = 16;
// Columns per chunk: 16 input rows x 256 float32 is 16 KB, which stays in L1 while a group of
// four weight rows is multiplied with each input row in turn.
constexpr int64_t kChunkColumns = 256;

#ifdef RWKV_CLI_AVX2
// Input rows taken together in the innermost loop: 4 x 2 sums, 4 widened weight vectors and an
// input vector use 13 of the 16 AVX2 registers (3 rows would need 17).
constexpr int64_t kRowsPerPass = 2;

// Columns [begin, end) (multiples of 8) of four weight rows w times kRows input rows (the next
// x_stride further on), added to the lane sums acc[b][r] of input row b and weight row r. The
// weight vectors are widened once and used for every input row.
template <int kRows, typename Row>
void dot4_columns(const Row w[4], int64_t begin, int64_t end, const float* x, int64_t x_stride,
                  __m256 (*acc)[4]) {
  __m256 sums[kRows][4];
  for (int b = 0; b < kRows; ++b) {
    for (int r = 0; r < 4; ++r) sums[b][r] = acc[b][r];
  }
  for (int64_t i = begin; i < end; i += 8) {
    const __m256 w0 = load8(w[0], i), w1 = load8(w[1], i);
    const __m256 w2 = load8(w[2], i), w3 = load8(w[3], i);
    for (int b = 0; b < kRows; ++b) {
      const __m256 xv = _mm256_loadu_ps(x + b * x_stride + i);
      sums[b][0] = _mm256_fmadd_ps(w0, xv, sums[b][0]);
      sums[b][1] = _mm256_fmadd_ps(w1, xv, sums[b][1]);
      sums[b][2] = _mm256_fmadd_ps(w2, xv, sums[b][2]);
      sums[b][3] = _mm256_fmadd_ps(w3, xv, sums[b][3]);
    }
  }
  for (int b = 0; b < kRows; ++b) {
    for (int r = 0; r < 4; ++r) acc[b][r] = sums[b][r];
  }
}
#endif

#ifdef RWKV_CLI_AVX2
// Asks for a span of memory (the weight rows a thread takes next) to be brought into L2 a few
// cache lines at a time, while the current rows are multiplied with many input rows. Those
// passes read the current rows from L1, so without it the next rows only start to arrive from
// memory when their first pass asks for them, and the cores wait (a 16-row product of the 0.1B
// head ran 25-35% faster with it). One row alone streams at the memory's pace anyway.
class Prefetch {
 public:
  Prefetch(const void* begin, const void* end, int64_t calls)
      : next_(static_cast<const char*>(begin)), end_(static_cast<const char*>(end)),
        lines_per_call_(calls > 0 ? ((end_ - next_) / kLine + calls - 1) / calls : 0) {}

  // The next share of the span: the span spread evenly over `calls` calls.
  void advance() {
    for (int64_t i = 0; i < lines_per_call_ && next_ < end_; ++i, next_ += kLine) {
      _mm_prefetch(next_, _MM_HINT_T1);
    }
  }

 private:
  static constexpr int64_t kLine = 64;  // bytes per cache line
  const char* next_;
  const char* end_;
  int64_t lines_per_call_;
};
#endif

// Weight rows o..o+3 (each n long) times `rows` (at most kCapacity) input rows:
// out[b * out_stride + r] for input row b and weight row o + r. The weights are read from memory
// once for all input rows, chunk by chunk (re-read from L1 for each pair of input rows), while
// the next four rows are fetched ahead. Each sum takes its terms in the same order (8 lanes over
// the columns, the lanes added, then the last n % 8 columns) whatever `rows` is: an input row
// gets the same bits alone as in a batch.
template <int64_t kCapacity, typename Format>
void dot4(const Format& weights, int64_t o, [[maybe_unused]] int64_t n_out, const float* x,
          int64_t rows, float* out, int64_t out_stride) {
  const int64_t n = weights.n;
  const typename Format::Row w[4] = {weights.row(o), weights.row(o + 1), weights.row(o + 2),
                                     weights.row(o + 3)};
  float sums[kCapacity][4] = {};
  int64_t vectorized = 0;
#ifdef RWKV_CLI_AVX2
  vectorized = n / 8 * 8;
  __m256 acc[kCapacity][4];
  for (int64_t b = 0; b < rows; ++b) {
    for (int r = 0; r < 4; ++r) acc[b][r] = _mm256_setzero_ps();
  }
  const int64_t chunks = (vectorized + kChunkColumns - 1) / kChunkColumns;
  const int64_t passes = rows > 1 ? chunks * ((rows + kRowsPerPass - 1) / kRowsPerPass) : 0;
  Prefetch prefetch(weights.address(o + 4), weights.address(o + 8 < n_out ? o + 8 : n_out),
                    passes);
  for (int64_t begin = 0; begin < vectorized; begin += kChunkColumns) {
    const int64_t end = begin + kChunkColumns < vectorized ? begin + kChunkColumns : vectorized;
    int64_t b = 0;
    for (; b + kRowsPerPass <= rows; b += kRowsPerPass) {
      prefetch.advance();
      dot4_columns<kRowsPerPass>(w, begin, end, x + b * n, n, acc + b);
    }
    for (; b < rows; ++b) {
      prefetch.advance();
      dot4_columns<1>(w, begin, end, x + b * n, n, acc + b);
    }
  }
  for (int64_t b = 0; b < rows; ++b) {
    for (int r = 0; r < 4; ++r) sums[b][r] = sum8(acc[b][r]);
  }
#endif
  for (int64_t b = 0; b < rows; ++b) {
    const float* xb = x + b * n;
    for (int64_t i = vectorized; i < n; ++i) {
      for (int r = 0; r < 4; ++r) sums[b][r] = multiply_add(at(w[r], i), xb[i], sums[b][r]);
    }
    for (int r = 0; r < 4; ++r) out[b * out_stride + r] = sums[b][r];
  }
}

template <typename Row>
float dot1(Row row, int64_t n, const float* x) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += at(row, i) * x[i];
  return sum;
}

// y (rows, n_out) = x (rows, n_in) @ weightsᵀ (n_out, n_in), times row_scale (n_out,) if given.
// Threads split the weight rows, four at a time; each streams its rows from memory once per
// group of up to kMaxRows input rows. Meant for a few input rows (one token, or one token of each
// of a few sequences): for many, a GEMM does the arithmetic faster.
template <typename Format>
void gemv(const float* x, const Format& weights, const float* row_scale, float* y, int64_t rows,
          int64_t n_out) {
  const int64_t n_in = weights.n;
  const int64_t blocks = n_out / 4;  // four weight rows at a time; the rest below
  const bool split = rows * n_out * n_in >= rwkv_cli::kMinWorkToSplit;
  for (int64_t first = 0; first < rows; first += kMaxRows) {
    const int64_t group = rows - first < kMaxRows ? rows - first : kMaxRows;
    const float* xg = x + first * n_in;
    float* yg = y + first * n_out;
#pragma omp parallel for schedule(static) if (split)
    for (int64_t block = 0; block < blocks; ++block) {
      float* out = yg + block * 4;
      if (group == 1) {  // one token: sums sized for one row, as fast as a plain gemv
        dot4<1>(weights, block * 4, n_out, xg, 1, out, n_out);
      } else {
        dot4<kMaxRows>(weights, block * 4, n_out, xg, group, out, n_out);
      }
      if (row_scale != nullptr) {
        for (int64_t b = 0; b < group; ++b) {
          for (int64_t j = 0; j < 4; ++j) out[b * n_out + j] *= row_scale[block * 4 + j];
        }
      }
    }
    for (int64_t o = blocks * 4; o < n_out; ++o) {
      for (int64_t b = 0; b < group; ++b) {
        const float sum = dot1(weights.row(o), n_in, xg + b * n_in);
        yg[b * n_out + o] = sum * (row_scale != nullptr ? row_scale[o] : 1.0f);
      }
    }
  }
}

}  // namespace

// One exported function per plain weight format: rwkv_gemv_f32, _bf16, _f16 and _i8 (whose
// `scale` is required, one per output row).
#define RWKV_CLI_GEMV(suffix, E)                                                              \
  RWKV_CLI_EXPORT void rwkv_gemv_##suffix(const float* x, const void* w, const float* scale,  \
                                          float* y, int64_t rows, int64_t n_in,               \
                                          int64_t n_out) {                                    \
    gemv(x, Plain<E>{static_cast<const E*>(w), n_in}, scale, y, rows, n_out);                 \
  }
RWKV_CLI_GEMV(f32, float)
RWKV_CLI_GEMV(bf16, BF16)
RWKV_CLI_GEMV(f16, F16)
RWKV_CLI_GEMV(i8, int8_t)

// Packed int4 weights (n_out, n_in / 2) bytes with scales (n_out, n_in / kInt4Group).
RWKV_CLI_EXPORT void rwkv_gemv_i4(const float* x, const void* packed, const float* scales,
                                  float* y, int64_t rows, int64_t n_in, int64_t n_out) {
  gemv(x, Int4{static_cast<const uint8_t*>(packed), scales, n_in}, nullptr, y, rows, n_out);
}
