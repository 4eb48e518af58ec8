// The backward pass of cpu_attention.cc's attention for training, in f32 on XLA:CPU's intra-op thread pool: given
// q [B, T, H, D], heads-major k, v [B, Kh, S, D], mask [B, T, S], the forward's out [B, T, H, D] and its rows'
// log-normalisers lse [B, H, T], and d_out, it writes dq [B, T, H, D] and dk, dv [P, B, Kh, S, D] (P partial sums,
// added up by the caller).
//
// Why (bench/README.md, session 18): XLA:CPU runs training attention's small batched products on one core at
// ~40% of the machine's matmul rate, with the mask, exp and softmax gradient as separate passes over [64, S]
// blocks. Here, as in the forward kernel, one tile of 8 query rows (8 positions of one query head) sits in the 8
// lanes of a vector: the tile recomputes its probabilities P = exp(q.k / sqrt(D) - lse) over the slots up to its
// last visible one, the score gradients dS = P (dO.v - dO.out), and adds its share to dq (its own rows), dk and
// dv. Work item (b, kv head, part p) takes every P-th tile of that kv head's G x T rows, so its dk and dv sums
// are its own (no two threads add into the same rows) and the causal work is spread evenly over the parts.
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
      Tile<kFeatures>(b, c, tile * kLanes, k + kv_offset, v + kv_offset, dk_sum, dv_sum);
    }
  }

  // sums[s] += sum_m weights[s, m] rows[m] for s < slots: weights [slots, 8], rows [8, D], sums [slots, D]. Eight
  // features at a time, the 8 rows' features held in registers; two slots at a time (independent chains).
  template <int64_t kFeatures>
  void AddRowSums(const float* weights, const float* rows, int64_t slots, float* sums) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    for (int64_t d0 = 0; d0 < d_size; d0 += kLanes) {
      Vec row[kLanes];
      for (int64_t m = 0; m < kLanes; ++m) row[m] = Load(rows + m * d_size + d0);
      int64_t s = 0;
      for (; s + 1 < slots; s += 2) {
        const float *w0 = weights + s * kLanes, *w1 = w0 + kLanes;
        Vec a = Load(sums + s * d_size + d0), b = Load(sums + (s + 1) * d_size + d0);
        for (int64_t m = 0; m < kLanes; ++m) {
          a += w0[m] * row[m];
          b += w1[m] * row[m];
        }
        Store(sums + s * d_size + d0, a);
        Store(sums + (s + 1) * d_size + d0, b);
      }
      if (s < slots) {
        Vec a = Load(sums + s * d_size + d0);
        for (int64_t m = 0; m < kLanes; ++m) a += weights[s * kLanes + m] * row[m];
        Store(sums + s * d_size + d0, a);
      }
    }
  }

  // Rows r0 .. r0 + 7 of kv head c's G x T query rows (r = g * T + t: query head c * G + g at position t).
  template <int64_t kFeatures>
  void Tile(int64_t b, int64_t c, int64_t r0, const float* keys, const float* values, float* dk_sum,
            float* dv_sum) {
    const int64_t d_size = kFeatures ? kFeatures : this->d_size;
    const int64_t rows = std::min(kLanes, group * t_size - r0);
    const bool* mask_row[kLanes];
    float* dq_row[kLanes];
    thread_local std::vector<float> q_rows, q_t, d_out_rows, d_out_t, probs, d_scores, zeros;
    q_rows.resize(kLanes * d_size);  // [8, D] the rows' queries scaled by 1 / sqrt(D), for dk
    q_t.resize(d_size * kLanes);  // [D, 8] the same, transposed, for the scores
    d_out_rows.resize(kLanes * d_size);  // [8, D] the rows' d_out, for dv
    d_out_t.resize(d_size * kLanes);  // [D, 8] the same, transposed, for dP = dO . v
    zeros.assign(d_size, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d_size));
    Vec lse_rows = {}, delta = {};
    int64_t visible_end = 0;  // past the last slot any of the tile's rows sees
    for (int64_t m = 0; m < kLanes; ++m) {
      // Lanes past `rows` repeat the last row's queries and mask with d_out = 0: they add nothing to dk or dv.
      const int64_t r = r0 + std::min(m, rows - 1), g = r / t_size, t = r % t_size;
      const int64_t offset = ((b * t_size + t) * heads + c * group + g) * d_size;
      mask_row[m] = mask + (b * t_size + t) * s_size;
      dq_row[m] = dq + offset;
      lse_rows[m] = lse[(b * heads + c * group + g) * t_size + t];
      float dot_out = 0.0f;
      for (int64_t d = 0; d < d_size; ++d) {
        const float dout = m < rows ? d_out[offset + d] : 0.0f;
        q_rows[m * d_size + d] = q_t[d * kLanes + m] = q[offset + d] * scale;
        d_out_rows[m * d_size + d] = d_out_t[d * kLanes + m] = dout;
        dot_out += dout * out[offset + d];
      }
      delta[m] = dot_out;  // sum_s P[s] dP[s] = dO . out, since out = P v
      visible_end = VisibleEnd(mask_row[m], s_size, visible_end);
    }
    // The window [begin, visible_end) of the slots, as in the forward pass: the earlier examples of a packed row
    // are skipped.
    const int64_t begin = WindowBegin(mask_row, visible_end);
    for (int64_t m = 0; m < kLanes; ++m) mask_row[m] += begin;
    visible_end -= begin;
    keys += begin * d_size;
    values += begin * d_size;
    dk_sum += begin * d_size;
    dv_sum += begin * d_size;
    const int64_t blocks = (visible_end + kLanes - 1) / kLanes;
    probs.assign(blocks * kLanes * kLanes, 0.0f);  // [S, 8]
    d_scores.assign(blocks * kLanes * kLanes, 0.0f);  // [S, 8], dS without the 1 / sqrt(D)
    for (int64_t s0 = 0; s0 < visible_end; s0 += kLanes) {
      const float *key[kLanes], *value[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) {
        const bool in = s0 + j < visible_end;
        key[j] = in ? keys + (s0 + j) * d_size : zeros.data();
        value[j] = in ? values + (s0 + j) * d_size : zeros.data();
      }
      Vec score[kLanes] = {}, d_prob[kLanes] = {};
      for (int64_t d = 0; d < d_size; ++d) {
        const Vec qv = Load(q_t.data() + d * kLanes);
        for (int64_t j = 0; j < kLanes; ++j) score[j] += key[j][d] * qv;
      }
      for (int64_t d = 0; d < d_size; ++d) {
        const Vec dov = Load(d_out_t.data() + d * kLanes);
        for (int64_t j = 0; j < kLanes; ++j) d_prob[j] += value[j][d] * dov;
      }
      const bool all_visible = AllVisible(mask_row, s0, visible_end);
      for (int64_t j = 0; j < kLanes; ++j) {
        Vec prob = Exp(score[j] - lse_rows);
        if (!all_visible) {
          for (int64_t m = 0; m < kLanes; ++m) {
            if (s0 + j >= visible_end || !mask_row[m][s0 + j]) prob[m] = 0.0f;
          }
        }
        Store(probs.data() + (s0 + j) * kLanes, prob);
        Store(d_scores.data() + (s0 + j) * kLanes, prob * (d_prob[j] - delta));
      }
    }
    // dq[m] = sum_s dS[s, m] k[s] / sqrt(D), 8 features at a time.
    for (int64_t d0 = 0; d0 < d_size; d0 += kLanes) {
      Vec acc[kLanes] = {};
      for (int64_t s = 0; s < visible_end; ++s) {
        const Vec kv = Load(keys + s * d_size + d0);
        const float* ds = d_scores.data() + s * kLanes;
        for (int64_t m = 0; m < kLanes; ++m) acc[m] += ds[m] * kv;
      }
      for (int64_t m = 0; m < rows; ++m) Store(dq_row[m] + d0, acc[m] * scale);
    }
    // dv[s] += sum_m P[s, m] dO[m] and dk[s] += sum_m dS[s, m] q[m] / sqrt(D).
    AddRowSums<kFeatures>(probs.data(), d_out_rows.data(), visible_end, dv_sum);
    AddRowSums<kFeatures>(d_scores.data(), q_rows.data(), visible_end, dk_sum);
  }
};

