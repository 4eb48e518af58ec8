// Attention of queries over a heads-major KV cache in f32 (a prompt prefill or a decode step), on XLA:CPU's
// intra-op thread pool: out[b, t, h] = softmax(q[b, t, h] . k[b, h / G, s] / sqrt(D), over visible s) v[b, h / G, s].
//
// Why (bench/README.md, session 16): XLA:CPU runs the cache attention as many small batched products with the
// mask, max, exp and sum between them as separate passes, at about a quarter of the machine's matmul rate, and a
// prompt's attention computes scores for every slot of a 64-query block. Here one pass per tile of 16 query rows
// computes the scores of the slots up to its last visible one, the softmax and the value product, with the tile's
// rows in the lanes of two vectors and both products in [6 x 16] register blocks (`MultiplyBlock`, session 19); a
// tile of at most 4 rows (a decode step's G query heads) takes each row's scores as dot products over the
// features instead (`FewRowsAttention`). Tiles are shared out over the threads.
//
// For training, the same pass also writes each row's softmax log-normaliser (`CachedAttentionWithStats`), which
// the backward pass (cpu_attention_grad.cc) takes instead of recomputing the forward.
//
// Built and registered by cpu_kernels.py (`jax.ffi`); compiled on first use with the host's C++ compiler.
#include <vector>

#include "cpu_attention.h"

namespace ffi = xla::ffi;

