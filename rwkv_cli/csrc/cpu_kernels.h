// What the CPU kernels (cpu_*.cpp) share. They are plain C++ with a C interface: no torch
// headers, which take seconds per file to compile, so the first command on a new machine builds
// them in about two seconds. kernels/cpu_ops.py loads the library with ctypes, checks every
// argument (shapes, types, contiguity) and passes data pointers; nothing here checks again.
// Threads come from OpenMP: the same libgomp torch runs on, so torch.set_num_threads applies.
#pragma once

#include <cstdint>
#include <cstring>

#define RWKV_CLI_EXPORT extern "C" __attribute__((visibility("default")))

namespace rwkv_cli {

// Waking the other threads for a parallel loop costs tens of microseconds, more in a virtual
// machine and more again when they sleep while they wait (as `rwkv` has them do): a loop with
// less work than about this many multiply-adds runs on the calling thread alone. Small models
// (the demo's 192 channels) then decode on one thread, as fast as they can.
constexpr int64_t kMinWorkToSplit = int64_t{1} << 18;

// bfloat16 is the high half of a float32.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// IEEE half precision: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits.
inline float f16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  uint32_t wide;
  if (exponent == 0x1fu) {
    wide = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN
  } else if (exponent != 0) {
    wide = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else {
    const float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -subnormal : subnormal;
  }
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

}  // namespace rwkv_cli