ffi::Error CachedAttentionGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                               ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                               ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                               ffi::ResultBuffer<ffi::F32> dv) {
  auto work = std::make_shared<GradWork>();
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto ld = lse.dimensions();
  auto pd = dk->dimensions();
  const bool same_as_q = std::equal(qd.begin(), qd.end(), out.dimensions().begin()) &&
                         std::equal(qd.begin(), qd.end(), d_out.dimensions().begin());
  if (!work->Set(q, k, v, mask) || ld.size() != 3 || pd.size() != 5 || !same_as_q || ld[0] != qd[0] ||
      ld[1] != qd[2] || ld[2] != qd[1] || !std::equal(kd.begin(), kd.end(), pd.begin() + 1)) {
    return ffi::Error::InvalidArgument(
        "cpu_attention_grad: expected q, out, d_out [B, T, H, D], k and v [B, Kh, S, D], mask [B, T, S], lse "
        "[B, H, T], dk and dv [P, B, Kh, S, D], H % Kh == 0, D % 8 == 0");
  }
  work->out = out.typed_data();
  work->lse = lse.typed_data();
  work->d_out = d_out.typed_data();
  work->dq = dq->typed_data();
  work->dk = dk->typed_data();
  work->dv = dv->typed_data();
  work->parts = pd[0];
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
