// The backward pass of cpu_attention.cc's attention for training, in f32 on XLA:CPU's intra-op thread pool: given
// q [N, H, D] with q_index [B, T] (cpu_attention.h's AttentionInputs), heads-major k, v [B, Kh, S, D], mask
// [B, T, S], the forward's out [N, H, D] and its rows' log-normalisers lse [B, H, T], and d_out, it writes dq
// [N, H, D] and dk, dv [P, B, Kh, S, D] (P partial sums, added up by the caller).
//
// Why (bench/README.md, session 18): XLA:CPU runs training attention's small batched products on one core at
// ~40% of the machine's matmul rate, with the mask, exp and softmax gradient as separate passes over [64, S]
// blocks. Here, as in the forward kernel, one tile of 16 query rows (16 positions of one query head) sits in the
// lanes of two vectors, every product in [6 x 16] register blocks (`MultiplyBlock`, sessions 18-19): the tile
// recomputes its probabilities P = exp(q.k / sqrt(D) - lse) over the slots up to its last visible one, the score
// gradients dS = P (dO.v - dO.out), and adds its share to dq (its own rows), dk and dv. Work item (b, kv head,
// part p) takes every P-th tile of that kv head's G x T rows, so its dk and dv sums are its own (no two threads
// add into the same rows) and the causal work is spread evenly over the parts.
//
// Built and registered by cpu_kernels.py (`jax.ffi`); compiled on first use with the host's C++ compiler.
#include <vector>

#include "cpu_attention.h"

namespace ffi = xla::ffi;

namespace {

using namespace rankrag_attention;

struct GradWork : AttentionInputs {
  const float *out, *d_out, *lse;
  float *dq, *dk, *dv;
  int64_t parts;
  std::atomic<int64_t> next{0}, done{0};

  // Item (p, b, c) (RunItems): kv head c of row b, tiles p, p + P, ...; its dk / dv partial sums are [p, b, c].
  template <int64_t kFeatures>
  void Item(int64_t item) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    const int64_t p = item / (batch * kv_heads), b = item / kv_heads % batch, c = item % kv_heads;
    const int64_t kv_offset = (b * kv_heads + c) * s_size * d_size;
    float* dk_sum = dk + p * batch * kv_heads * s_size * d_size + kv_offset;
    float* dv_sum = dv + p * batch * kv_heads * s_size * d_size + kv_offset;
    std::fill(dk_sum, dk_sum + s_size * d_size, 0.0f);
    std::fill(dv_sum, dv_sum + s_size * d_size, 0.0f);
    for (int64_t tile = p; tile < tiles_per_kv_head; tile += parts) {
      Tile<kFeatures>(b, c, tile * kTileRows, k + kv_offset, v + kv_offset, dk_sum, dv_sum);
    }
  }

