// RWKV-7 WKV launcher (the kernel is in cuda_wkv_kernels.cuh).
#include "cuda_wkv.h"
#include "cuda_wkv_kernels.cuh"

namespace rwkv_cli {

cudaError_t wkv7_forward(Element element, int batch, int tokens, int heads, int head_size,
                         const float* state_in, const void* r, const float* w, const void* k,
                         const void* v, const void* kappa, const void* a, float* y,
                         float* state_out, cudaStream_t stream) {
  if (batch == 0 || heads == 0) return cudaSuccess;
  return with_element(element, [&](auto type) {
    using Scalar = typename decltype(type)::type;
    return with_head_size(head_size, [&](auto size) {
      constexpr int N = decltype(size)::value;
      wkv7_kernel<Scalar, N><<<wkv_heads_grid(batch, heads), N, 0, stream>>>(
          tokens, heads, state_in, static_cast<const Scalar*>(r), w,
          static_cast<const Scalar*>(k), static_cast<const Scalar*>(v),
          static_cast<const Scalar*>(kappa), static_cast<const Scalar*>(a), y, state_out);
      return cudaGetLastError();
    });
  });
}

}  // namespace rwkv_cli
