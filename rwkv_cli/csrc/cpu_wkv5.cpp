// The RWKV-5/6 WKV recurrence on the CPU (kernels/wkv5.py has the formula and the torch twins).
// Heads are independent: each thread takes whole heads and runs them through time, one N x N
// state matrix (16 KiB for N = 64) staying in its L1 cache. Per token and head that is two
// passes over the state; the torch loop spends a dozen small operations on the same work, and
// its chunked form trades them for larger products whose pair tensors grow with the chunk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace {

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "wkv5_cpu: ", name, " must be a contiguous float32 CPU tensor");
}

// state (H, N, N) [head, value, key]; r, w, k, v (T, H, N); u (H, N). Returns (y, new state).
std::tuple<at::Tensor, at::Tensor> wkv5_cpu(const at::Tensor& state, const at::Tensor& r,
                                            const at::Tensor& w, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& u) {
  for (const auto& [t, name] : {std::pair{&state, "state"}, {&r, "r"}, {&w, "w"}, {&k, "k"},
                                {&v, "v"}, {&u, "u"}}) {
    check(*t, name);
  }
  TORCH_CHECK(state.dim() == 3 && state.size(1) == state.size(2),
              "wkv5_cpu: state must be (H, N, N)");
  const int64_t heads = state.size(0), n = state.size(1);
  TORCH_CHECK(r.dim() == 3 && r.size(1) == heads && r.size(2) == n,
              "wkv5_cpu: r must be (T, H, N) matching the state");
  for (const auto* t : {&w, &k, &v}) {
    TORCH_CHECK(t->sizes() == r.sizes(), "wkv5_cpu: r, w, k and v must have one shape");
  }
  TORCH_CHECK(u.numel() == heads * n, "wkv5_cpu: u must be (H, N)");
  const int64_t tokens = r.size(0), stride = heads * n;
  at::Tensor y = at::empty_like(r);
  at::Tensor next = state.clone();
  const float *R = r.data_ptr<float>(), *W = w.data_ptr<float>(), *K = k.data_ptr<float>();
  const float *V = v.data_ptr<float>(), *U = u.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  float* S = next.data_ptr<float>();

  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      float* head_state = S + h * n * n;
      const float* bonus = U + h * n;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t base = t * stride + h * n;
        const float *rt = R + base, *wt = W + base, *kt = K + base, *vt = V + base;
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
          Y[base + j] = dot + current * value;
        }
      }
    }
  });
  return {y, next};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rwkv_cli, m) {
  m.def("wkv5_cpu(Tensor state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor u) "
        "-> (Tensor, Tensor)");
  m.impl("wkv5_cpu", c10::DispatchKey::CPU, wkv5_cpu);
}
