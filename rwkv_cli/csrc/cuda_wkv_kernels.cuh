// The WKV recurrences as CUDA kernels (device code only; the launchers are in cuda_wkv*.cu).
//
// Inference over a batch of B sequences (layouts in cuda_wkv.h), looping over the T tokens inside
// the kernel. The grid's y index is the sequence: the blocks of one sequence are those of B = 1,
// and a sequence's results do not depend on the others in the batch. Each kernel reads its inputs
// in their own type, computes in float32 and writes float32. The math is that of the torch
// references in rwkv_cli/kernels/wkv{4,5,7}.py, which tests compare these with.
//
// tests/support/cuda_emulator.cpp also compiles this header on the host and runs the kernels with
// one std::thread per CUDA thread, so keep to threadIdx/blockIdx/blockDim, __shared__ arrays
// declared at the top of a kernel and __syncthreads().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <type_traits>

#include "cuda_wkv.h"

namespace rwkv_cli {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

constexpr int WKV4_THREADS = 128;  // channels per block; RWKV-4 widths are multiples of 128

// RWKV-4: thread c owns channel c of one sequence and carries its state (aa, bb, pp) through the
// tokens, in the numerically stable form (docs/DESIGN.md section 4): pp is the largest exponent
// seen, and aa, bb are the numerator and denominator scaled by exp(-pp). Reads and writes of one
// token are coalesced across the threads of a block.
template <typename Scalar>
__global__ void __launch_bounds__(WKV4_THREADS)
    wkv4_kernel(int tokens, int channels, const float* __restrict__ w,
                const float* __restrict__ u, const Scalar* __restrict__ k,
                const Scalar* __restrict__ v, const float* aa_in, const float* bb_in,
                const float* pp_in, float* __restrict__ y, float* aa_out, float* bb_out,
                float* pp_out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const size_t sequence = blockIdx.y;
  const size_t state_at = sequence * channels + c;
  const float decay = w[c], bonus = u[c];
  float aa = aa_in[state_at], bb = bb_in[state_at], pp = pp_in[state_at];
  for (int t = 0; t < tokens; ++t) {
    const size_t at = (sequence * tokens + t) * channels + c;
    const float kt = to_float(k[at]), vt = to_float(v[at]);

    const float current = bonus + kt;  // the current token's exponent
    float top = fmaxf(pp, current);
    float past = expf(pp - top), now = expf(current - top);
    y[at] = (past * aa + now * vt) / (past * bb + now);

    const float decayed = pp + decay;
    top = fmaxf(decayed, kt);
    past = expf(decayed - top);
    now = expf(kt - top);
    aa = past * aa + now * vt;
    bb = past * bb + now;
    pp = top;
  }
  aa_out[state_at] = aa;
  bb_out[state_at] = bb;
  pp_out[state_at] = pp;
}

// RWKV-5/6: one block per head of a sequence, thread i owns value row i of the head's state S
// (N floats in registers). Per token the block stages r, w, k in shared memory (thread j loads
// element j), then thread i computes
//     y_i = sum_j r_j (u_j k_j v_i + S_ij);    S_ij = S_ij w_j + v_i k_j
// The staging buffers alternate between tokens, so one barrier per token suffices: a thread can
// only overwrite buffer t % 2 after every thread has passed the barrier of token t - 1, that is
// after all reads of token t - 2.
template <typename Scalar, int N>
__global__ void __launch_bounds__(N)
    wkv5_kernel(int tokens, int heads, const float* state_in, const Scalar* __restrict__ r,
                const float* __restrict__ w, const Scalar* __restrict__ k,
                const Scalar* __restrict__ v, const float* __restrict__ u,
                float* __restrict__ y, float* state_out) {
  __shared__ float r_s[2][N], w_s[2][N], k_s[2][N], u_s[N];
  const int head = blockIdx.x, row = threadIdx.x;
  const size_t sequence = blockIdx.y;

  float s[N];  // S[sequence, head, row, :]
  const size_t state_at = ((sequence * heads + head) * N + row) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = state_in[state_at + j];
  u_s[row] = u[head * N + row];  // visible after the first barrier below

  for (int t = 0; t < tokens; ++t) {
    const int b = t & 1;
    const size_t at = ((sequence * tokens + t) * heads + head) * N + row;
    r_s[b][row] = to_float(r[at]);
    w_s[b][row] = w[at];
    k_s[b][row] = to_float(k[at]);
    const float value = to_float(v[at]);
    __syncthreads();

    float out = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float kv = k_s[b][j] * value;
      out += r_s[b][j] * (u_s[j] * kv + s[j]);
      s[j] = s[j] * w_s[b][j] + kv;
    }
    y[at] = out;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) state_out[state_at + j] = s[j];
}

