// Direct grouped 3x3 convolution for x86-64 CPUs with AVX2 + FMA, as an XLA typed-FFI handler.
//
// Layouts: input NHWC, output NHWC, float32; torch-style symmetric zero padding, any stride.
// The kernel comes blocked as [unit][kh][kw][d][unit channels] (the Python side transposes
// HWIO into it), so each unit's weights are contiguous: a unit is one group (unit == dout),
// for 4 channels per group two groups (unit == 8), and in a dense conv 16 output channels
// (unit == 16: each 6x16 register tile then streams contiguous weights; with the whole HWIO
// kernel as one unit its rows lie a full row of output channels apart, and reading them at
// that stride thrashed the caches). Two vectorized forms, 8 output channels per AVX2 register:
//   * 4 channels per group (in and out): one register of 8 output channels spans two groups,
//     and the 8 input channels of those two groups are one unaligned load; an in-lane permute
//     broadcasts input channel c of each group to its four outputs, so every tap is
//     1 load + 4 permutes + 4 FMAs per pixel (8 pixels per register tile).
//   * out channels per group a multiple of 8 (any in channels per group): each input channel
//     is broadcast from memory and multiplied into 1-2 registers of output channels, over a
//     block of 6-8 pixels (a 6x16 or 8x8 register tile, like a GEMM micro-kernel).
// Output pixels are taken in blocks along the flattened (n, oh, ow) axis, so blocks run across
// rows; a tap in the padding reads from a buffer of zeros instead of being branched around.
// Work is split into (unit chunk, pixel block) items, chunk-major, a chunk being as many units
// as keep their weights within ~96 KiB (all units for small groups, so every input cache line
// read serves all its channels). Items are claimed with an atomic counter by the calling thread
// and by helpers scheduled on XLA's intra-op thread pool (the FFI's ThreadPool context); the
// caller never waits for a helper that has not started, so a busy pool cannot deadlock it.
//
// The AVX2 code is compiled with function-level target attributes and only entered after a
// runtime CPU check (resnext_direct_conv_vectorized), so the library loads on any x86-64 CPU;
// a scalar form covers any shape (correct, slow; Python only routes vectorizable shapes here).
//
// Dense 1x1 convs (no padding, any stride) run as a GEMM on the same blocked weights, which
// for kh = kw = 1 are 16-column panels [cout/16][c][16]: see GemmConv.

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

namespace {

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

bool CpuHasAvx2Fma() {
#if RESNEXT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#if RESNEXT_X86

constexpr int kMaxP = 8;

// For output pixels [q0, q0 + P) (flat over n, oh, ow): a pointer to channel 0 of the input
// pixel under each of the 9 taps, or to a buffer of zeros where the tap falls in the padding.
template <int P>
inline void TapPointers(const Shape& s, const float* x, const float* zero, int64_t q0,
                        const float* (&ptr)[9][kMaxP]) {
  int64_t n = q0 / (s.ho * s.wo), oh = (q0 / s.wo) % s.ho, ow = q0 % s.wo;
  for (int p = 0; p < P; ++p) {
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t ih = oh * s.stride - s.pad + i;
      const bool row_ok = ih >= 0 && ih < s.h;
      for (int64_t j = 0; j < 3; ++j) {
        const int64_t iw = ow * s.stride - s.pad + j;
        ptr[i * 3 + j][p] = row_ok && iw >= 0 && iw < s.w ? x + ((n * s.h + ih) * s.w + iw) * s.c
                                                          : zero;
      }
    }
    if (++ow == s.wo) {
      ow = 0;
      if (++oh == s.ho) oh = 0, ++n;
    }
  }
}

// ---- 4 channels per group: unit u is output (and input) channels [8u, 8u + 8), two groups.
// Blocked kernel: [unit][tap][c][8].
template <int P>
RESNEXT_AVX2 inline void D4Block(const Shape& s, const float* const (&ptr)[9][kMaxP],
                                 const float* wb, float* y, int64_t q0, int64_t u) {
  __m256 acc[P];
  for (int p = 0; p < P; ++p) acc[p] = _mm256_setzero_ps();
  const float* wu = wb + u * (9 * 4 * 8);
  for (int t = 0; t < 9; ++t) {
    const float* wt = wu + t * 32;
    const __m256 w0 = _mm256_loadu_ps(wt);
    const __m256 w1 = _mm256_loadu_ps(wt + 8);
    const __m256 w2 = _mm256_loadu_ps(wt + 16);
    const __m256 w3 = _mm256_loadu_ps(wt + 24);
    for (int p = 0; p < P; ++p) {
      const __m256 xi = _mm256_loadu_ps(ptr[t][p] + 8 * u);
      acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xi, 0x00), w0, acc[p]);
      acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xi, 0x55), w1, acc[p]);
      acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xi, 0xAA), w2, acc[p]);
      acc[p] = _mm256_fmadd_ps(_mm256_permute_ps(xi, 0xFF), w3, acc[p]);
    }
  }
  for (int p = 0; p < P; ++p) _mm256_storeu_ps(y + (q0 + p) * s.cout + 8 * u, acc[p]);
}

