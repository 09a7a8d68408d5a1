// Runs the CUDA WKV kernels (rwkv_cli/csrc/cuda_wkv_kernels.cuh) on the host, for tests on
// machines without a GPU: each CUDA thread of a block is a std::thread, __shared__ arrays are
// static (one block runs at a time) and __syncthreads() is a barrier. This checks the kernels'
// indexing, staging and arithmetic, not the GPU: tests/test_cuda.py does that where there is one.
//
// Built by tests/test_cuda_emulated.py with nvcc as the compiler driver (host code only, so
// nvcc hands it to the host C++ compiler with the CUDA headers on the include path), loaded with
// ctypes. The emulate_* functions mirror the launchers in cuda_wkv*.cu: same arguments, same
// grid (their wkv*_grid functions) and block sizes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace emulator {

struct Dim {
  int x = 0, y = 0, z = 0;
};

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

thread_local Dim thread_idx, block_idx;
Dim block_dim;
thread_local Barrier* block_barrier = nullptr;

// Runs kernel() as one block of `threads` threads.
template <typename Kernel>
void run_block(Dim block, int threads, Kernel kernel) {
  Barrier barrier(threads);
  std::vector<std::thread> pool;
  for (int thread = 0; thread < threads; ++thread) {
    pool.emplace_back([&, thread] {
      thread_idx = Dim{thread, 0, 0};
      block_idx = block;
      block_barrier = &barrier;
      kernel();
    });
  }
  for (auto& member : pool) member.join();
}

// Runs kernel() over a grid (x and y) of blocks of `threads` threads, one block after the other.
template <typename Kernel>
void launch(dim3 grid, int threads, Kernel kernel) {
  block_dim = Dim{threads, 1, 1};
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      run_block(Dim{static_cast<int>(x), static_cast<int>(y), 0}, threads, kernel);
    }
  }
}

}  // namespace emulator

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx emulator::thread_idx
#define blockIdx emulator::block_idx
#define blockDim emulator::block_dim
inline void __syncthreads() { emulator::block_barrier->wait(); }

#include "cuda_wkv_kernels.cuh"

using rwkv_cli::Element;

extern "C" {

int emulate_wkv4(int element, int batch, int tokens, int channels, const float* w,
                 const float* u, const void* k, const void* v, const float* aa_in,
                 const float* bb_in, const float* pp_in, float* y, float* aa_out, float* bb_out,
                 float* pp_out) {
  return rwkv_cli::with_element(static_cast<Element>(element), [&](auto type) {
    using Scalar = typename decltype(type)::type;
    emulator::launch(rwkv_cli::wkv4_grid(batch, channels), rwkv_cli::WKV4_THREADS, [&] {
      rwkv_cli::wkv4_kernel<Scalar>(tokens, channels, w, u, static_cast<const Scalar*>(k),
                                    static_cast<const Scalar*>(v), aa_in, bb_in, pp_in, y,
                                    aa_out, bb_out, pp_out);
    });
    return cudaSuccess;
  });
}

int emulate_wkv5(int element, int batch, int tokens, int heads, int head_size,
                 const float* state_in, const void* r, const float* w, const void* k,
                 const void* v, const float* u, float* y, float* state_out) {
  return rwkv_cli::with_element(static_cast<Element>(element), [&](auto type) {
    using Scalar = typename decltype(type)::type;
    return rwkv_cli::with_head_size(head_size, [&](auto size) {
      constexpr int N = decltype(size)::value;
      emulator::launch(rwkv_cli::wkv_heads_grid(batch, heads), N, [&] {
        rwkv_cli::wkv5_kernel<Scalar, N>(tokens, heads, state_in, static_cast<const Scalar*>(r),
                                         w, static_cast<const Scalar*>(k),
                                         static_cast<const Scalar*>(v), u, y, state_out);
      });
      return cudaSuccess;
    });
  });
}

int emulate_wkv7(int element, int batch, int tokens, int heads, int head_size,
                 const float* state_in, const void* r, const float* w, const void* k,
                 const void* v, const void* kappa, const void* a, float* y, float* state_out) {
  return rwkv_cli::with_element(static_cast<Element>(element), [&](auto type) {
    using Scalar = typename decltype(type)::type;
    return rwkv_cli::with_head_size(head_size, [&](auto size) {
      constexpr int N = decltype(size)::value;
      emulator::launch(rwkv_cli::wkv_heads_grid(batch, heads), N, [&] {
        rwkv_cli::wkv7_kernel<Scalar, N>(
            tokens, heads, state_in, static_cast<const Scalar*>(r), w,
            static_cast<const Scalar*>(k), static_cast<const Scalar*>(v),
            static_cast<const Scalar*>(kappa), static_cast<const Scalar*>(a), y, state_out);
      });
      return cudaSuccess;
    });
  });
}

}  // extern "C"
