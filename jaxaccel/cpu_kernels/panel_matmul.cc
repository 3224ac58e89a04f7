// y[M, N] = x[M, K] @ w, for a few rows M, with w packed as 16-column panels [N/16, K, 16].
//
// Why: a decode or tree-verify step multiplies 1-16 rows by every weight of the model, so it is
// bound by reading the weights once. XLA:CPU's library GEMM re-packs the weight for every call of
// 2+ rows (a second pass over it), and a [K, N] weight read one 16-column block at a time is a
// strided walk. Packed panels are one contiguous stream each (prefetched ahead); a panel is read
// once from memory while up to 6 rows accumulate in registers, and from L1 for further rows.
// Each row's sum runs over k in the same order however many rows come with it, so a row's result
// does not depend on M (a token's logits in a tree verify equal its logits in an AR step).
// AVX2 + FMA; the panels are shared out in chunks between XLA's threads (parallel.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

constexpr int64_t kPanel = 16;  // columns per panel: two 8-float AVX registers
constexpr int kRows = 6;        // rows per block: 12 accumulators + 2 weight registers + 1 broadcast
constexpr int64_t kPrefetch = 512; // floats ahead (2 KB): the stream's next lines, past the panel's end too
constexpr int64_t kChunk = 128; // k per chunk when several blocks share a panel (8 KB of it, in L1)

// Rows [R] x the panel's 16 columns over k in [k0, k1), accumulating into y (zeros when k0 == 0).
// Storing and reloading an accumulator is exact, so chunking k does not change any sum.
template <int R>
static void panel_rows(const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, int64_t N, float* y) {
  __m256 acc[R][2];  // the unroll pragmas keep these in registers (without them GCC spills every k)
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    acc[r][0] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * N);
    acc[r][1] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * N + 8);
  }
  panel += k0 * kPanel;
  for (int64_t k = k0; k < k1; ++k, panel += kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + kPrefetch), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel), w1 = _mm256_loadu_ps(panel + 8);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 xk = _mm256_broadcast_ss(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xk, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xk, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * N, acc[r][0]);
    _mm256_storeu_ps(y + r * N + 8, acc[r][1]);
  }
}

static void block_rows(int rows, const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, int64_t N,
                       float* y) {
  switch (rows) {
    case 6: panel_rows<6>(x, K, k0, k1, panel, N, y); break;
    case 5: panel_rows<5>(x, K, k0, k1, panel, N, y); break;
    case 4: panel_rows<4>(x, K, k0, k1, panel, N, y); break;
    case 3: panel_rows<3>(x, K, k0, k1, panel, N, y); break;
    case 2: panel_rows<2>(x, K, k0, k1, panel, N, y); break;
    case 1: panel_rows<1>(x, K, k0, k1, panel, N, y); break;
    default: break;
  }
}

// All M rows against one panel. Several blocks (M > 6) take turns chunk by chunk, so the panel is
// read from memory once and its reading overlaps all of their arithmetic; the blocks are of even
// size (8 rows: 4 + 4, not 6 + 2), since a block of few rows waits on its FMAs' latency.
static void panel_all_rows(const float* x, int64_t M, int64_t K, const float* panel, int64_t N, float* y) {
  const int64_t blocks = (M + kRows - 1) / kRows;
  if (blocks <= 1) return block_rows(static_cast<int>(M), x, K, 0, K, panel, N, y);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = k0 + kChunk < K ? k0 + kChunk : K;
    for (int64_t b = 0, m = 0; b < blocks; ++b) {
      const int64_t rows = (M - m) / (blocks - b);  // the remaining rows spread evenly
      block_rows(static_cast<int>(rows), x + m * K, K, k0, k1, panel, N, y + m * N);
      m += rows;
    }
  }
}

static ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto w_dims = w.dimensions();
  if (w_dims.size() != 3 || w_dims[2] != kPanel) return ffi::Error::InvalidArgument("weight is not [N/16, K, 16]");
  const int64_t panels = w_dims[0], K = w_dims[1], N = panels * kPanel;
  const auto x_dims = x.dimensions();
  if (x_dims.size() == 0 || x_dims[x_dims.size() - 1] != K) return ffi::Error::InvalidArgument("x's last axis is not K");
  const int64_t M = static_cast<int64_t>(x.element_count()) / K;
  if (static_cast<int64_t>(y->element_count()) != M * N) return ffi::Error::InvalidArgument("y is not [M, N]");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // About four chunks a thread, so that a thread slowed by other work hands its share to the rest.
  const int64_t chunk = std::max<int64_t>(1, panels / (4 * pool.num_threads()));
  jaxaccel::parallel_for(pool, (panels + chunk - 1) / chunk, [&](int64_t c) {
    for (int64_t p = c * chunk; p < panels && p < (c + 1) * chunk; ++p)
      panel_all_rows(xp, M, K, wp + p * K * kPanel, N, yp + p * kPanel);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxaccel_panel_matmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
