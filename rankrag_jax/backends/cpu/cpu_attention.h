// What cpu_attention.cc (attention over a KV cache, and its forward pass for training) and cpu_attention_grad.cc
// (its backward pass) share: vector helpers (8 f32 lanes of one 256-bit vector, one query row per lane), the
// inputs' shapes, running work items on XLA:CPU's thread pool, and the FFI binding of q, k, v and the mask.
#ifndef RANKRAG_JAX_MODEL_CPU_ATTENTION_H_
#define RANKRAG_JAX_MODEL_CPU_ATTENTION_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace rankrag_attention {

constexpr int64_t kLanes = 8;  // f32 lanes of one 256-bit vector: one query row per lane.
constexpr int64_t kTileRows = 2 * kLanes;  // query rows per tile: two vectors.
constexpr int64_t kSlotBlock = 6;  // slots (or features) per [6 x 16] product block: J of MultiplyBlock.
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

// seen[s] = 1 if each of the `rows` mask rows sees slot s < visible_end, else 0; zeros up to `padded_end`. Eight
// slots per load, so that a block's "all visible" check is one load (below) rather than one per row.
inline void SeenByAll(const bool* const mask_row[], int64_t rows, int64_t visible_end, int64_t padded_end,
                      uint8_t* seen) {
  int64_t s = 0;
  for (; s + 8 <= visible_end; s += 8) {
    uint64_t all = ~0ull, bytes;
    for (int64_t m = 0; m < rows; ++m) {
      std::memcpy(&bytes, mask_row[m] + s, sizeof(bytes));
      all &= bytes;
    }
    std::memcpy(seen + s, &all, sizeof(all));
  }
  for (; s < visible_end; ++s) {
    bool all = true;
    for (int64_t m = 0; m < rows; ++m) all = all && mask_row[m][s];
    seen[s] = all;
  }
  std::fill(seen + visible_end, seen + padded_end, 0);
}

// Whether seen[s0 .. s0 + kCount) are all 1, kCount <= 8 (most blocks of a prompt's causal mask); `seen` holds at
// least s0 + 8 bytes.
template <int64_t kCount>
inline bool AllSeen(const uint8_t* seen, int64_t s0) {
  static_assert(kCount <= kLanes, "at most 8 flags per load");
  uint64_t bytes;
  std::memcpy(&bytes, seen + s0, sizeof(bytes));
  constexpr uint64_t kAllTrue = 0x0101010101010101ull >> (8 * (kLanes - kCount));
  return (bytes & (~0ull >> (8 * (kLanes - kCount)))) == kAllTrue;
}

// c0[j], c1[j] = sum_k a[j * a_row + k * a_k] * b[k * b_k + (0..8, 8..16)] for j < J: a [J, K] block of a
// product with 16 columns (a tile's two vectors of rows), every element of `a` broadcast once against both
// vectors. J = 6 keeps 12 accumulators, the two b vectors and one broadcast in AVX2's 16 registers: ~95% of one
// core's FMA rate, where 8 x 8 blocks (one vector, 8 accumulators, a broadcast per FMA) reach ~85%.
template <int J>
inline void MultiplyBlock(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t b_k, int64_t k_size,
                          Vec (&c0)[J], Vec (&c1)[J]) {
  for (int j = 0; j < J; ++j) c0[j] = c1[j] = Vec{};
  for (int64_t k = 0; k < k_size; ++k) {
    const Vec b0 = Load(b + k * b_k), b1 = Load(b + k * b_k + kLanes);
    for (int j = 0; j < J; ++j) {
      const float x = a[j * a_row + k * a_k];
      c0[j] += x * b0;
      c1[j] += x * b1;
    }
  }
}

