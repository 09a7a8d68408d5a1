// The CUDA WKV kernels' host interface: launchers taking raw device pointers and a stream.
//
// Plain C++ (no torch), so the .cu files that define these compile with bare nvcc (CI does that
// on a machine without a GPU); cuda_wkv.cpp checks torch tensors and calls them.
//
// Layouts: token-major, row-major and contiguous, for a batch of B sequences (B = 1: one). RWKV-4
// inputs are (B, T, C) and its state (B, C); RWKV-5/6/7 inputs are (B, T, H, N) and the state
// (B, H, N, N) is indexed [sequence, head, value, key]. Per-model parameters (RWKV-4's w and u,
// RWKV-5/6's u) are shared by the sequences. The state and the outputs y are float32 whatever the
// input type. A launcher reads the state from `*_in` and writes the new one to `*_out`, which may
// be the same memory. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

namespace rwkv_cli {

// The element type of the receptance, key, value, ... inputs.
enum class Element { f32, f16, bf16 };

// Head sizes the RWKV-5/6/7 kernels are compiled for (each thread keeps a state row of this
// many floats in registers, so the size is a template parameter). Every release uses 64.
inline bool wkv_head_size_supported(int head_size) {
  return head_size == 16 || head_size == 32 || head_size == 64 || head_size == 128;
}

// Sequences one launch takes: the batch is the grid's y dimension, which CUDA limits to 65535.
constexpr int WKV_MAX_BATCH = 65535;

// RWKV-4, one thread per channel of a sequence. w = -exp(time_decay) and u = time_first: (C,)
// float32. k, v: (B, T, C) of `element`. State aa, bb, pp: (B, C) float32. y: (B, T, C) float32.
cudaError_t wkv4_forward(Element element, int batch, int tokens, int channels, const float* w,
                         const float* u, const void* k, const void* v, const float* aa_in,
                         const float* bb_in, const float* pp_in, float* y, float* aa_out,
                         float* bb_out, float* pp_out, cudaStream_t stream);

// RWKV-5 and 6, one thread per value row of each head of a sequence. r, k, v: (B, T, H, N) of
// `element`; w: (B, T, H, N) float32 decay in (0, 1); u: (H, N) float32 bonus. y: (B, T, H, N)
// float32.
cudaError_t wkv5_forward(Element element, int batch, int tokens, int heads, int head_size,
                         const float* state_in, const void* r, const float* w, const void* k,
                         const void* v, const float* u, float* y, float* state_out,
                         cudaStream_t stream);

// RWKV-7, one thread per value row of each head of a sequence. r, k, v, kappa, a: (B, T, H, N)
// of `element`; w: (B, T, H, N) float32 decay in (0, 1). y: (B, T, H, N) float32.
cudaError_t wkv7_forward(Element element, int batch, int tokens, int heads, int head_size,
                         const float* state_in, const void* r, const float* w, const void* k,
                         const void* v, const void* kappa, const void* a, float* y,
                         float* state_out, cudaStream_t stream);

}  // namespace rwkv_cli
