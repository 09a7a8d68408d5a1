// RWKV-5/6 WKV launcher (the kernel is in cuda_wkv_kernels.cuh).
#include "cuda_wkv.h"
#include "cuda_wkv_kernels.cuh"

namespace rwkv_cli {

cudaError_t wkv5_forward(Element element, int batch, int tokens, int heads, int head_size,
                         const float* state_in, const void* r, const float* w, const void* k,
                         const void* v, const float* u, float* y, float* state_out,
                         cudaStream_t stream) {
  if (batch == 0 || heads == 0) return cudaSuccess;
  return with_element(element, [&](auto type) {
    using Scalar = typename decltype(type)::type;
    return with_head_size(head_size, [&](auto size) {
      constexpr int N = decltype(size)::value;
      wkv5_kernel<Scalar, N><<<wkv_heads_grid(batch, heads), N, 0, stream>>>(
          tokens, heads, state_in, static_cast<const Scalar*>(r), w,
          static_cast<const Scalar*>(k), static_cast<const Scalar*>(v), u, y, state_out);
      return cudaGetLastError();
    });
  });
}

}  // namespace rwkv_cli
