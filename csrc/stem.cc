// The ResNet stem on x86-64 CPUs with AVX2 + FMA, as XLA typed-FFI handlers: a dense conv over
// few input channels (the 7x7 stride-2 conv over RGB) with a bias/ReLU epilogue, and an NHWC
// max-pool with -inf padding.
//
// Stem conv. The input comes already zero-padded (Python pads it in XLA: cheap at 3 channels),
// so no tap is ever out of bounds. For one output row and one kernel row i, the kw taps x c
// channels of output pixel ow are K = kw * c contiguous floats of the padded input row
// oh * stride + i, starting at ow * stride * c: the conv is, per kernel row, a GEMM whose A rows
// lie a constant stride * c floats apart, read in place (no packing, no pointer tables). The
// weights come in the direct kernel's dense layout [cout/16][kh][kw][c][16], i.e. per 16-column
// panel kh consecutive K x 16 slices. A 6x16 register tile (6 pixels of one output row x 16
// channels, 12 accumulators) sums all kh * K products, then adds the bias and applies ReLU as it
// stores; on CPUs with AVX-512F a 12x32 tile does (StemTile512), in the same
// order. Work items are output rows (all panels each: the whole kernel is a few tens of KiB).
//
// Max-pool. Each output pixel's window is clipped to the input, which is the same max as
// reduce_window over -inf padding with an -inf initial value (an empty window gives -inf).
// Values are combined as XLA's max does: NaN propagates, and +0 is larger than -0 (so the
// result does not depend on the order of the window's elements). Items are output rows; each
// vector of 8 channels is reduced over the window taps.
//
// The AVX2 code is compiled with function-level target attributes; Python registers these
// handlers only after the runtime CPU check (resnext_direct_conv_vectorized), and each handler
// refuses to run without AVX2/FMA.

#include <cmath>
#include <limits>

#include "common.h"

