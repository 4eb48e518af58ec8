// Vector helpers shared by cpu_attention.cc (attention over a KV cache, and its forward pass for training) and
// cpu_attention_grad.cc (its backward pass): 8 f32 lanes of one 256-bit vector, one query row per lane.
#ifndef RANKRAG_JAX_MODEL_CPU_ATTENTION_H_
#define RANKRAG_JAX_MODEL_CPU_ATTENTION_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace rankrag_attention {

constexpr int64_t kLanes = 8;  // query rows per tile = f32 lanes of one 256-bit vector.
typedef float Vec __attribute__((vector_size(32), aligned(4)));
typedef int32_t IVec __attribute__((vector_size(32), aligned(4)));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// exp(x) per lane, 0 below -87.3 (so exp(-inf) = 0): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' expf
// polynomial (relative error ~2e-7), 2^n through the exponent bits.
inline Vec Exp(Vec x) {
  const Vec lo = Vec{} - 87.33654f;
  const IVec underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > 88.37626f ? Vec{} + 88.37626f : x;
  Vec n = x * 1.44269504088896341f + 0.5f;
  Vec t = __builtin_convertvector(__builtin_convertvector(n, IVec), Vec);
  n = t > n ? t - 1.0f : t;  // floor
  Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? Vec{} : p * scale;
}

// Whether every row sees slots [s0, s0 + 8) (most blocks of a prompt's causal mask): one 8-byte load per row.
inline bool AllVisible(const bool* const mask_row[kLanes], int64_t s0, int64_t visible_end) {
  if (s0 + kLanes > visible_end) return false;
  constexpr uint64_t kAllTrue = 0x0101010101010101ull;
  for (int64_t m = 0; m < kLanes; ++m) {
    uint64_t bytes;
    std::memcpy(&bytes, mask_row[m] + s0, sizeof(bytes));
    if (bytes != kAllTrue) return false;
  }
  return true;
}

inline float Sum(Vec v) {
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// Past the last slot `mask_row` sees, and at least `floor`: 8 slots at a time from the end, then one by one.
inline int64_t VisibleEnd(const bool* mask_row, int64_t s_size, int64_t floor) {
  int64_t end = s_size;
  for (uint64_t bytes; end - 8 >= floor; end -= 8) {
    std::memcpy(&bytes, mask_row + end - 8, sizeof(bytes));
    if (bytes) break;
  }
  while (end > floor && !mask_row[end - 1]) --end;
  return std::max(end, floor);
}

// The first slot any of the 8 rows sees before `visible_end` (which at least one row sees before): 8 slots at a
// time, then one by one.
inline int64_t WindowBegin(const bool* const mask_row[kLanes], int64_t visible_end) {
  int64_t begin = visible_end;
  for (int64_t m = 0; m < kLanes; ++m) {
    int64_t first = 0;
    for (uint64_t bytes; first + 8 <= begin; first += 8) {
      std::memcpy(&bytes, mask_row[m] + first, sizeof(bytes));
      if (bytes) break;
    }
    while (first < begin && !mask_row[m][first]) ++first;
    begin = std::min(begin, first);
  }
  return begin;
}

// Runs work->Run() on the calling thread and on up to `items - 1` of the pool's threads, and returns when
// work->done reaches `items`. Work::Run takes items off an atomic counter and counts each one done.
template <typename Work>
void RunOnPool(xla::ffi::ThreadPool& pool, std::shared_ptr<Work> work, int64_t items) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace rankrag_attention

#endif  // RANKRAG_JAX_MODEL_CPU_ATTENTION_H_