namespace {

using namespace rankrag_attention;

// A tile of R <= 4 rows (a decode step's G query heads of a kv head, G <= 4: SmolLM2, Llama-3-8B), D features:
// in a tile's 16 lanes, 12 or more would compute nothing, so here each row's score is a dot product over the
// features, and the value product holds R x W vectors of features. Reads the same keys and values, ~2x fewer
// instructions.
template <int64_t D, int R>
void FewRowsAttention(const float* const q_row[], float* const out_row[], float* const lse_row[],
                      const bool* const mask_row[], int64_t visible_end, const float* keys, const float* values) {
  constexpr int64_t kVecs = D / kLanes, W = R == 1 ? 8 : (R <= 3 ? 4 : 2);  // W feature vectors per pass
  static_assert(kVecs % W == 0, "feature vectors per pass must divide the head size");
  const int64_t padded = (visible_end + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<float> scores;  // [R, padded]
  scores.assign(R * padded, -INFINITY);
  alignas(32) float q[R][D];
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int m = 0; m < R; ++m) {
    for (int64_t d = 0; d < D; ++d) q[m][d] = q_row[m][d] * scale;
  }
  for (int64_t s = 0; s < visible_end; ++s) {
    const float* key = keys + s * D;
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(key + kLanes * D + d);  // 8 keys ahead
    Vec acc[R] = {};
    for (int64_t i = 0; i < kVecs; ++i) {
      const Vec kv = Load(key + i * kLanes);
      for (int m = 0; m < R; ++m) acc[m] += kv * Load(q[m] + i * kLanes);
    }
    for (int m = 0; m < R; ++m) {
      if (mask_row[m][s]) scores[m * padded + s] = Sum(acc[m]);
    }
  }
  float inverse[R];
  for (int m = 0; m < R; ++m) {
    float* row = scores.data() + m * padded;
    Vec row_max = Vec{} - INFINITY;
    for (int64_t s = 0; s < padded; s += kLanes) {
      const Vec x = Load(row + s);
      row_max = x > row_max ? x : row_max;
    }
    float max = -INFINITY;
    for (int64_t i = 0; i < kLanes; ++i) max = std::max(max, row_max[i]);
    max = max == -INFINITY ? 0.0f : max;  // a row that sees nothing: numerators 0
    Vec total = {};
    for (int64_t s = 0; s < padded; s += kLanes) {
      const Vec e = Exp(Load(row + s) - max);
      total += e;
      Store(row + s, e);
    }
    const float sum = Sum(total);
    inverse[m] = sum > 0 ? 1.0f / sum : 0.0f;
    if (lse_row) *lse_row[m] = sum > 0 ? max + std::log(sum) : 0.0f;
  }
  for (int64_t v0 = 0; v0 < kVecs; v0 += W) {
    Vec acc[R][W] = {};
    for (int64_t s = 0; s < visible_end; ++s) {
      const float* value = values + s * D + v0 * kLanes;
      if (v0 == 0) {
        for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(values + (s + kLanes) * D + d);
      }
      Vec vv[W];
      for (int w = 0; w < W; ++w) vv[w] = Load(value + w * kLanes);
      for (int m = 0; m < R; ++m) {
        const float p = scores[m * padded + s];
        for (int w = 0; w < W; ++w) acc[m][w] += p * vv[w];
      }
    }
    for (int m = 0; m < R; ++m) {
      for (int w = 0; w < W; ++w) Store(out_row[m] + (v0 + w) * kLanes, acc[m][w] * inverse[m]);
    }
  }
}

// A tile of up to 16 rows (two vectors of 8 lanes) over the window's `visible_end` slots: scores in [6 x 16]
// blocks, softmax, value product in [6 features x 16 rows] blocks. Lanes past `rows` repeat the last row.
template <int64_t kFeatures>
void TileAttention(const float* const q_row[], float* const out_row[], float* const lse_row[],
                   const bool* const mask_row[], int64_t rows, int64_t visible_end, const float* keys,
                   const float* values, int64_t d_size_in) {
  const int64_t d_size = kFeatures ? kFeatures : d_size_in;
  const int64_t slots = (visible_end + kSlotBlock - 1) / kSlotBlock * kSlotBlock;
  thread_local std::vector<float> qt, scores, tail, out_t;
  thread_local std::vector<uint8_t> seen;
  qt.resize(d_size * kTileRows);  // [D, 16]: the rows' queries, transposed, scaled by 1 / sqrt(D)
  scores.resize(slots * kTileRows);  // [S, 16]: the scores, then the softmax's numerators
  tail.assign(kSlotBlock * d_size, 0.0f);  // the last block's keys, zero past visible_end
  out_t.resize(d_size * kTileRows);  // [D, 16]: the rows' outputs, transposed
  seen.resize(slots + kLanes);  // 1 where all rows see the slot
  SeenByAll(mask_row, kTileRows, visible_end, slots + kLanes, seen.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_size));
  for (int64_t m = 0; m < kTileRows; ++m) {
    for (int64_t d = 0; d < d_size; ++d) qt[d * kTileRows + m] = q_row[m][d] * scale;
  }
  Vec max0 = Vec{} - INFINITY, max1 = max0;
  for (int64_t s0 = 0; s0 < slots; s0 += kSlotBlock) {
    const int64_t count = std::min(kSlotBlock, visible_end - s0);
    const float* block = keys + s0 * d_size;
    if (count < kSlotBlock) {
      std::copy(block, block + count * d_size, tail.data());
      block = tail.data();
    }
    Vec c0[kSlotBlock], c1[kSlotBlock];
    MultiplyBlock<kSlotBlock>(block, d_size, 1, qt.data(), kTileRows, d_size, c0, c1);
    float* out = scores.data() + s0 * kTileRows;
    for (int64_t j = 0; j < kSlotBlock; ++j) {
      Store(out + j * kTileRows, c0[j]);
      Store(out + j * kTileRows + kLanes, c1[j]);
    }
    if (!AllSeen<kSlotBlock>(seen.data(), s0)) {
      for (int64_t j = 0; j < kSlotBlock; ++j) {
        for (int64_t m = 0; m < kTileRows; ++m) {
          if (j >= count || !mask_row[m][s0 + j]) out[j * kTileRows + m] = -INFINITY;
        }
      }
    }
    for (int64_t j = 0; j < kSlotBlock; ++j) {
      const Vec a = Load(out + j * kTileRows), b = Load(out + j * kTileRows + kLanes);
      max0 = a > max0 ? a : max0;
      max1 = b > max1 ? b : max1;
    }
  }
  max0 = max0 == -INFINITY ? Vec{} : max0;  // a row that sees nothing: numerators 0
  max1 = max1 == -INFINITY ? Vec{} : max1;
  Vec total0 = {}, total1 = {};
  for (int64_t s = 0; s < slots; ++s) {
    float* row = scores.data() + s * kTileRows;
    const Vec e0 = Exp(Load(row) - max0), e1 = Exp(Load(row + kLanes) - max1);
    total0 += e0;
    total1 += e1;
    Store(row, e0);
    Store(row + kLanes, e1);
  }
  // Values: out_t[d] holds feature d of the 16 rows.
  WeightedRowSums(values, d_size, scores.data(), visible_end, out_t.data());
  for (int64_t m = 0; m < rows; ++m) {
    const float total = m < kLanes ? total0[m] : total1[m - kLanes];
    const float max = m < kLanes ? max0[m] : max1[m - kLanes];
    const float inverse = total > 0 ? 1.0f / total : 0.0f;
    for (int64_t d = 0; d < d_size; ++d) out_row[m][d] = out_t[d * kTileRows + m] * inverse;
    if (lse_row) *lse_row[m] = total > 0 ? max + std::log(total) : 0.0f;
  }
}

struct Work : AttentionInputs {
  float* out;
  float* lse = nullptr;  // [B, H, T] or none: log sum_s exp(score[s]) per query row
  std::atomic<int64_t> next{0}, done{0};