// GCC 12's _mm512_max_ps passes an undefined vector as the unused source of its masked form.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace resnext {
namespace {

#if RESNEXT_X86

constexpr int kStemPixels = 6;

#define RESNEXT_STEM_PIXELS(X) X(0) X(1) X(2) X(3) X(4) X(5)

// Output pixels [0, R) of one row from `x` (pixel 0's window at kernel row 0; pixel r's lies
// r * step floats later, kernel row i's i * row floats later), the 16 channels of a panel `wp`
// ([kh][k][16]); y rows lie ldy floats apart. Named accumulators keep the tile in registers.
template <int R>
RESNEXT_AVX2 void StemTile(const float* x, int64_t row, int64_t step, int64_t kh, int64_t k,
                           const float* wp, const float* bias, bool relu, float* y,
                           int64_t ldy) {
#define RESNEXT_DECL(r) __m256 acc##r##0 = _mm256_setzero_ps(), acc##r##1 = _mm256_setzero_ps();
  RESNEXT_STEM_PIXELS(RESNEXT_DECL)
#undef RESNEXT_DECL
  for (int64_t i = 0; i < kh; ++i) {
    const float* xi = x + i * row;
    const float* wi = wp + i * k * 16;
#pragma GCC unroll 4
    for (int64_t j = 0; j < k; ++j) {
      const __m256 b0 = _mm256_loadu_ps(wi + j * 16), b1 = _mm256_loadu_ps(wi + j * 16 + 8);
#define RESNEXT_STEP(r)                                           \
      if constexpr (r < R) {                                      \
        const __m256 a = _mm256_broadcast_ss(xi + r * step + j);  \
        acc##r##0 = _mm256_fmadd_ps(a, b0, acc##r##0);            \
        acc##r##1 = _mm256_fmadd_ps(a, b1, acc##r##1);            \
      }
      RESNEXT_STEM_PIXELS(RESNEXT_STEP)
#undef RESNEXT_STEP
    }
  }
#define RESNEXT_STORE(r)                                                     \
  if constexpr (r < R) {                                                     \
    if (bias != nullptr) {                                                   \
      acc##r##0 = _mm256_add_ps(acc##r##0, _mm256_loadu_ps(bias));           \
      acc##r##1 = _mm256_add_ps(acc##r##1, _mm256_loadu_ps(bias + 8));       \
    }                                                                        \
    if (relu) {                                                              \
      /* max(0, acc): returns acc where it is NaN, as XLA's max does */      \
      acc##r##0 = _mm256_max_ps(_mm256_setzero_ps(), acc##r##0);             \
      acc##r##1 = _mm256_max_ps(_mm256_setzero_ps(), acc##r##1);             \
    }                                                                        \
    _mm256_storeu_ps(y + r * ldy, acc##r##0);                                \
    _mm256_storeu_ps(y + r * ldy + 8, acc##r##1);                            \
  }
  RESNEXT_STEM_PIXELS(RESNEXT_STORE)
#undef RESNEXT_STORE
}

#undef RESNEXT_STEM_PIXELS

// ---- The AVX-512 form (CPUs with AVX-512F), for windows kStep floats apart (stride x c: 6 for
// ResNet's 7x7/2 stem over RGB, 3 at stride 1): a 12-pixel x 32-channel register tile (24 zmm
// accumulators, two panels), as the 1x1 GEMM's. A compile-time step lets one register address
// all twelve pixels' windows.
#define RESNEXT_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define RESNEXT_ROWS12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
constexpr int kStemPixels512 = 12;

// Output pixels [0, R) of one row, channels of panels wp and wp + kh * k * 16; as StemTile.
template <int kStep, int R>
RESNEXT_AVX512 void StemTile512(const float* x, int64_t row, int64_t kh, int64_t k,
                                const float* wp, const float* bias, bool relu, float* y,
                                int64_t ldy) {
#define RESNEXT_DECL(r) __m512 acc##r##0 = _mm512_setzero_ps(), acc##r##1 = _mm512_setzero_ps();
  RESNEXT_ROWS12(RESNEXT_DECL)
#undef RESNEXT_DECL
  const float* wp1 = wp + kh * k * 16;
  for (int64_t i = 0; i < kh; ++i) {
    const float* xi = x + i * row;
    const float* w0 = wp + i * k * 16;
    const float* w1 = wp1 + i * k * 16;
#pragma GCC unroll 3
    for (int64_t j = 0; j < k; ++j) {
      const __m512 b0 = _mm512_loadu_ps(w0 + j * 16), b1 = _mm512_loadu_ps(w1 + j * 16);
#define RESNEXT_STEP(r)                                          \
      if constexpr (r < R) {                                     \
        const __m512 a = _mm512_set1_ps(xi[r * kStep + j]);      \
        acc##r##0 = _mm512_fmadd_ps(a, b0, acc##r##0);           \
        acc##r##1 = _mm512_fmadd_ps(a, b1, acc##r##1);           \
      }
      RESNEXT_ROWS12(RESNEXT_STEP)
#undef RESNEXT_STEP
    }
  }
  const __m512 bias0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
#define RESNEXT_STORE(r)                                                     \
  if constexpr (r < R) {                                                     \
    if (bias != nullptr) {                                                   \
      acc##r##0 = _mm512_add_ps(acc##r##0, bias0);                           \
      acc##r##1 = _mm512_add_ps(acc##r##1, bias1);                           \
    }                                                                        \
    if (relu) {                                                              \
      /* max(0, acc): returns acc where it is NaN, as XLA's max does */      \
      acc##r##0 = _mm512_max_ps(_mm512_setzero_ps(), acc##r##0);             \
      acc##r##1 = _mm512_max_ps(_mm512_setzero_ps(), acc##r##1);             \
    }                                                                        \
    _mm512_storeu_ps(y + r * ldy, acc##r##0);                                \
    _mm512_storeu_ps(y + r * ldy + 16, acc##r##1);                           \
  }
  RESNEXT_ROWS12(RESNEXT_STORE)
#undef RESNEXT_STORE
}

#undef RESNEXT_ROWS12

// One output row (n, oh), every panel, in tiles of near-equal width (a last tile of a few
// pixels would run at a fraction of the FMA rate).
template <int kStep>
RESNEXT_AVX512 void StemRow512(const Shape& s, const float* x, const float* wb,
                               const float* bias, bool relu, float* y, int64_t n, int64_t oh) {
  const int64_t row = s.w * s.c, k = s.kw * s.c;
  const float* xr = x + (n * s.h + oh * s.stride) * row;
  float* yr = y + (n * s.ho + oh) * s.wo * s.cout;
  const int64_t tiles = (s.wo + kStemPixels512 - 1) / kStemPixels512;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t ow = t * s.wo / tiles, pixels = (t + 1) * s.wo / tiles - ow;
    const float* xp = xr + ow * kStep;
    for (int64_t j = 0; j < s.cout; j += 32) {
      const float* wp = wb + j * s.kh * k;  // panels j / 16 and j / 16 + 1
      const float* bp = bias == nullptr ? nullptr : bias + j;
      float* yp = yr + ow * s.cout + j;
      switch (pixels) {
#define RESNEXT_CASE(r) \
        case r: StemTile512<kStep, r>(xp, row, s.kh, k, wp, bp, relu, yp, s.cout); break;
        RESNEXT_CASE(12) RESNEXT_CASE(11) RESNEXT_CASE(10) RESNEXT_CASE(9) RESNEXT_CASE(8)
        RESNEXT_CASE(7) RESNEXT_CASE(6) RESNEXT_CASE(5) RESNEXT_CASE(4) RESNEXT_CASE(3)
        RESNEXT_CASE(2)
        default: StemTile512<kStep, 1>(xp, row, s.kh, k, wp, bp, relu, yp, s.cout); break;
#undef RESNEXT_CASE
      }
    }
  }
}

// One output row (n, oh), every panel.
RESNEXT_AVX2 void StemRow(const Shape& s, const float* x, const float* wb, const float* bias,
                          bool relu, float* y, int64_t n, int64_t oh) {
  const int64_t row = s.w * s.c, step = s.stride * s.c, k = s.kw * s.c;
  const float* xr = x + (n * s.h + oh * s.stride) * row;
  float* yr = y + (n * s.ho + oh) * s.wo * s.cout;
  for (int64_t ow = 0; ow < s.wo; ow += kStemPixels) {
    const float* xp = xr + ow * step;
    for (int64_t j = 0; j < s.cout; j += 16) {
      const float* wp = wb + j * s.kh * k;  // panel j / 16: kh * k * 16 floats
      const float* bp = bias == nullptr ? nullptr : bias + j;
      float* yp = yr + ow * s.cout + j;
      switch (std::min<int64_t>(kStemPixels, s.wo - ow)) {
        case 6: StemTile<6>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
        case 5: StemTile<5>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
        case 4: StemTile<4>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
        case 3: StemTile<3>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
        case 2: StemTile<2>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
        default: StemTile<1>(xp, row, step, s.kh, k, wp, bp, relu, yp, s.cout); break;
      }
    }
  }
}

// XLA's max of two vectors, except NaN (tracked apart, see PoolRow): the larger value, +0 over
// -0. vmaxps returns its second operand on a tie, so the two orders differ only for equal
// values, where their bitwise AND is the value itself, or +0 for a pair of zeros.
RESNEXT_AVX2 inline __m256 MaxNoNan(__m256 a, __m256 b) {
  return _mm256_and_ps(_mm256_max_ps(a, b), _mm256_max_ps(b, a));
}

inline float MaxNoNan(float a, float b) {
  if (a == b) return a == 0.f ? (std::signbit(a) ? b : a) : a;
  return a > b ? a : b;
}

struct PoolShape {
  int64_t n, h, w, c, window, stride, padding, ho, wo;
};

// One output row (n, oh) of the max-pool.
RESNEXT_AVX2 void PoolRow(const PoolShape& p, const float* x, float* y, int64_t n, int64_t oh) {
  const int64_t top = oh * p.stride - p.padding;
  const int64_t i0 = std::max<int64_t>(0, top), i1 = std::min(p.h, top + p.window);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t ow = 0; ow < p.wo; ++ow) {
    const int64_t left = ow * p.stride - p.padding;
    const int64_t j0 = std::max<int64_t>(0, left), j1 = std::min(p.w, left + p.window);
    float* yp = y + ((n * p.ho + oh) * p.wo + ow) * p.c;
    int64_t ch = 0;
    for (; ch + 8 <= p.c; ch += 8) {
      __m256 acc = _mm256_set1_ps(-inf), isnan = _mm256_setzero_ps();
      for (int64_t i = i0; i < i1; ++i) {
        const float* xr = x + ((n * p.h + i) * p.w) * p.c + ch;
        for (int64_t j = j0; j < j1; ++j) {
          const __m256 v = _mm256_loadu_ps(xr + j * p.c);
          isnan = _mm256_or_ps(isnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          acc = MaxNoNan(acc, v);
        }
      }
      _mm256_storeu_ps(yp + ch, _mm256_blendv_ps(acc, _mm256_set1_ps(nan), isnan));
    }
    for (; ch < p.c; ++ch) {
      float acc = -inf;
      bool any_nan = false;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          const float v = x[((n * p.h + i) * p.w + j) * p.c + ch];
          any_nan |= std::isnan(v);
          acc = MaxNoNan(acc, v);
        }
      yp[ch] = any_nan ? nan : acc;
    }
  }
}

// Items of whole output rows, at least ~16K outputs each (the thread pool's per-item cost).
template <typename F>
void ForRows(ffi::ThreadPool* pool, int64_t rows, int64_t per_row, const F& row_fn) {
  const int64_t chunk = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, per_row));
  const int64_t items = (rows + chunk - 1) / chunk;
  ParallelFor(pool, g_max_helpers.load(), items, [&](int64_t item) {
    for (int64_t r = item * chunk; r < std::min(rows, (item + 1) * chunk); ++r) row_fn(r);
  });
}

#endif  // RESNEXT_X86

ffi::Error Unsupported(const char* what) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    std::string(what) + ": this CPU lacks AVX2/FMA (or is not x86-64)");
}