// RWKV-7: the same layout as RWKV-5/6; the delta rule with alpha = -kappa, beta = kappa * a:
//     S_i = S_i diag(w) + (S_i . alpha) beta^T + v_i k^T;    y_i = S_i . r
template <typename Scalar, int N>
__global__ void __launch_bounds__(N)
    wkv7_kernel(int tokens, int heads, const float* state_in, const Scalar* __restrict__ r,
                const float* __restrict__ w, const Scalar* __restrict__ k,
                const Scalar* __restrict__ v, const Scalar* __restrict__ kappa,
                const Scalar* __restrict__ a, float* __restrict__ y, float* state_out) {
  __shared__ float r_s[2][N], w_s[2][N], k_s[2][N], alpha_s[2][N], beta_s[2][N];
  const int head = blockIdx.x, row = threadIdx.x;
  const size_t sequence = blockIdx.y;

  float s[N];  // S[sequence, head, row, :]
  const size_t state_at = ((sequence * heads + head) * N + row) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = state_in[state_at + j];

  for (int t = 0; t < tokens; ++t) {
    const int b = t & 1;
    const size_t at = ((sequence * tokens + t) * heads + head) * N + row;
    const float removal = to_float(kappa[at]);
    r_s[b][row] = to_float(r[at]);
    w_s[b][row] = w[at];
    k_s[b][row] = to_float(k[at]);
    alpha_s[b][row] = -removal;
    beta_s[b][row] = removal * to_float(a[at]);
    const float value = to_float(v[at]);
    __syncthreads();

    float removed = 0.f;  // S_i . alpha, with the state before this token
#pragma unroll
    for (int j = 0; j < N; ++j) removed += s[j] * alpha_s[b][j];
    float out = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s[j] = s[j] * w_s[b][j] + removed * beta_s[b][j] + value * k_s[b][j];
      out += s[j] * r_s[b][j];
    }
    y[at] = out;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) state_out[state_at + j] = s[j];
}

// Launch shapes, shared by the launchers and tests/support/cuda_emulator.cpp: x runs over the
// blocks of one sequence, y over the sequences (at most WKV_MAX_BATCH).
inline dim3 wkv4_grid(int batch, int channels) {
  const int blocks = (channels + WKV4_THREADS - 1) / WKV4_THREADS;
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
}

inline dim3 wkv_heads_grid(int batch, int heads) {
  return dim3(static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

// Host-side dispatch: call body(Type<Scalar>{}) for the element type, and
// body(std::integral_constant<int, N>{}) for the head size (the sizes wkv_head_size_supported
// accepts).
template <typename T>
struct Type {
  using type = T;
};

template <typename Body>
cudaError_t with_element(Element element, Body body) {
  switch (element) {
    case Element::f32:
      return body(Type<float>{});
    case Element::f16:
      return body(Type<__half>{});
    case Element::bf16:
      return body(Type<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

template <typename Body>
cudaError_t with_head_size(int head_size, Body body) {
  switch (head_size) {
    case 16:
      return body(std::integral_constant<int, 16>{});
    case 32:
      return body(std::integral_constant<int, 32>{});
    case 64:
      return body(std::integral_constant<int, 64>{});
    case 128:
      return body(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkv_cli
