// Shared by the compiled CPU kernels (direct_conv.cc, gemm.cc): the conv's shape, the 1x1
// epilogue, the CPU check and the work loop on XLA's intra-op thread pool. Everything here is
// inline, so that the kernels' translation units share one copy (one helper-thread setting).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RESNEXT_X86 1
#define RESNEXT_AVX2 __attribute__((target("avx2,fma")))
#else
#define RESNEXT_X86 0
#define RESNEXT_AVX2
#endif

namespace ffi = xla::ffi;

namespace resnext {

struct Shape {
  int64_t n, h, w, c;       // input
  int64_t kh, kw;           // kernel window
  int64_t cout, groups;     // output channels, groups
  int64_t d, dout;          // channels per group, in and out
  int64_t stride, pad;
  int64_t ho, wo;           // output size
  // Output channels per unit of the blocked kernel [unit][kh][kw][d][unit channels]: a group
  // (unit == dout), two groups of 4 (unit == 8, d == dout == 4), or 16 channels of a dense
  // conv (unit == 16, groups == 1).
  int64_t unit;
};

// What a 1x1 conv's output gets as it is written (inference with BatchNorm folded into the
// conv): y = relu?(conv + bias[col] + residual[row, col]), each part optional. One pass over
// the output instead of a separate XLA loop that reads and writes it again.
struct Epilogue {
  const float* bias = nullptr;      // [cout]
  const float* residual = nullptr;  // [pixels, cout], like y
  bool relu = false;
};

inline bool CpuHasAvx2Fma() {
#if RESNEXT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

enum class Form { kD4, kBcast, kGemm, kScalar };

// A dense conv's kernel in blocks of 16 output channels.
inline bool DenseBlocks(const Shape& s) {
  return s.groups == 1 && s.unit == 16 && s.dout % 16 == 0;
}

inline Form ChooseForm(const Shape& s, bool avx2) {
  if (avx2 && s.kh == 1 && s.kw == 1 && s.pad == 0 && DenseBlocks(s)) return Form::kGemm;
  if (!avx2 || s.kh != 3 || s.kw != 3) return Form::kScalar;
  if (s.d == 4 && s.dout == 4 && s.unit == 8) return Form::kD4;
  if (s.unit == s.dout && s.dout % 8 == 0) return Form::kBcast;
  if (DenseBlocks(s)) return Form::kBcast;
  return Form::kScalar;
}

// Runs fn(item) for every item in [0, items), on the calling thread and on helpers scheduled
// on XLA's intra-op pool. Items are claimed with an atomic counter; the caller works too and
// then waits only for items already being run, never for a helper that has not started (the
// pool may be busy, e.g. with the thread that called us), so it cannot deadlock.
template <typename F>
void ParallelFor(ffi::ThreadPool* pool, int64_t max_helpers, int64_t items, const F& fn) {
  // The caller is not one of the pool's threads (XLA runs the program on the thread that
  // called it), so it plus num_threads - 1 helpers keep one thread per core: one helper more
  // would make the OS time-slice them, and an item whose thread is descheduled holds up the
  // whole op until that thread runs again.
  int64_t helpers =
      pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads() - 1, items - 1);
  if (max_helpers >= 0) helpers = std::min(helpers, max_helpers);
  if (helpers <= 0) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> in_flight{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [items, f](State& st) {
    for (;;) {
      st.in_flight.fetch_add(1);
      const int64_t i = st.next.fetch_add(1);
      if (i < items) (*f)(i);
      if (st.in_flight.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(st.mu);
        st.cv.notify_all();
      }
      if (i >= items) return;
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool->Schedule([state, work]() { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->in_flight.load() == 0; });
}

// Process state is hidden (bound within this library): inline variables are otherwise unique
// symbols that the dynamic linker shares between every loaded copy of the library.
#define RESNEXT_HIDDEN __attribute__((visibility("hidden")))

inline RESNEXT_HIDDEN const bool kAvx2 = CpuHasAvx2Fma();

// Helper threads: -1 = as many as the pool has (default); 0 = run on the calling thread only.
inline RESNEXT_HIDDEN std::atomic<int> g_max_helpers{-1};

// The conv's shape from its operands (x: (n, h, w, c); w: blocked (units, kh, kw, d, unit);
// y: (n, ho, wo, cout)), checked against the attributes.
inline ffi::Error ReadShape(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
                     ffi::ResultBuffer<ffi::F32>& y, int64_t stride, int64_t padding,
                     int64_t groups, int64_t unit, Shape& s) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 5 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv: expected NHWC input and a blocked kernel");
  s.n = xd[0], s.h = xd[1], s.w = xd[2], s.c = xd[3];
  s.kh = wd[1], s.kw = wd[2], s.d = wd[3], s.unit = wd[4], s.cout = wd[0] * wd[4];
  s.groups = groups, s.stride = stride, s.pad = padding;
  if (groups <= 0 || stride <= 0 || padding < 0 || s.c != s.d * groups || s.cout % groups ||
      unit != s.unit)
    return ffi::Error::InvalidArgument("conv: inconsistent channels, groups or stride");
  s.dout = s.cout / groups;
  if (s.unit != s.dout && !(s.d == 4 && s.dout == 4 && s.unit == 8) && !DenseBlocks(s))
    return ffi::Error::InvalidArgument("conv: unsupported kernel blocking");
  s.ho = (s.h + 2 * s.pad - s.kh) / s.stride + 1;
  s.wo = (s.w + 2 * s.pad - s.kw) / s.stride + 1;
  if (yd[0] != s.n || yd[1] != s.ho || yd[2] != s.wo || yd[3] != s.cout)
    return ffi::Error::InvalidArgument("conv: output shape does not match");
  // No channel to sum over would leave the output unwritten; no output channel, no work.
  if (s.c == 0 && s.cout > 0)
    return ffi::Error::InvalidArgument("conv: the input has no channels");
  return ffi::Error::Success();
}

#if RESNEXT_X86
// Whether the AVX-512 forms run (the 1x1 GEMM's and the stem's): the CPU has AVX-512F and tests
// have not turned them off (gemm.cc, resnext_gemm_set_avx512).
RESNEXT_HIDDEN extern std::atomic<bool> g_gemm_avx512;

// A dense 1x1 conv (Form::kGemm) as a GEMM with its epilogue, on the pool (gemm.cc).
RESNEXT_HIDDEN void GemmConv(ffi::ThreadPool* pool, const Shape& s, const float* x,
                             const float* wb, float* y, const Epilogue& epilogue = {});
#endif

}  // namespace resnext
