// One RWKV-7 time-mixing step for a single token on the CPU, everything between the input
// projections and the output projection in one pass: decay, in-context learning rate, removal
// key, value residual, the delta-rule state update (kernels/wkv7.py), the per-head GroupNorm
// (ln_x), the current token's bonus and the output gate. In torch this is about forty small
// operations per layer, whose fixed costs add up to several milliseconds per decoded token; the
// arithmetic itself is a few microseconds. It must equal time_mix7_torch (kernels/time_mix7.py)
// for one token; kernels/selftest.py checks it.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr float kExpMinusHalf = 0.6065306597126334f;  // exp(-0.5): decay = exp(-exp(-0.5) σ(.))
constexpr float kNormalizeEps = 1e-12f;               // torch.nn.functional.normalize's eps

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

// Vectors have heads * n elements; state and new_state are (heads, n, n). value_gate_lora, v0
// and v_first are null in layer 0, whose values are not mixed with the first layer's. Writes
// the output projection's input to out.
RWKV_CLI_EXPORT void rwkv_rwkv7_time_mix_one(
    const float* state, const float* r, const float* k, const float* v, const float* decay_lora,
    const float* iclr_lora, const float* value_gate_lora, const float* v_first, const float* gate,
    const float* w0, const float* a0, const float* v0, const float* k_k, const float* k_a,
    const float* r_k, const float* ln_weight, const float* ln_bias, float* out, float* new_state,
    int64_t heads, int64_t n, float eps) {
  const bool mix_values = value_gate_lora != nullptr;
  const bool split = heads * n * n * 4 >= rwkv_cli::kMinWorkToSplit;  // 4 passes a state row
#pragma omp parallel if (split)
  {
    std::vector<float> w(n), kappa(n), replace(n), key(n), value(n), y(n);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = h * n;
      float norm = 0.0f, bonus = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ci = base + i;
        w[i] = std::exp(-kExpMinusHalf * sigmoid(w0[ci] + decay_lora[ci]));
        kappa[i] = k[ci] * k_k[ci];
        norm += kappa[i] * kappa[i];
      }
      const float inv_norm = 1.0f / std::max(std::sqrt(norm), kNormalizeEps);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ci = base + i;
        const float a = sigmoid(a0[ci] + iclr_lora[ci]);
        kappa[i] *= inv_norm;
        replace[i] = kappa[i] * a;
        key[i] = k[ci] * (1.0f + (a - 1.0f) * k_a[ci]);
        value[i] = mix_values ? v[ci] + (v_first[ci] - v[ci]) * sigmoid(v0[ci] + value_gate_lora[ci])
                              : v[ci];
        bonus += r[ci] * key[i] * r_k[ci];
      }
      // Row j of the head's state: S_j = S_j ⊙ w + (S_j · -κ) (κ ⊙ a) + v_j k; y_j = S_j · r.
      float mean = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const float* row = state + (base + j) * n;
        float* next = new_state + (base + j) * n;
        float removed = 0.0f;
        for (int64_t i = 0; i < n; ++i) removed -= row[i] * kappa[i];
        float dot = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          next[i] = row[i] * w[i] + removed * replace[i] + value[j] * key[i];
          dot += next[i] * r[base + i];
        }
        y[j] = dot;
        mean += dot;
      }
      mean /= static_cast<float>(n);
      float variance = 0.0f;
      for (int64_t j = 0; j < n; ++j) variance += (y[j] - mean) * (y[j] - mean);
      const float inv_std = 1.0f / std::sqrt(variance / static_cast<float>(n) + eps);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t cj = base + j;
        const float normed = (y[j] - mean) * inv_std * ln_weight[cj] + ln_bias[cj];
        out[cj] = (normed + bonus * value[j]) * gate[cj];
      }
    }
  }
}