// ---- unit a multiple of 8 output channels: a group (unit == dout), or in a dense conv a
// block of 16 output channels (unit == 16, groups == 1); output vectors [j, j + V) of unit u.
// Blocked kernel: [unit][tap][c][unit channels].
template <int P, int V>
RESNEXT_AVX2 inline void BcastBlock(const Shape& s, const float* const (&ptr)[9][kMaxP],
                                    const float* wb, float* y, int64_t q0, int64_t u,
                                    int64_t j) {
  __m256 acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < V; ++q) acc[p][q] = _mm256_setzero_ps();
  const int64_t d = s.d, unit = s.unit;
  const int64_t group = u * unit / s.dout;  // whose input channels the unit reads
  const float* wu = wb + u * 9 * d * unit + 8 * j;
  for (int t = 0; t < 9; ++t) {
    const float* wt = wu + t * d * unit;
    const float* xp[P];
    for (int p = 0; p < P; ++p) xp[p] = ptr[t][p] + group * d;
    for (int64_t c = 0; c < d; ++c) {
      __m256 wv[V];
      for (int q = 0; q < V; ++q) wv[q] = _mm256_loadu_ps(wt + c * unit + 8 * q);
      for (int p = 0; p < P; ++p) {
        const __m256 b = _mm256_broadcast_ss(xp[p] + c);
        for (int q = 0; q < V; ++q) acc[p][q] = _mm256_fmadd_ps(b, wv[q], acc[p][q]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < V; ++q)
      _mm256_storeu_ps(y + (q0 + p) * s.cout + u * unit + 8 * (j + q), acc[p][q]);
}

template <int P>
RESNEXT_AVX2 void PixelBlock(const Shape& s, bool d4, const float* x, const float* zero,
                             const float* wb, float* y, int64_t q0, int64_t u0, int64_t u1) {
  const float* ptr[9][kMaxP];
  TapPointers<P>(s, x, zero, q0, ptr);
  for (int64_t u = u0; u < u1; ++u) {
    if (d4) {
      D4Block<P>(s, ptr, wb, y, q0, u);
      continue;
    }
    const int64_t vectors = s.unit / 8;
    int64_t j = 0;
    // Pairs of vectors in a 6x16 tile where P <= 6; 8 pixels take one vector at a time (an
    // 8x8 tile), as a 6-wide pair tile would leave two of the eight pixels unwritten.
    if constexpr (P <= 6)
      for (; j + 2 <= vectors; j += 2) BcastBlock<P, 2>(s, ptr, wb, y, q0, u, j);
    for (; j < vectors; ++j) BcastBlock<P, 1>(s, ptr, wb, y, q0, u, j);
  }
}

// Output pixels [q0, q1) for units [u0, u1).
RESNEXT_AVX2 void VectorRange(const Shape& s, bool d4, const float* x, const float* zero,
                              const float* wb, float* y, int64_t q0, int64_t q1, int64_t u0,
                              int64_t u1) {
  // 6 pixels per block where a unit has a multiple of 16 outputs (a 6x2 register tile), else 8.
  const int P = (!d4 && s.unit % 16 == 0) ? 6 : 8;
  int64_t q = q0;
  if (P == 6) {
    for (; q + 6 <= q1; q += 6) PixelBlock<6>(s, d4, x, zero, wb, y, q, u0, u1);
  } else {
    for (; q + 8 <= q1; q += 8) PixelBlock<8>(s, d4, x, zero, wb, y, q, u0, u1);
  }
  if (q + 4 <= q1) { PixelBlock<4>(s, d4, x, zero, wb, y, q, u0, u1); q += 4; }
  if (q + 2 <= q1) { PixelBlock<2>(s, d4, x, zero, wb, y, q, u0, u1); q += 2; }
  if (q < q1) PixelBlock<1>(s, d4, x, zero, wb, y, q, u0, u1);
}

// ---- 1x1 convolutions as a packed GEMM: y[pixels, cout] = x[pixels, c] * W[c, cout].
// W comes blocked as [cout/16][c][16] (the dense layout above with kh = kw = 1), i.e. already
// packed in 16-column panels, once per model (Python prepares it). A 6x16 register tile
// (12 accumulators, like the 3x3 form) runs over KC input channels at a time: that slice of a
// panel (16 KiB) stays in L1 while MC rows of the input, packed as [rows/6][kc][6], sit in L2.
constexpr int kGemmRows = 6;
constexpr int64_t kGemmKc = 256, kGemmMc = 72, kGemmMaxNc = 512;

#define RESNEXT_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

// The 6x16 tile (R <= 6 rows) over kc channels; adds into y unless `first`; applies `ep`
// (offset to this tile's row and column) unless null. Named accumulators (not an array) so
// that they stay in registers.
template <int R>
RESNEXT_AVX2 void GemmTile(int64_t kc, const float* ap, const float* bp, float* y,
                           int64_t ldy, bool first, const Epilogue* ep) {
#define RESNEXT_DECL(r) __m256 acc##r##0 = _mm256_setzero_ps(), acc##r##1 = _mm256_setzero_ps();
  RESNEXT_TILE_ROWS(RESNEXT_DECL)
#undef RESNEXT_DECL
#pragma GCC unroll 8
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * 16), b1 = _mm256_loadu_ps(bp + k * 16 + 8);
#define RESNEXT_STEP(r)                                                  \
    if constexpr (r < R) {                                               \
      const __m256 a = _mm256_broadcast_ss(ap + k * kGemmRows + r);      \
      acc##r##0 = _mm256_fmadd_ps(a, b0, acc##r##0);                     \
      acc##r##1 = _mm256_fmadd_ps(a, b1, acc##r##1);                     \
    }
    RESNEXT_TILE_ROWS(RESNEXT_STEP)
#undef RESNEXT_STEP
  }
#define RESNEXT_STORE(r)                                                             \
  if constexpr (r < R) {                                                             \
    float* yr = y + r * ldy;                                                         \
    if (!first) {                                                                    \
      acc##r##0 = _mm256_add_ps(acc##r##0, _mm256_loadu_ps(yr));                     \
      acc##r##1 = _mm256_add_ps(acc##r##1, _mm256_loadu_ps(yr + 8));                 \
    }                                                                                \
    if (ep != nullptr) {                                                             \
      if (ep->bias != nullptr) {                                                     \
        acc##r##0 = _mm256_add_ps(acc##r##0, _mm256_loadu_ps(ep->bias));             \
        acc##r##1 = _mm256_add_ps(acc##r##1, _mm256_loadu_ps(ep->bias + 8));         \
      }                                                                              \
      if (ep->residual != nullptr) {                                                 \
        const float* rr = ep->residual + r * ldy;                                    \
        acc##r##0 = _mm256_add_ps(acc##r##0, _mm256_loadu_ps(rr));                   \
        acc##r##1 = _mm256_add_ps(acc##r##1, _mm256_loadu_ps(rr + 8));               \
      }                                                                              \
      if (ep->relu) {                                                                \
        /* max(0, acc): returns acc where it is NaN, as XLA's max does */             \
        acc##r##0 = _mm256_max_ps(_mm256_setzero_ps(), acc##r##0);                   \
        acc##r##1 = _mm256_max_ps(_mm256_setzero_ps(), acc##r##1);                   \
      }                                                                              \
    }                                                                                \
    _mm256_storeu_ps(yr, acc##r##0);                                                 \
    _mm256_storeu_ps(yr + 8, acc##r##1);                                             \
  }
  RESNEXT_TILE_ROWS(RESNEXT_STORE)
#undef RESNEXT_STORE
}

#undef RESNEXT_TILE_ROWS

// Input rows [q0, q0 + rows) (output pixels), channels [k0, k0 + kc), packed as
// [ceil(rows/6)][kc][6] with zero rows at the end. A strided 1x1 conv reads every stride-th
// pixel, so rows are addressed through their input pixel, not assumed contiguous.
void PackRows(const Shape& s, const float* x, int64_t q0, int64_t rows, int64_t k0, int64_t kc,
              float* ap) {
  for (int64_t i = 0; i < rows; i += kGemmRows) {
    const float* src[kGemmRows];
    const int64_t here = std::min<int64_t>(kGemmRows, rows - i);
    for (int r = 0; r < kGemmRows; ++r) {
      const int64_t q = q0 + i + std::min<int64_t>(r, here - 1);
      const int64_t n = q / (s.ho * s.wo), oh = (q / s.wo) % s.ho, ow = q % s.wo;
      src[r] = x + ((n * s.h + oh * s.stride) * s.w + ow * s.stride) * s.c + k0;
    }
    float* dst = ap + (i / kGemmRows) * kc * kGemmRows;
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < kGemmRows; ++r) dst[k * kGemmRows + r] = r < here ? src[r][k] : 0.f;
  }
}

// Output rows [q0, q0 + rows), columns [n0, n0 + nc) (multiples of 16), all input channels;
// the epilogue goes with the last slice of channels.
RESNEXT_AVX2 void GemmBlock(const Shape& s, const float* x, const float* wb, float* y,
                            const Epilogue& epilogue, int64_t q0, int64_t rows, int64_t n0,
                            int64_t nc, float* ap) {
  const bool any_epilogue = epilogue.bias || epilogue.residual || epilogue.relu;
  for (int64_t k0 = 0; k0 < s.c; k0 += kGemmKc) {
    const int64_t kc = std::min(kGemmKc, s.c - k0);
    const bool last = k0 + kc >= s.c;
    PackRows(s, x, q0, rows, k0, kc, ap);
    for (int64_t j = n0; j < n0 + nc; j += 16) {
      const float* bp = wb + (j / 16) * s.c * 16 + k0 * 16;
      for (int64_t i = 0; i < rows; i += kGemmRows) {
        const float* api = ap + (i / kGemmRows) * kc * kGemmRows;
        const int64_t offset = (q0 + i) * s.cout + j;
        Epilogue here;
        if (epilogue.bias) here.bias = epilogue.bias + j;
        if (epilogue.residual) here.residual = epilogue.residual + offset;
        here.relu = epilogue.relu;
        const Epilogue* ep = last && any_epilogue ? &here : nullptr;
        float* yt = y + offset;
        switch (std::min<int64_t>(kGemmRows, rows - i)) {
          case 6: GemmTile<6>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
          case 5: GemmTile<5>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
          case 4: GemmTile<4>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
          case 3: GemmTile<3>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
          case 2: GemmTile<2>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
          default: GemmTile<1>(kc, api, bp, yt, s.cout, k0 == 0, ep); break;
        }
      }
    }
  }
}

#endif  // RESNEXT_X86

// Scalar form for any shape: output pixels [q0, q1), units [u0, u1).
void ScalarRange(const Shape& s, const float* x, const float* wb, float* y, int64_t q0,
                 int64_t q1, int64_t u0, int64_t u1) {
  const int64_t taps = s.kh * s.kw;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n = q / (s.ho * s.wo), oh = (q / s.wo) % s.ho, ow = q % s.wo;
    for (int64_t o = u0 * s.unit; o < std::min(s.cout, u1 * s.unit); ++o) {
      const int64_t u = o / s.unit, j = o % s.unit, g = o / s.dout;
      float acc = 0.f;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t ih = oh * s.stride - s.pad + i;
        if (ih < 0 || ih >= s.h) continue;
        for (int64_t k = 0; k < s.kw; ++k) {
          const int64_t iw = ow * s.stride - s.pad + k;
          if (iw < 0 || iw >= s.w) continue;
          const float* xp = x + ((n * s.h + ih) * s.w + iw) * s.c + g * s.d;
          const float* wp = wb + ((u * taps + i * s.kw + k) * s.d) * s.unit + j;
          for (int64_t c = 0; c < s.d; ++c) acc += xp[c] * wp[c * s.unit];
        }
      }
      y[q * s.cout + o] = acc;
    }
  }
}

enum class Form { kD4, kBcast, kGemm, kScalar };

// A dense conv's kernel in blocks of 16 output channels.
bool DenseBlocks(const Shape& s) { return s.groups == 1 && s.unit == 16 && s.dout % 16 == 0; }

Form ChooseForm(const Shape& s, bool avx2) {
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
  int64_t helpers = pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads(), items - 1);
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

const bool kAvx2 = CpuHasAvx2Fma();

// Helper threads: -1 = as many as the pool has (default); 0 = run on the calling thread only.
std::atomic<int> g_max_helpers{-1};

#if RESNEXT_X86
// A 1x1 conv as a GEMM, in items of (kGemmMc rows, a block of columns): at least ~8 items, so
// that small maps (batch 1, 7x7) still spread over the threads, and at most kGemmMaxNc
// columns per block.
void GemmConv(ffi::ThreadPool* pool, const Shape& s, const float* x, const float* wb,
              float* y, const Epilogue& epilogue = {}) {
  const int64_t pixels = s.n * s.ho * s.wo;
  const int64_t row_blocks = (pixels + kGemmMc - 1) / kGemmMc;
  const int64_t panels = s.cout / 16;
  int64_t col_blocks = std::max((s.cout + kGemmMaxNc - 1) / kGemmMaxNc,
                                (8 + row_blocks - 1) / row_blocks);
  col_blocks = std::min(col_blocks, panels);
  const int64_t panels_per_block = (panels + col_blocks - 1) / col_blocks;
  col_blocks = (panels + panels_per_block - 1) / panels_per_block;
  auto run = [&](int64_t item) {
    thread_local std::vector<float> packed;
    if (packed.size() < static_cast<size_t>(kGemmMc * kGemmKc)) packed.resize(kGemmMc * kGemmKc);
    const int64_t q0 = (item / col_blocks) * kGemmMc;
    const int64_t p0 = (item % col_blocks) * panels_per_block;
    const int64_t p1 = std::min(panels, p0 + panels_per_block);
    GemmBlock(s, x, wb, y, epilogue, q0, std::min(kGemmMc, pixels - q0), p0 * 16,
              (p1 - p0) * 16, packed.data());
  };
  ParallelFor(pool, g_max_helpers.load(), row_blocks * col_blocks, run);
}
#endif

// The conv's shape from its operands (x: (n, h, w, c); w: blocked (units, kh, kw, d, unit);
// y: (n, ho, wo, cout)), checked against the attributes.
ffi::Error ReadShape(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
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
  return ffi::Error::Success();
}

ffi::Error DirectConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding,
                      int64_t groups, int64_t unit) {
  Shape s;
  if (ffi::Error err = ReadShape(x, w, y, stride, padding, groups, unit, s); err.failure())
    return err;
  if (s.ho <= 0 || s.wo <= 0 || s.n == 0) return ffi::Error::Success();

  const Form form = ChooseForm(s, kAvx2);
  const int64_t pixels = s.n * s.ho * s.wo;
#if RESNEXT_X86
  if (form == Form::kGemm) {
    GemmConv(&pool, s, x.typed_data(), w.typed_data(), y->typed_data());
    return ffi::Error::Success();
  }
#endif
  const int64_t units = s.cout / s.unit;
  // Items of (unit chunk, pixel block), chunk-major. A chunk is as many units as keep their
  // weights within ~96 KiB (L2-resident while its pixels are swept); all units where they fit,
  // so that every input cache line read is used by all its channels. Pixel blocks are a
  // multiple of 24 (the register-tile widths 6 and 8) sized for >= 32 items in all.
  const int64_t unit_bytes = s.kh * s.kw * s.d * s.unit * 4;
  const int64_t unit_chunk = std::max<int64_t>(1, std::min(units, (96 << 10) / unit_bytes));
  const int64_t chunks = (units + unit_chunk - 1) / unit_chunk;
  const int64_t want_blocks = std::max<int64_t>(1, (32 + chunks - 1) / chunks);
  int64_t pixel_block = (pixels + want_blocks - 1) / want_blocks;
  pixel_block = std::max<int64_t>(24, (pixel_block + 23) / 24 * 24);
  const int64_t blocks = (pixels + pixel_block - 1) / pixel_block;

  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  auto run = [&](int64_t item) {
    const int64_t u0 = (item / blocks) * unit_chunk;
    const int64_t u1 = std::min(units, u0 + unit_chunk);
    const int64_t q0 = (item % blocks) * pixel_block;
    const int64_t q1 = std::min(pixels, q0 + pixel_block);
#if RESNEXT_X86
    if (form != Form::kScalar) {
      thread_local std::vector<float> zero;
      if (zero.size() < static_cast<size_t>(s.c)) zero.assign(s.c, 0.f);
      VectorRange(s, form == Form::kD4, xp, zero.data(), wp, yp, q0, q1, u0, u1);
      return;
    }
#endif
    ScalarRange(s, xp, wp, yp, q0, q1, u0, u1);
  };
  ParallelFor(&pool, g_max_helpers.load(), chunks * blocks, run);
  return ffi::Error::Success();
}

