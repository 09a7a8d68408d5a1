// One RWKV-7 time-mixing step on the CPU for one token of each of B sequences (B = 1: a single
// sequence decoding; more: a batch stepping together), everything between the input projections
// and the output projection in one pass: decay, in-context learning rate, removal key, value
// residual, the delta-rule state update (kernels/wkv7.py), the per-head GroupNorm (ln_x), the
// current token's bonus and the output gate. In torch this is about forty small operations per
// layer, whose fixed costs add up to several milliseconds per decoded token; the arithmetic
// itself is a few microseconds. It must equal time_mix7_torch (kernels/time_mix7.py) for one
// token; kernels/selftest.py checks it.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr float kExpMinusHalf = 0.6065306597126334f;  // exp(-0.5): decay = exp(-exp(-0.5) σ(.))
constexpr float kNormalizeEps = 1e-12f;               // torch.nn.functional.normalize's eps

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

// One token of each of `batch` sequences. The token's vectors (r, k, v, the LoRA outputs,
// v_first, gate) are (batch, heads * n); the layer's (w0, a0, v0, k_k, k_a, r_k, ln_x) are
// (heads * n); state and new_state are (batch, heads, n, n). value_gate_lora, v0 and v_first are
// null in layer 0, whose values are not mixed with the first layer's. Writes the output
// projection's input (batch, heads * n) to out. Every (sequence, head) pair is computed alone, in
// the same order whatever the batch, so a sequence gets the same bits alone as in any batch.
RWKV_CLI_EXPORT void rwkv_rwkv7_time_mix_one(
    const float* state, const float* r, const float* k, const float* v, const float* decay_lora,
    const float* iclr_lora, const float* value_gate_lora, const float* v_first, const float* gate,
    const float* w0, const float* a0, const float* v0, const float* k_k, const float* k_a,
    const float* r_k, const float* ln_weight, const float* ln_bias, float* out, float* new_state,
    int64_t batch, int64_t heads, int64_t n, float eps) {
  const bool mix_values = value_gate_lora != nullptr;
  const int64_t pairs = batch * heads, channels = heads * n;
  const bool split = pairs * n * n * 4 >= rwkv_cli::kMinWorkToSplit;  // 4 passes a state row
#pragma omp parallel if (split)
  {
    std::vector<float> w(n), kappa(n), replace(n), key(n), value(n), y(n);
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      // Offsets into the token's vectors (sequence b), the layer's vectors and the states.
      const int64_t token = b * channels + h * n, layer = h * n, matrix = pair * n * n;
      float norm = 0.0f, bonus = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ti = token + i, li = layer + i;
        w[i] = std::exp(-kExpMinusHalf * sigmoid(w0[li] + decay_lora[ti]));
        kappa[i] = k[ti] * k_k[li];
        norm += kappa[i] * kappa[i];
      }
      const float inv_norm = 1.0f / std::max(std::sqrt(norm), kNormalizeEps);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ti = token + i, li = layer + i;
        const float a = sigmoid(a0[li] + iclr_lora[ti]);
        kappa[i] *= inv_norm;
        replace[i] = kappa[i] * a;
        key[i] = k[ti] * (1.0f + (a - 1.0f) * k_a[li]);
        value[i] = v[ti];
        if (mix_values) {
          value[i] += (v_first[ti] - v[ti]) * sigmoid(v0[li] + value_gate_lora[ti]);
        }
        bonus += r[ti] * key[i] * r_k[li];
      }
      // Row j of the head's state: S_j = S_j ⊙ w + (S_j · -κ) (κ ⊙ a) + v_j k; y_j = S_j · r.
      float mean = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const float* row = state + matrix + j * n;
        float* next = new_state + matrix + j * n;
        float removed = 0.0f;
#pragma omp simd reduction(- : removed)
        for (int64_t i = 0; i < n; ++i) removed -= row[i] * kappa[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < n; ++i) {
          next[i] = row[i] * w[i] + removed * replace[i] + value[j] * key[i];
          dot += next[i] * r[token + i];
        }
        y[j] = dot;
        mean += dot;
      }
      mean /= static_cast<float>(n);
      float variance = 0.0f;
      for (int64_t j = 0; j < n; ++j) variance += (y[j] - mean) * (y[j] - mean);
      const float inv_std = 1.0f / std::sqrt(variance / static_cast<float>(n) + eps);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t lj = layer + j;
        const float normed = (y[j] - mean) * inv_std * ln_weight[lj] + ln_bias[lj];
        out[token + j] = (normed + bonus * value[j]) * gate[token + j];
      }
    }
  }
}
