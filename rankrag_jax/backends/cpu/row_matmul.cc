// out[M, N] = x[M, K] @ w[K, N] in f32 for few rows M (decode steps), on XLA:CPU's intra-op thread pool.
//
// Why (bench/README.md, session 15): XLA:CPU runs a decode step's [8, d] x [d, f] products on one thread (Eigen),
// streaming the weights at about half the machine's read bandwidth. Here every thread streams its own share of
// the weights, which are stored in 8-column panels ([N / 8, K, 8], made once by row_matmul.to_panels) so that each
// thread reads contiguous memory: a strided [K, N] read misses the TLB at every row.
//
// Built and registered by cpu_kernels.py (`jax.ffi`); compiled on first use with the host's C++ compiler.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;  // columns per panel = f32 lanes of one 256-bit vector.
typedef float Vec __attribute__((vector_size(32), aligned(4)));

// Rows [8g, 8g + 8) of out at panel p's 8 columns. xt: the 8 rows transposed, [K, 8] (rows past M are zero).
void PanelTimesRows(const float* xt, const float* panel, int64_t k_size, float* out, int64_t n_size,
                    int64_t rows) {
  Vec acc[kLanes] = {};
  const float* w = panel;
  for (int64_t k = 0; k < k_size; ++k, w += kLanes, xt += kLanes) {
    // 8 KiB ahead: the hardware prefetcher alone leaves the stream latency-bound; 1 KiB ahead streamed ~10% slower
    // (bench/README.md, session 17).
    __builtin_prefetch(w + 2048);
    Vec wv = *reinterpret_cast<const Vec*>(w);
    for (int m = 0; m < kLanes; ++m) acc[m] += xt[m] * wv;
  }
  for (int64_t m = 0; m < rows; ++m) *reinterpret_cast<Vec*>(out + m * n_size) = acc[m];
}

// One call's work, shared by the calling thread and the pool's: chunks of panels, taken in order until none is
// left. Shared-owned, since a pool task may start after the call has already done every chunk itself.
struct Work {
  std::vector<float> xt;  // [ceil(M / 8), K, 8]
  const float* panels;
  float* out;
  int64_t m_size, k_size, n_size, panels_per_chunk, num_chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      int64_t end = std::min(n_size / kLanes, (c + 1) * panels_per_chunk);
      for (int64_t p = c * panels_per_chunk; p < end; ++p) {
        for (int64_t g = 0; g * kLanes < m_size; ++g) {
          PanelTimesRows(xt.data() + g * k_size * kLanes, panels + p * k_size * kLanes, k_size,
                         out + g * kLanes * n_size + p * kLanes, n_size, std::min(kLanes, m_size - g * kLanes));
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = panels.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kLanes || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("row_matmul: expected x [M, K] and panels [N / 8, K, 8]");
  }
  auto work = std::make_shared<Work>();
  work->m_size = xd[0];
  work->k_size = xd[1];
  work->n_size = wd[0] * kLanes;
  work->panels = panels.typed_data();
  work->out = out->typed_data();
  const int64_t groups = (work->m_size + kLanes - 1) / kLanes;
  work->xt.assign(groups * work->k_size * kLanes, 0.0f);
  for (int64_t m = 0; m < work->m_size; ++m) {
    float* dst = work->xt.data() + (m / kLanes) * work->k_size * kLanes + m % kLanes;
    for (int64_t k = 0; k < work->k_size; ++k) dst[k * kLanes] = x.typed_data()[m * work->k_size + k];
  }
  // A few chunks per thread, so that a thread that starts late still finds work.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t num_panels = wd[0];
  work->panels_per_chunk = std::max<int64_t>(1, num_panels / (4 * threads));
  work->num_chunks = (num_panels + work->panels_per_chunk - 1) / work->panels_per_chunk;
  for (int64_t t = 1; t < std::min(threads, work->num_chunks); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowMatmulHandler, RowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