  // sums[s] += sum_m weights[s, m] rows[m] for s < slots: weights [slots (rounded up to 6), 16], rows [16, D]
  // (8 floats of padding after them), sums [slots, D]; [6 slots x 16 features] blocks.
  template <int64_t kFeatures>
  void AddRowSums(const float* weights, const float* rows, int64_t slots, float* sums) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    for (int64_t s0 = 0; s0 < slots; s0 += kSlotBlock) {
      const int64_t count = std::min(kSlotBlock, slots - s0);
      for (int64_t d0 = 0; d0 < d_size; d0 += 2 * kLanes) {
        Vec c0[kSlotBlock], c1[kSlotBlock];
        const bool two = d0 + kLanes < d_size;  // else D % 16 == 8: one vector of features left
        MultiplyBlock<kSlotBlock>(weights + s0 * kTileRows, kTileRows, 1, rows + d0, d_size, kTileRows, c0, c1);
        for (int64_t j = 0; j < count; ++j) {
          float* sum = sums + (s0 + j) * d_size + d0;
          Store(sum, Load(sum) + c0[j]);
          if (two) Store(sum + kLanes, Load(sum + kLanes) + c1[j]);
        }
      }
    }
  }

  // Rows r0 .. r0 + 15 of kv head c's G x T query rows (r = g * T + t: query head c * G + g at position t).
  template <int64_t kFeatures>
  void Tile(int64_t b, int64_t c, int64_t r0, const float* keys, const float* values, float* dk_sum,
            float* dv_sum) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    const int64_t rows = std::min(kTileRows, group * t_size - r0);
    const bool* mask_row[kTileRows];
    float* dq_row[kTileRows];
    thread_local std::vector<float> q_rows, q_t, d_out_rows, d_out_t, probs, d_scores, tail_keys, tail_values, dq_t;
    thread_local std::vector<uint8_t> seen;
    q_rows.resize(kTileRows * d_size + kLanes);  // [16, D] the rows' queries scaled by 1 / sqrt(D), for dk
    q_t.resize(d_size * kTileRows);  // [D, 16] the same, transposed, for the scores
    d_out_rows.resize(kTileRows * d_size + kLanes);  // [16, D] the rows' d_out, for dv
    d_out_t.resize(d_size * kTileRows);  // [D, 16] the same, transposed, for dP = dO . v
    dq_t.resize(d_size * kTileRows);  // [D, 16] dq, transposed
    const float scale = 1.0f / std::sqrt(static_cast<float>(d_size));
    float lse_rows[kTileRows], delta[kTileRows];
    int64_t visible_end = 0;  // past the last slot any of the tile's rows sees
    std::vector<float> discarded;  // a padding position's dq, made only if one is in the tile
    for (int64_t m = 0; m < kTileRows; ++m) {
      // Lanes past `rows` repeat the last row's queries and mask with d_out = 0: they add nothing to dk or dv; so
      // do padding positions (no query: zeros).
      const int64_t r = r0 + std::min(m, rows - 1), g = r / t_size, t = r % t_size;
      const int64_t offset = QueryOffset(b, t, c * group + g);
      mask_row[m] = mask + (b * t_size + t) * s_size;
      if (offset < 0 && discarded.empty()) discarded.resize(d_size);
      dq_row[m] = offset >= 0 ? dq + offset : discarded.data();
      lse_rows[m] = lse[(b * heads + c * group + g) * t_size + t];
      Vec dot_out = {};
      for (int64_t d = 0; d < d_size; d += kLanes) {
        const bool query = m < rows && offset >= 0;
        const Vec dout = query ? Load(d_out + offset + d) : Vec{};
        Store(q_rows.data() + m * d_size + d, offset >= 0 ? Load(q + offset + d) * scale : Vec{});
        Store(d_out_rows.data() + m * d_size + d, dout);
        if (query) dot_out += dout * Load(out + offset + d);
      }
      delta[m] = Sum(dot_out);  // sum_s P[s] dP[s] = dO . out, since out = P v
      visible_end = VisibleEnd(mask_row[m], s_size, visible_end);
    }
    for (int64_t d = 0; d < d_size; ++d) {
      for (int64_t m = 0; m < kTileRows; ++m) {
        q_t[d * kTileRows + m] = q_rows[m * d_size + d];
        d_out_t[d * kTileRows + m] = d_out_rows[m * d_size + d];
      }
    }
    // The window [begin, visible_end) of the slots, as in the forward pass: the earlier examples of a packed row
    // are skipped.
    const int64_t begin = WindowBegin(mask_row, kTileRows, visible_end);
    for (int64_t m = 0; m < kTileRows; ++m) mask_row[m] += begin;
    visible_end -= begin;
    keys += begin * d_size;
    values += begin * d_size;
    dk_sum += begin * d_size;
    dv_sum += begin * d_size;
    const int64_t slots = (visible_end + kSlotBlock - 1) / kSlotBlock * kSlotBlock;
    probs.resize(slots * kTileRows);  // [S, 16]
    d_scores.resize(slots * kTileRows);  // [S, 16], dS without the 1 / sqrt(D)
    tail_keys.assign(kSlotBlock * d_size, 0.0f);  // the last block's keys and values, zero past visible_end
    tail_values.assign(kSlotBlock * d_size, 0.0f);
    seen.resize(slots + kLanes);  // 1 where all rows see the slot
    SeenByAll(mask_row, kTileRows, visible_end, slots + kLanes, seen.data());
    Vec lse0, lse1, delta0, delta1;
    std::memcpy(&lse0, lse_rows, sizeof(Vec));
    std::memcpy(&lse1, lse_rows + kLanes, sizeof(Vec));
    std::memcpy(&delta0, delta, sizeof(Vec));
    std::memcpy(&delta1, delta + kLanes, sizeof(Vec));
    for (int64_t s0 = 0; s0 < slots; s0 += kSlotBlock) {
      const int64_t count = std::min(kSlotBlock, visible_end - s0);
      const float *key = keys + s0 * d_size, *value = values + s0 * d_size;
      if (count < kSlotBlock) {
        std::copy(key, key + count * d_size, tail_keys.data());
        std::copy(value, value + count * d_size, tail_values.data());
        key = tail_keys.data();
        value = tail_values.data();
      }
      Vec score0[kSlotBlock], score1[kSlotBlock], d_prob0[kSlotBlock], d_prob1[kSlotBlock];
      MultiplyBlock<kSlotBlock>(key, d_size, 1, q_t.data(), kTileRows, d_size, score0, score1);
      MultiplyBlock<kSlotBlock>(value, d_size, 1, d_out_t.data(), kTileRows, d_size, d_prob0, d_prob1);
      float* prob = probs.data() + s0 * kTileRows;
      float* d_score = d_scores.data() + s0 * kTileRows;
      for (int64_t j = 0; j < kSlotBlock; ++j) {
        const Vec p0 = Exp(score0[j] - lse0), p1 = Exp(score1[j] - lse1);
        Store(prob + j * kTileRows, p0);
        Store(prob + j * kTileRows + kLanes, p1);
      }
      if (!AllSeen<kSlotBlock>(seen.data(), s0)) {
        for (int64_t j = 0; j < kSlotBlock; ++j) {
          for (int64_t m = 0; m < kTileRows; ++m) {
            if (j >= count || !mask_row[m][s0 + j]) prob[j * kTileRows + m] = 0.0f;
          }
        }
      }
      for (int64_t j = 0; j < kSlotBlock; ++j) {
        Store(d_score + j * kTileRows, Load(prob + j * kTileRows) * (d_prob0[j] - delta0));
        Store(d_score + j * kTileRows + kLanes, Load(prob + j * kTileRows + kLanes) * (d_prob1[j] - delta1));
      }
    }
    // dq[m] = sum_s dS[s, m] k[s] / sqrt(D).
    WeightedRowSums(keys, d_size, d_scores.data(), visible_end, dq_t.data());
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t d = 0; d < d_size; ++d) dq_row[m][d] = dq_t[d * kTileRows + m] * scale;
    }
    // dv[s] += sum_m P[s, m] dO[m] and dk[s] += sum_m dS[s, m] q[m] / sqrt(D).
    AddRowSums<kFeatures>(probs.data(), d_out_rows.data(), visible_end, dv_sum);
    AddRowSums<kFeatures>(d_scores.data(), q_rows.data(), visible_end, dk_sum);
  }
};

ffi::Error CachedAttentionGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_index,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                               ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                               ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                               ffi::ResultBuffer<ffi::F32> dv) {
  auto work = std::make_shared<GradWork>();
  auto qd = q.dimensions();
  auto id = q_index.dimensions();
  auto kd = k.dimensions();
  auto ld = lse.dimensions();
  auto pd = dk->dimensions();
  const bool same_as_q = std::equal(qd.begin(), qd.end(), out.dimensions().begin()) &&
                         std::equal(qd.begin(), qd.end(), d_out.dimensions().begin());
  if (!work->Set(q, q_index, k, v, mask) || ld.size() != 3 || pd.size() != 5 || !same_as_q || ld[0] != id[0] ||
      ld[1] != qd[1] || ld[2] != id[1] || !std::equal(kd.begin(), kd.end(), pd.begin() + 1)) {
    return ffi::Error::InvalidArgument(
        "cpu_attention_grad: expected q, out, d_out [N, H, D], q_index [B, T], k and v [B, Kh, S, D], mask "
        "[B, T, S], lse [B, H, T], dk and dv [P, B, Kh, S, D], H % Kh == 0, D % 8 == 0");
  }
  work->out = out.typed_data();
  work->lse = lse.typed_data();
  work->d_out = d_out.typed_data();
  work->dq = dq->typed_data();
  work->dk = dk->typed_data();
  work->dv = dv->typed_data();
  work->parts = pd[0];
  work->ZeroUnmappedTokens(work->dq);
  const int64_t items = work->parts * work->batch * work->kv_heads;
  RunOnPool(pool, work, items);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttentionGradHandler, CachedAttentionGrad,
                              rankrag_attention::BindAttentionArgs()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // out
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()    // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk partial sums
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv partial sums
