// One RWKV-7 time-mixing step for a single token on the CPU, everything between the input
// projections and the output projection in one pass: decay, in-context learning rate, removal
// key, value residual, the delta-rule state update (kernels/wkv7.py), the per-head GroupNorm
// (ln_x), the current token's bonus and the output gate. In torch this is about forty small
// operations per layer, whose fixed costs add up to several milliseconds per decoded token; the
// arithmetic itself is a few microseconds. It must equal models/rwkv7.py's time_mix for one
// token (tests/test_weight_formats.py checks it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr float kExpMinusHalf = 0.6065306597126334f;  // exp(-0.5): decay = exp(-exp(-0.5) σ(.))
constexpr float kNormalizeEps = 1e-12f;               // torch.nn.functional.normalize's eps

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

const float* ptr(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "rwkv7_time_mix_one: ", name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == numel, "rwkv7_time_mix_one: ", name, " must have ", numel,
              " elements");
  return t.data_ptr<float>();
}

// Returns (out (C,), new state (H, N, N)). value_gate_lora and v0 are empty tensors in layer 0,
// whose values are not mixed with the first layer's.
std::tuple<at::Tensor, at::Tensor> time_mix_one(
    const at::Tensor& state, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& decay_lora, const at::Tensor& iclr_lora, const at::Tensor& value_gate_lora,
    const at::Tensor& v_first, const at::Tensor& gate, const at::Tensor& w0,
    const at::Tensor& a0, const at::Tensor& v0, const at::Tensor& k_k, const at::Tensor& k_a,
    const at::Tensor& r_k, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  TORCH_CHECK(state.dim() == 3 && state.size(1) == state.size(2),
              "rwkv7_time_mix_one: state must be (H, N, N)");
  const int64_t heads = state.size(0), n = state.size(1), c = heads * n;
  const float* S0 = ptr(state, c * n, "state");
  const float *R = ptr(r, c, "r"), *K = ptr(k, c, "k"), *V = ptr(v, c, "v");
  const float *WL = ptr(decay_lora, c, "decay_lora"), *AL = ptr(iclr_lora, c, "iclr_lora");
  const float *G = ptr(gate, c, "gate"), *W0 = ptr(w0, c, "w0"), *A0 = ptr(a0, c, "a0");
  const float *KK = ptr(k_k, c, "k_k"), *KA = ptr(k_a, c, "k_a"), *RK = ptr(r_k, c, "r_k");
  const float *LW = ptr(ln_weight, c, "ln_weight"), *LB = ptr(ln_bias, c, "ln_bias");
  const bool mix_values = value_gate_lora.numel() > 0;
  const float *VL = nullptr, *V0 = nullptr, *VF = nullptr;
  if (mix_values) {
    VL = ptr(value_gate_lora, c, "value_gate_lora");
    V0 = ptr(v0, c, "v0");
    VF = ptr(v_first, c, "v_first");
  }

  at::Tensor out = at::empty({c}, r.options());
  at::Tensor new_state = at::empty_like(state);
  float* O = out.data_ptr<float>();
  float* S1 = new_state.data_ptr<float>();

  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(n), kappa(n), replace(n), key(n), value(n), y(n);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t base = h * n;
      float norm = 0.0f, bonus = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ci = base + i;
        w[i] = std::exp(-kExpMinusHalf * sigmoid(W0[ci] + WL[ci]));
        kappa[i] = K[ci] * KK[ci];
        norm += kappa[i] * kappa[i];
      }
      const float inv_norm = 1.0f / std::max(std::sqrt(norm), kNormalizeEps);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t ci = base + i;
        const float a = sigmoid(A0[ci] + AL[ci]);
        kappa[i] *= inv_norm;
        replace[i] = kappa[i] * a;
        key[i] = K[ci] * (1.0f + (a - 1.0f) * KA[ci]);
        value[i] = mix_values ? V[ci] + (VF[ci] - V[ci]) * sigmoid(V0[ci] + VL[ci]) : V[ci];
        bonus += R[ci] * key[i] * RK[ci];
      }
      // Row j of the head's state: S_j = S_j ⊙ w + (S_j · -κ) (κ ⊙ a) + v_j k; y_j = S_j · r.
      float mean = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const float* row = S0 + (base + j) * n;
        float* next = S1 + (base + j) * n;
        float removed = 0.0f;
        for (int64_t i = 0; i < n; ++i) removed -= row[i] * kappa[i];
        float dot = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          next[i] = row[i] * w[i] + removed * replace[i] + value[j] * key[i];
          dot += next[i] * R[base + i];
        }
        y[j] = dot;
        mean += dot;
      }
      mean /= static_cast<float>(n);
      float variance = 0.0f;
      for (int64_t j = 0; j < n; ++j) variance += (y[j] - mean) * (y[j] - mean);
      const float inv_std = 1.0f / std::sqrt(variance / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t cj = base + j;
        const float normed = (y[j] - mean) * inv_std * LW[cj] + LB[cj];
        O[cj] = (normed + bonus * value[j]) * G[cj];
      }
    }
  });
  return {out, new_state};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rwkv_cli, m) {
  m.def(
      "rwkv7_time_mix_one(Tensor state, Tensor r, Tensor k, Tensor v, Tensor decay_lora, "
      "Tensor iclr_lora, Tensor value_gate_lora, Tensor v_first, Tensor gate, Tensor w0, "
      "Tensor a0, Tensor v0, Tensor k_k, Tensor k_a, Tensor r_k, Tensor ln_weight, "
      "Tensor ln_bias, float eps) -> (Tensor, Tensor)");
  m.impl("rwkv7_time_mix_one", c10::DispatchKey::CPU, time_mix_one);
}