  // Item `tile` (RunItems): up to 16 consecutive rows r of kv head c's G * T query rows (r = g * T + t: query
  // head c * G + g at position t), so a decode step's G heads share a tile and a prompt's tiles are 16 positions
  // of one head.
  template <int64_t kFeatures>
  void Item(int64_t tile) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    const int64_t b = tile / (kv_heads * tiles_per_kv_head);
    const int64_t c = tile / tiles_per_kv_head % kv_heads;
    const int64_t r0 = tile % tiles_per_kv_head * kTileRows;
    const int64_t rows = std::min(kTileRows, group * t_size - r0);
    const float* q_row[kTileRows];
    float* out_row[kTileRows];
    float* lse_row[kTileRows];
    const bool* mask_row[kTileRows];
    std::vector<float> no_query;  // a padding position's query (zeros) and output, made only if one is in the tile
    int64_t visible_end = 0;  // past the last slot any of the tile's rows sees
    for (int64_t m = 0; m < kTileRows; ++m) {
      // Lanes past `rows` repeat the last row (never written out): no lane needs a special case below.
      const int64_t g = (r0 + std::min(m, rows - 1)) / t_size, t = (r0 + std::min(m, rows - 1)) % t_size;
      const int64_t offset = QueryOffset(b, t, c * group + g);
      if (offset < 0 && no_query.empty()) no_query.assign(2 * d_size, 0.0f);
      q_row[m] = offset >= 0 ? q + offset : no_query.data();
      out_row[m] = offset >= 0 ? out + offset : no_query.data() + d_size;
      lse_row[m] = lse ? lse + (b * heads + c * group + g) * t_size + t : nullptr;
      mask_row[m] = mask + (b * t_size + t) * s_size;
      if (m < rows) visible_end = VisibleEnd(mask_row[m], s_size, visible_end);
    }
    if (visible_end == 0) {  // padding rows see nothing: zeros (XLA's softmax would average every slot).
      for (int64_t m = 0; m < rows; ++m) {
        std::fill(out_row[m], out_row[m] + d_size, 0.0f);
        if (lse) *lse_row[m] = 0.0f;
      }
      return;
    }
    // From here on the tile sees the window [begin, visible_end) of the slots: the slots before the first one any
    // row sees (the earlier examples of a packed training row) are skipped.
    const int64_t begin = WindowBegin(mask_row, rows, visible_end);
    for (int64_t m = 0; m < kTileRows; ++m) mask_row[m] += begin;
    visible_end -= begin;
    const float* keys = k + ((b * kv_heads + c) * s_size + begin) * d_size;
    const float* values = v + ((b * kv_heads + c) * s_size + begin) * d_size;
    float* const* stats = lse ? lse_row : nullptr;
    if constexpr (kFeatures != 0) {
      switch (rows) {
        case 1: return FewRowsAttention<kFeatures, 1>(q_row, out_row, stats, mask_row, visible_end, keys, values);
        case 2: return FewRowsAttention<kFeatures, 2>(q_row, out_row, stats, mask_row, visible_end, keys, values);
        case 3: return FewRowsAttention<kFeatures, 3>(q_row, out_row, stats, mask_row, visible_end, keys, values);
        case 4: return FewRowsAttention<kFeatures, 4>(q_row, out_row, stats, mask_row, visible_end, keys, values);
      }
    }
    TileAttention<kFeatures>(q_row, out_row, stats, mask_row, rows, visible_end, keys, values, d_size);
  }
};

ffi::Error Attention(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::S32>& q_index,
                     ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& mask, float* out,
                     float* lse) {
  auto work = std::make_shared<Work>();
  if (!work->Set(q, q_index, k, v, mask)) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: expected q [N, H, D], q_index [B, T], k and v [B, Kh, S, D], mask [B, T, S], H % Kh == 0, "
        "D % 8 == 0");
  }
  work->out = out;
  work->lse = lse;
  work->ZeroUnmappedTokens(out);
  const int64_t tiles = work->batch * work->kv_heads * work->tiles_per_kv_head;
  RunOnPool(pool, work, tiles);
  return ffi::Error::Success();
}

ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_index,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> out) {
  return Attention(pool, q, q_index, k, v, mask, out->typed_data(), nullptr);
}

ffi::Error CachedAttentionWithStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_index,
                                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions();
  auto id = q_index.dimensions();
  auto ld = lse->dimensions();
  if (qd.size() != 3 || id.size() != 2 || ld.size() != 3 || ld[0] != id[0] || ld[1] != qd[1] || ld[2] != id[1]) {
    return ffi::Error::InvalidArgument("cpu_attention: expected q [N, H, D], q_index [B, T] and lse [B, H, T]");
  }
  return Attention(pool, q, q_index, k, v, mask, out->typed_data(), lse->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttentionHandler, CachedAttention,
                              rankrag_attention::BindAttentionArgs().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttentionWithStatsHandler, CachedAttentionWithStats,
                              rankrag_attention::BindAttentionArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse
