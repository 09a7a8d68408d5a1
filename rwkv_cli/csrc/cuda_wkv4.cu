// RWKV-4 WKV launcher (the kernel is in cuda_wkv_kernels.cuh).
#include "cuda_wkv.h"
#include "cuda_wkv_kernels.cuh"

namespace rwkv_cli {

cudaError_t wkv4_forward(Element element, int batch, int tokens, int channels, const float* w,
                         const float* u, const void* k, const void* v, const float* aa_in,
                         const float* bb_in, const float* pp_in, float* y, float* aa_out,
                         float* bb_out, float* pp_out, cudaStream_t stream) {
  if (batch == 0 || channels == 0) return cudaSuccess;
  return with_element(element, [&](auto type) {
    using Scalar = typename decltype(type)::type;
    wkv4_kernel<Scalar><<<wkv4_grid(batch, channels), WKV4_THREADS, 0, stream>>>(
        tokens, channels, w, u, static_cast<const Scalar*>(k), static_cast<const Scalar*>(v),
        aa_in, bb_in, pp_in, y, aa_out, bb_out, pp_out);
    return cudaGetLastError();
  });
}

}  // namespace rwkv_cli