// y = relu?(conv(x, w) + bias?): x (n, h, w, c) already padded; w blocked (cout/16, kh, kw, c,
// 16); `rest` holds the bias (cout,) or nothing.
ffi::Error StemConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                    bool relu) {
  Shape s;
  if (ffi::Error err = ReadShape(x, w, y, stride, 0, 1, 16, s); err.failure()) return err;
  if (!DenseBlocks(s)) return ffi::Error::InvalidArgument("stem conv: expected 16-channel panels");
  const float* bias = nullptr;
  if (rest.size() > 1) return ffi::Error::InvalidArgument("stem conv: too many operands");
  if (rest.size() == 1) {
    auto b = rest.get<ffi::Buffer<ffi::F32>>(0);
    if (b.has_error()) return b.error();
    const auto bd = b->dimensions();
    if (bd.size() != 1 || bd[0] != s.cout)
      return ffi::Error::InvalidArgument("stem conv: bias must be (cout,)");
    bias = b->typed_data();
  }
  if (!kAvx2) return Unsupported("stem conv");
  if (s.ho <= 0 || s.wo <= 0 || s.n == 0 || s.cout == 0) return ffi::Error::Success();
#if RESNEXT_X86
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t step = s.stride * s.c;
  const bool avx512 = g_gemm_avx512.load() && s.cout % 32 == 0 && (step == 6 || step == 3);
  ForRows(&pool, s.n * s.ho, s.wo * s.cout * s.kh * s.kw * s.c / 16, [&](int64_t r) {
    if (avx512 && step == 6)
      StemRow512<6>(s, xp, wp, bias, relu, yp, r / s.ho, r % s.ho);
    else if (avx512)
      StemRow512<3>(s, xp, wp, bias, relu, yp, r / s.ho, r % s.ho);
    else
      StemRow(s, xp, wp, bias, relu, yp, r / s.ho, r % s.ho);
  });
#endif
  return ffi::Error::Success();
}