// out_t[d, 0..16) = sum_{s < slots} rows[s, d] weights[s, 0..16) for d < D: rows [slots, D] (values, or keys for
// dq), weights [slots, 16] (a tile's probabilities or score gradients), out_t [D, 16]. [6 features x 16 rows]
// blocks, then 2 features at a time (D is a multiple of 8).
inline void WeightedRowSums(const float* rows, int64_t d_size, const float* weights, int64_t slots, float* out_t) {
  int64_t d0 = 0;
  for (; d0 + kSlotBlock <= d_size; d0 += kSlotBlock) {
    Vec c0[kSlotBlock], c1[kSlotBlock];
    MultiplyBlock<kSlotBlock>(rows + d0, 1, d_size, weights, kTileRows, slots, c0, c1);
    for (int64_t j = 0; j < kSlotBlock; ++j) {
      Store(out_t + (d0 + j) * kTileRows, c0[j]);
      Store(out_t + (d0 + j) * kTileRows + kLanes, c1[j]);
    }
  }
  for (; d0 < d_size; d0 += 2) {
    Vec c0[2], c1[2];
    MultiplyBlock<2>(rows + d0, 1, d_size, weights, kTileRows, slots, c0, c1);
    for (int64_t j = 0; j < 2; ++j) {
      Store(out_t + (d0 + j) * kTileRows, c0[j]);
      Store(out_t + (d0 + j) * kTileRows + kLanes, c1[j]);
    }
  }
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

// The first slot any of the `rows` mask rows sees before `visible_end` (which at least one row sees before): 8
// slots at a time, then one by one.
inline int64_t WindowBegin(const bool* const mask_row[], int64_t rows, int64_t visible_end) {
  int64_t begin = visible_end;
  for (int64_t m = 0; m < rows; ++m) {
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

// What every attention kernel reads: q [N, H, D] (N query tokens), q_index [B, T] (row b's position t has query
// token q_index[b, t]; an index outside [0, N) marks a padding position: no query, no output), heads-major k and v
// [B, Kh, S, D], mask [B, T, S], with H a multiple of Kh and D of 8; kv head c's G * T query rows r (r = g * T +
// t: query head c * G + g at position t) make tiles_per_kv_head tiles of kTileRows. With q_index[b, t] = b * T + t
// the queries are the rows' own; with a token layout's map (`token_layout.flat_compact_index`) they are the
// compact real tokens, which the kernels read and write in place of the rows (no gathers around the call).
struct AttentionInputs {
  const float *q, *k, *v;
  const int32_t* q_index;
  const bool* mask;
  int64_t q_tokens, batch, t_size, heads, kv_heads, group, s_size, d_size, tiles_per_kv_head;

  // Sets the fields and returns true if the shapes are as above, else returns false.
  bool Set(xla::ffi::Buffer<xla::ffi::F32>& q_in, xla::ffi::Buffer<xla::ffi::S32>& q_index_in,
           xla::ffi::Buffer<xla::ffi::F32>& k_in, xla::ffi::Buffer<xla::ffi::F32>& v_in,
           xla::ffi::Buffer<xla::ffi::PRED>& mask_in) {
    auto qd = q_in.dimensions();
    auto id = q_index_in.dimensions();
    auto kd = k_in.dimensions();
    auto md = mask_in.dimensions();
    if (qd.size() != 3 || id.size() != 2 || kd.size() != 4 || md.size() != 3 || kd[0] != id[0] ||
        kd[3] != qd[2] || qd[1] % kd[1] != 0 || qd[2] % kLanes != 0 || md[0] != id[0] || md[1] != id[1] ||
        md[2] != kd[2] || v_in.dimensions().size() != 4 ||
        !std::equal(kd.begin(), kd.end(), v_in.dimensions().begin())) {
      return false;
    }
    q = q_in.typed_data();
    q_index = q_index_in.typed_data();
    k = k_in.typed_data();
    v = v_in.typed_data();
    mask = mask_in.typed_data();
    q_tokens = qd[0];
    batch = id[0];
    t_size = id[1];
    heads = qd[1];
    kv_heads = kd[1];
    group = heads / kv_heads;
    s_size = kd[2];
    d_size = qd[2];
    tiles_per_kv_head = (group * t_size + kTileRows - 1) / kTileRows;
    return true;
  }

  // Where query head h of row b's position t sits in q (and in every [N, H, D] array), or -1 at a padding position.
  int64_t QueryOffset(int64_t b, int64_t t, int64_t h) const {
    const int64_t token = q_index[b * t_size + t];
    return token >= 0 && token < q_tokens ? (token * heads + h) * d_size : -1;
  }

  // Zeros the query tokens of an [N, H, D] output that no row position maps to (a token budget's unused ones).
  // The valid entries of q_index are distinct (a layout's map is a bijection), so when there are N of them every
  // token is mapped (the rows' own queries, a decode step): nothing to zero, nothing allocated.
  void ZeroUnmappedTokens(float* out) const {
    int64_t valid = 0;
    for (int64_t i = 0; i < batch * t_size; ++i) valid += q_index[i] >= 0 && q_index[i] < q_tokens;
    if (valid == q_tokens) return;
    std::vector<bool> mapped(q_tokens, false);
    for (int64_t i = 0; i < batch * t_size; ++i) {
      if (q_index[i] >= 0 && q_index[i] < q_tokens) mapped[q_index[i]] = true;
    }
    for (int64_t n = 0; n < q_tokens; ++n) {
      if (!mapped[n]) std::fill(out + n * heads * d_size, out + (n + 1) * heads * d_size, 0.0f);
    }
  }
};

// Takes items off work->next until `items` are taken, each through work->Item<D>(item) with D = the head size
// for SmolLM2's and Llama-3's (64, 128: the feature loops unroll), D = 0 otherwise; counts each one done.
template <typename Work>
void RunItems(Work& work, int64_t items) {
  for (int64_t item; (item = work.next.fetch_add(1, std::memory_order_relaxed)) < items;) {
    if (work.d_size == 64) {
      work.template Item<64>(item);
    } else if (work.d_size == 128) {
      work.template Item<128>(item);
    } else {
      work.template Item<0>(item);
    }
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// RunItems on the calling thread and on up to `items - 1` of the pool's threads; returns when all are done.
template <typename Work>
void RunOnPool(xla::ffi::ThreadPool& pool, std::shared_ptr<Work> work, int64_t items) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule([work, items] { RunItems(*work, items); });
  RunItems(*work, items);
  while (work->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// The FFI binding every attention handler starts with: the thread pool, then q, q_index, k, v and the mask.
inline auto BindAttentionArgs() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

}  // namespace rankrag_attention

#endif  // RANKRAG_JAX_MODEL_CPU_ATTENTION_H_
