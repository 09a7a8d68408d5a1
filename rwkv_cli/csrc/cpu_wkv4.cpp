// The RWKV-4 WKV recurrence on the CPU (kernels/wkv4.py has the formula and the torch twin).
// Channels are independent: each thread takes a range of them and runs them through time, the
// state in registers. In torch the same loop costs a dozen small operations per token and layer,
// a fifth of a 0.1B model's prefill; here it is a few microseconds per token.
#include <algorithm>
#include <cmath>

#include "cpu_kernels.h"

namespace {
constexpr int64_t kChannelsPerTask = 64;
}  // namespace

// B sequences (B = 1: one sequence): k, v, y (batch, tokens, channels); aa, bb, pp and the new
// state *_out (batch, channels); w, u (channels). The inputs are not modified.
RWKV_CLI_EXPORT void rwkv_wkv4(const float* aa, const float* bb, const float* pp, const float* w,
                               const float* u, const float* k, const float* v, float* y,
                               float* aa_out, float* bb_out, float* pp_out, int64_t batch,
                               int64_t tokens, int64_t channels) {
  const int64_t tasks_per_sequence = (channels + kChannelsPerTask - 1) / kChannelsPerTask;
  const int64_t tasks = batch * tasks_per_sequence;
  const bool split = batch * tokens * channels * 20 >= rwkv_cli::kMinWorkToSplit;  // 2 exp, ~20 ops
#pragma omp parallel for schedule(static) if (split)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t sequence = task / tasks_per_sequence, first = task % tasks_per_sequence;
    const int64_t end = std::min(channels, (first + 1) * kChannelsPerTask);
    const int64_t state = sequence * channels, inputs = state * tokens;  // the sequence's
    for (int64_t c = first * kChannelsPerTask; c < end; ++c) {
      float a = aa[state + c], b = bb[state + c], p = pp[state + c];
      const float decay = w[c], bonus = u[c];
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t at = inputs + t * channels + c;
        const float kt = k[at], vt = v[at];
        const float current = bonus + kt;
        float top = std::max(p, current);
        float past = std::exp(p - top), now = std::exp(current - top);
        y[at] = (past * a + now * vt) / (past * b + now);
        const float decayed = p + decay;
        top = std::max(decayed, kt);
        past = std::exp(decayed - top);
        now = std::exp(kt - top);
        a = past * a + now * vt;
        b = past * b + now;
        p = top;
      }
      aa_out[state + c] = a;
      bb_out[state + c] = b;
      pp_out[state + c] = p;
    }
  }
}
