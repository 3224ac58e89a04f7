// out[B, n, Hq, D] = softmax(q k^T / sqrt(D), keys masked by visible[B, n, T]) v, with GQA
// (Hq = g * Hkv), for a few queries per row (a decode step, a tree verification) over a KV cache
// k, v [B, T, Hkv, D] read where it lies.
//
// Why: XLA:CPU computes a decode step's attention as batched dots over the whole cache, after
// copying K and V into heads-major order, for every layer and step: at SmolLM2's scale that costs
// as much as the weights' reading at a few thousand cached tokens. Here a task (a row, a KV head,
// up to 4 queries) walks the keys its queries see in blocks that stay in L1 while all of its
// queries' g heads use them: K and V are read where they lie, once per task.
//
// Each query's result depends only on the keys it sees, in slot order: scores, their exponentials
// and sums are laid out by rank among the visible keys, so a token scored in a tree verification
// gets the same bits as in an AR step (its ancestors sit in other slots, but in the same order).
// A query that sees no key gets the mean of all values, as a softmax over all-masked scores does.
// AVX2 + FMA; the tasks are shared out between XLA's threads (parallel.h).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// exp(x) for x <= 0, 8 lanes: 2^round(x log2 e) * a degree-6 polynomial of the remainder (about
// 1 ulp); 0 below -87 (where float32's exp underflows anyway).
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

static inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  float s = horizontal_sum(_mm256_add_ps(acc0, acc1));
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// Scores of query q against 8 keys (fewer when left < 8: the rest repeat the first) -> out[0..8):
// eight dot products over D (a multiple of 8) summed across lanes together, the same way for each.
static inline void scores8(const float* q, const float* k, const int64_t* keys, int64_t left, int64_t Hkv, int64_t h,
                           int64_t D, float scale, float* out) {
  const float* key[8];
  for (int u = 0; u < 8; ++u) key[u] = k + (keys[u < left ? u : 0] * Hkv + h) * D;
  __m256 acc[8];
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(key[u] + d), acc[u]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

constexpr int64_t kQueries = 4;  // queries per task: they share each key block's reading
constexpr int64_t kKeys = 32;    // keys per block: 8 KB of K or V at D = 64, read once into L1 per task

// Queries [i0, i1) of one row against the keys of KV head h, for their g query heads each: rows
// m = (i - i0) * g + j. q [n, Hq, D], k and v [T, Hkv, D] (the row's), visible [n, T], out like q.
static void attend_queries(const float* q, const float* k, const float* v, const bool* visible, int64_t i0,
                           int64_t i1, int64_t T, int64_t Hq, int64_t Hkv, int64_t h, int64_t D, float* out) {
  const int64_t g = Hq / Hkv, rows = (i1 - i0) * g, stride = (T + 7) / 8 * 8 + 8;  // + 8: scores8's last store
  thread_local std::vector<float> probs;  // [rows, stride]: scores, then their exponentials, by rank
  thread_local std::vector<int64_t> seen;  // keys each query sees
  probs.resize(rows * stride);
  seen.assign(i1 - i0, 0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t t0 = 0; t0 < T; t0 += kKeys) {
    const int64_t t1 = t0 + kKeys < T ? t0 + kKeys : T;
    for (int64_t i = i0; i < i1; ++i) {
      const bool* vis = visible + i * T;
      int64_t keys[kKeys], count = 0;  // the block's keys this query sees, in slot order
      for (int64_t t = t0; t < t1; ++t)
        if (vis[t]) keys[count++] = t;
      for (int64_t j = 0; j < g; ++j) {
        const float* qm = q + (i * Hq + h * g + j) * D;
        float* row = probs.data() + ((i - i0) * g + j) * stride + seen[i - i0];
        if (D % 8 == 0) {
          for (int64_t c = 0; c < count; c += 8) scores8(qm, k, keys + c, count - c, Hkv, h, D, scale, row + c);
        } else {
          for (int64_t c = 0; c < count; ++c) row[c] = dot(qm, k + (keys[c] * Hkv + h) * D, D) * scale;
        }
      }
      seen[i - i0] += count;
    }
  }
  std::vector<float> inverse(rows);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t S = seen[m / g];
    float* row = probs.data() + m * stride;
    if (S == 0) continue;
    float max = -INFINITY;
    for (int64_t s = 0; s < S; ++s) max = row[s] > max ? row[s] : max;
    for (int64_t s = S; s < (S + 7) / 8 * 8; ++s) row[s] = -INFINITY;
    const __m256 vmax = _mm256_set1_ps(max);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; s += 8) {
      const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + s), vmax));
      _mm256_storeu_ps(row + s, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    inverse[m] = 1.0f / horizontal_sum(vsum);
  }
  // out_m = sum over its keys, in slot order, of p * v; each 8 floats of out_m stay in a register
  // through a key block.
  std::vector<int64_t> rank(i1 - i0, 0);
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < g; ++j)
      for (int64_t d = 0; d < D; ++d) out[(i * Hq + h * g + j) * D + d] = 0.0f;
  for (int64_t t0 = 0; t0 < T; t0 += kKeys) {
    const int64_t t1 = t0 + kKeys < T ? t0 + kKeys : T;
    for (int64_t i = i0; i < i1; ++i) {
      const bool* vis = visible + i * T;
      for (int64_t j = 0; j < g; ++j) {
        const float* row = probs.data() + ((i - i0) * g + j) * stride;
        float* o = out + (i * Hq + h * g + j) * D;
        int64_t d = 0;
        for (; d + 64 <= D; d += 64) {  // 8 independent sums in registers: FMA-bound, not latency-bound
          __m256 acc[8];
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) acc[u] = _mm256_loadu_ps(o + d + 8 * u);
          for (int64_t t = t0, r = rank[i - i0]; t < t1; ++t) {
            if (!vis[t]) continue;
            const __m256 p = _mm256_set1_ps(row[r++]);
            const float* vt = v + (t * Hkv + h) * D + d;
#pragma GCC unroll 8
            for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * u), acc[u]);
          }
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) _mm256_storeu_ps(o + d + 8 * u, acc[u]);
        }
        for (; d + 8 <= D; d += 8) {
          __m256 acc = _mm256_loadu_ps(o + d);
          for (int64_t t = t0, r = rank[i - i0]; t < t1; ++t)
            if (vis[t]) acc = _mm256_fmadd_ps(_mm256_set1_ps(row[r++]), _mm256_loadu_ps(v + (t * Hkv + h) * D + d), acc);
          _mm256_storeu_ps(o + d, acc);
        }
        for (; d < D; ++d)
          for (int64_t t = t0, r = rank[i - i0]; t < t1; ++t)
            if (vis[t]) o[d] += row[r++] * v[(t * Hkv + h) * D + d];
      }
      for (int64_t t = t0; t < t1; ++t) rank[i - i0] += vis[t];
    }
  }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < g; ++j) {
      float* o = out + (i * Hq + h * g + j) * D;
      if (seen[i - i0] == 0) {  // no visible key: a softmax over all-masked scores is uniform
        for (int64_t t = 0; t < T; ++t)
          for (int64_t d = 0; d < D; ++d) o[d] += v[(t * Hkv + h) * D + d] / T;
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] *= inverse[(i - i0) * g + j];
      }
    }
}

static ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                  ffi::Buffer<ffi::PRED> visible, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = visible.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("expected q [B, n, Hq, D], k and v [B, T, Hkv, D], visible [B, n, T]");
  const int64_t B = qd[0], n = qd[1], Hq = qd[2], D = qd[3], T = kd[1], Hkv = kd[2];
  if (kd[0] != B || kd[3] != D || Hq % Hkv != 0 || md[0] != B || md[1] != n || md[2] != T || vd[0] != B ||
      vd[1] != T || vd[2] != Hkv || vd[3] != D)
    return ffi::Error::InvalidArgument("q, k, v and visible disagree in shape");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = visible.typed_data();
  float* op = out->typed_data();
  const int64_t chunks = (n + kQueries - 1) / kQueries;
  jaxaccel::parallel_for(pool, B * chunks * Hkv, [&](int64_t task) {  // task = (b, c, h)
    const int64_t b = task / (chunks * Hkv), c = task / Hkv % chunks, h = task % Hkv;
    const int64_t i0 = c * kQueries, i1 = i0 + kQueries < n ? i0 + kQueries : n;
    attend_queries(qp + b * n * Hq * D, kp + b * T * Hkv * D, vp + b * T * Hkv * D, mp + b * n * T, i0, i1, T, Hq, Hkv,
                   h, D, op + b * n * Hq * D);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxaccel_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