// A 1x1 conv with its epilogue: y = relu?(x * w + bias (+ residual)). `rest` holds the
// residual, (n, ho, wo, cout) like y, or nothing.
ffi::Error PointwiseConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> bias, ffi::RemainingArgs rest,
                         ffi::ResultBuffer<ffi::F32> y, int64_t stride, bool relu) {
  Shape s;
  if (ffi::Error err = ReadShape(x, w, y, stride, 0, 1, 16, s); err.failure()) return err;
  if (s.kh != 1 || s.kw != 1 || ChooseForm(s, kAvx2) != Form::kGemm)
    return ffi::Error::InvalidArgument("pointwise conv: expected a 1x1 kernel in 16-channel "
                                       "panels and a CPU with AVX2/FMA");
  const auto bd = bias.dimensions();
  if (bd.size() != 1 || bd[0] != s.cout)
    return ffi::Error::InvalidArgument("pointwise conv: bias must be (cout,)");
  Epilogue epilogue;
  epilogue.bias = bias.typed_data();
  epilogue.relu = relu;
  if (rest.size() > 1) return ffi::Error::InvalidArgument("pointwise conv: too many operands");
  if (rest.size() == 1) {
    auto residual = rest.get<ffi::Buffer<ffi::F32>>(0);
    if (residual.has_error()) return residual.error();
    const auto rd = residual->dimensions(), yd = y->dimensions();
    if (rd.size() != 4 || !std::equal(rd.begin(), rd.end(), yd.begin()))
      return ffi::Error::InvalidArgument("pointwise conv: residual must have the output's shape");
    epilogue.residual = residual->typed_data();
  }
  if (s.ho <= 0 || s.wo <= 0 || s.n == 0) return ffi::Error::Success();
#if RESNEXT_X86
  GemmConv(&pool, s, x.typed_data(), w.typed_data(), y->typed_data(), epilogue);
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextPointwiseConv, PointwiseConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextDirectConv, DirectConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("unit"));

namespace {

// The identity, as an op XLA cannot fuse: its output is aliased to its input, so it costs no
// copy. Placed on a residual block's output, it keeps XLA:CPU's loop fusion from recomputing
// the whole chain of earlier blocks inside each residual add (see nn/cpu_kernels.py).
ffi::Error FusionBoundary(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (y->untyped_data() != x.untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextFusionBoundary, FusionBoundary,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// 1 when this CPU runs the vectorized forms (AVX2 and FMA); the scalar form is slow.
extern "C" int resnext_direct_conv_vectorized() { return kAvx2 ? 1 : 0; }

// Benchmarks: cap the helper threads taken from XLA's pool (0: the calling thread alone).
extern "C" void resnext_direct_conv_set_helpers(int helpers) { g_max_helpers.store(helpers); }
