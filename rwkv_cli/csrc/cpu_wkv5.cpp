// The RWKV-5/6 WKV recurrence on the CPU (kernels/wkv5.py has the formula and the torch twins).
// Heads are independent: each thread takes whole heads and runs them through time, one N x N
// state matrix (16 KiB for N = 64) staying in its L1 cache. Per token and head that is two
// passes over the state; the torch loop spends a dozen small operations on the same work, and
// its chunked form trades them for larger products whose pair tensors grow with the chunk.
#include "cpu_kernels.h"

// B sequences (B = 1: one sequence): state (batch, heads, n, n) [sequence, head, value, key] is
// updated in place; r, w, k, v, y (batch, tokens, heads, n); u (heads, n). Each thread takes
// whole (sequence, head) pairs.
RWKV_CLI_EXPORT void rwkv_wkv5(float* state, const float* r, const float* w, const float* k,
                               const float* v, const float* u, float* y, int64_t batch,
                               int64_t tokens, int64_t heads, int64_t n) {
  const int64_t stride = heads * n, pairs = batch * heads;
  const bool split = pairs * tokens * n * n * 2 >= rwkv_cli::kMinWorkToSplit;  // 2 passes a row
#pragma omp parallel for schedule(static) if (split)
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / heads, h = pair % heads;
    float* head_state = state + pair * n * n;
    const float* bonus = u + h * n;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t base = (b * tokens + t) * stride + h * n;
      const float *rt = r + base, *wt = w + base, *kt = k + base, *vt = v + base;
      float current = 0.0f;  // Σ u r k: the current token's own weight
#pragma omp simd reduction(+ : current)
      for (int64_t i = 0; i < n; ++i) current += bonus[i] * rt[i] * kt[i];
      for (int64_t j = 0; j < n; ++j) {
        float* row = head_state + j * n;
        const float value = vt[j];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < n; ++i) {
          dot += row[i] * rt[i];
          row[i] = row[i] * wt[i] + value * kt[i];
        }
        y[base + j] = dot + current * value;
      }
    }
  }
}