ffi::Error MaxPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                   int64_t window, int64_t stride, int64_t padding) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("max pool: expected NHWC input and output");
  if (window <= 0 || stride <= 0 || padding < 0)
    return ffi::Error::InvalidArgument("max pool: window and stride must be > 0, padding >= 0");
  PoolShape p{xd[0], xd[1], xd[2], xd[3], window, stride, padding, 0, 0};
  p.ho = (p.h + 2 * padding - window) / stride + 1;
  p.wo = (p.w + 2 * padding - window) / stride + 1;
  if (yd[0] != p.n || yd[1] != p.ho || yd[2] != p.wo || yd[3] != p.c)
    return ffi::Error::InvalidArgument("max pool: output shape does not match");
  if (!kAvx2) return Unsupported("max pool");
  if (p.ho <= 0 || p.wo <= 0 || p.n == 0 || p.c == 0) return ffi::Error::Success();
#if RESNEXT_X86
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  ForRows(&pool, p.n * p.ho, p.wo * p.c, [&](int64_t r) {
    PoolRow(p, xp, yp, r / p.ho, r % p.ho);
  });
#endif
  return ffi::Error::Success();
}

}  // namespace
}  // namespace resnext

using resnext::MaxPool;
using resnext::StemConv;

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextStemConv, StemConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
