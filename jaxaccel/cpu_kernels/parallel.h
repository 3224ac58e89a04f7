// parallel_for(pool, count, fn): fn(i) for every i in [0, count), on the calling thread and on
// helpers scheduled on XLA:CPU's own intra-op thread pool (the FFI handler's ThreadPool).
//
// Why not OpenMP: an OpenMP team is a second set of threads beside XLA's, woken for every call
// and left spinning after it, on the cores XLA's threads need for the step's other operations
// (benchmarks/cpu/cpu_kernels_bench.py: a 1-row chain of SmolLM2's products 21-24 ms this way, 27-32 ms with OpenMP).
// Indices are claimed from a shared counter, so nothing ever waits for a helper that has not
// started: the caller claims whatever is left and then waits only for indices already running.
// Which thread runs an index never changes what it computes.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxaccel {

template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, const F& fn) {
  struct Shared {
    const F* fn;
    int64_t count;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();  // a helper may start after the call returned: it then claims nothing
  shared->fn = &fn;
  shared->count = count;
  auto claim = [](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.count;) {
      (*s.fn)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared, claim] { claim(*shared); });
  claim(*shared);
  while (shared->done.load(std::memory_order_acquire) < count) _mm_pause();
}

}  // namespace jaxaccel
