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
// for kh = kw = 1 are 16-column panels [cout/16][c][16]: see gemm.cc. Shared pieces (the
// shape, the CPU check, the work loop on the thread pool) are in common.h.

#include "common.h"

namespace resnext {
namespace {

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

// Writes 8 output channels (from column `col`) with the epilogue: + bias, then ReLU.
RESNEXT_AVX2 inline void Store8(float* dst, __m256 v, const Epilogue& ep, int64_t col) {
  if (ep.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias + col));
  // max(0, v): returns v where it is NaN, as XLA's max does.
  if (ep.relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
  _mm256_storeu_ps(dst, v);
}

// ---- 4 channels per group: unit u is output (and input) channels [8u, 8u + 8), two groups.
// Blocked kernel: [unit][tap][c][8].
template <int P>
RESNEXT_AVX2 inline void D4Block(const Shape& s, const float* const (&ptr)[9][kMaxP],
                                 const float* wb, float* y, int64_t q0, int64_t u,
                                 const Epilogue& ep) {
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
  for (int p = 0; p < P; ++p) Store8(y + (q0 + p) * s.cout + 8 * u, acc[p], ep, 8 * u);
}

// ---- unit a multiple of 8 output channels: a group (unit == dout), or in a dense conv a
// block of 16 output channels (unit == 16, groups == 1); output vectors [j, j + V) of unit u.
// Blocked kernel: [unit][tap][c][unit channels].
template <int P, int V>
RESNEXT_AVX2 inline void BcastBlock(const Shape& s, const float* const (&ptr)[9][kMaxP],
                                    const float* wb, float* y, int64_t q0, int64_t u,
                                    int64_t j, const Epilogue& ep) {
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
      Store8(y + (q0 + p) * s.cout + u * unit + 8 * (j + q), acc[p][q], ep,
             u * unit + 8 * (j + q));
}

template <int P>
RESNEXT_AVX2 void PixelBlock(const Shape& s, bool d4, const float* x, const float* zero,
                             const float* wb, float* y, int64_t q0, int64_t u0, int64_t u1,
                             const Epilogue& ep) {
  const float* ptr[9][kMaxP];
  TapPointers<P>(s, x, zero, q0, ptr);
  for (int64_t u = u0; u < u1; ++u) {
    if (d4) {
      D4Block<P>(s, ptr, wb, y, q0, u, ep);
      continue;
    }
    const int64_t vectors = s.unit / 8;
    int64_t j = 0;
    // Pairs of vectors in a 6x16 tile where P <= 6; 8 pixels take one vector at a time (an
    // 8x8 tile), as a 6-wide pair tile would leave two of the eight pixels unwritten.
    if constexpr (P <= 6)
      for (; j + 2 <= vectors; j += 2) BcastBlock<P, 2>(s, ptr, wb, y, q0, u, j, ep);
    for (; j < vectors; ++j) BcastBlock<P, 1>(s, ptr, wb, y, q0, u, j, ep);
  }
}

// Output pixels [q0, q1) for units [u0, u1).
RESNEXT_AVX2 void VectorRange(const Shape& s, bool d4, const float* x, const float* zero,
                              const float* wb, float* y, int64_t q0, int64_t q1, int64_t u0,
                              int64_t u1, const Epilogue& ep) {
  // 6 pixels per block where a unit has a multiple of 16 outputs (a 6x2 register tile), else 8.
  const int P = (!d4 && s.unit % 16 == 0) ? 6 : 8;
  int64_t q = q0;
  if (P == 6) {
    for (; q + 6 <= q1; q += 6) PixelBlock<6>(s, d4, x, zero, wb, y, q, u0, u1, ep);
  } else {
    for (; q + 8 <= q1; q += 8) PixelBlock<8>(s, d4, x, zero, wb, y, q, u0, u1, ep);
  }
  if (q + 4 <= q1) { PixelBlock<4>(s, d4, x, zero, wb, y, q, u0, u1, ep); q += 4; }
  if (q + 2 <= q1) { PixelBlock<2>(s, d4, x, zero, wb, y, q, u0, u1, ep); q += 2; }
  if (q < q1) PixelBlock<1>(s, d4, x, zero, wb, y, q, u0, u1, ep);
}

#endif  // RESNEXT_X86

// Scalar form for any shape: output pixels [q0, q1), units [u0, u1).
void ScalarRange(const Shape& s, const float* x, const float* wb, float* y, int64_t q0,
                 int64_t q1, int64_t u0, int64_t u1, const Epilogue& ep) {
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
      if (ep.bias != nullptr) acc += ep.bias[o];
      if (ep.relu) acc = acc < 0.f ? 0.f : acc;  // keeps NaN, as XLA's max does
      y[q * s.cout + o] = acc;
    }
  }
}

// The conv into y, then the epilogue (bias, ReLU; no residual) as it is written.
ffi::Error RunDirectConv(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                         ffi::Buffer<ffi::F32>& w, ffi::ResultBuffer<ffi::F32>& y,
                         int64_t stride, int64_t padding, int64_t groups, int64_t unit,
                         const Epilogue& epilogue) {
  Shape s;
  if (ffi::Error err = ReadShape(x, w, y, stride, padding, groups, unit, s); err.failure())
    return err;
  if (s.ho <= 0 || s.wo <= 0 || s.n == 0 || s.cout == 0) return ffi::Error::Success();

  const Form form = ChooseForm(s, kAvx2);
  const int64_t pixels = s.n * s.ho * s.wo;
#if RESNEXT_X86
  if (form == Form::kGemm) {
    GemmConv(&pool, s, x.typed_data(), w.typed_data(), y->typed_data(), epilogue);
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
      VectorRange(s, form == Form::kD4, xp, zero.data(), wp, yp, q0, q1, u0, u1, epilogue);
      return;
    }
#endif
    ScalarRange(s, xp, wp, yp, q0, q1, u0, u1, epilogue);
  };
  ParallelFor(&pool, g_max_helpers.load(), chunks * blocks, run);
  return ffi::Error::Success();
}

ffi::Error DirectConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding,
                      int64_t groups, int64_t unit) {
  return RunDirectConv(pool, x, w, y, stride, padding, groups, unit, Epilogue{});
}

// The conv with a folded BatchNorm's bias and a ReLU applied as the output is written
// (saves XLA a pass over it).
ffi::Error DirectConvBiasAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias,
                             ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding,
                             int64_t groups, int64_t unit, bool relu) {
  const auto bd = bias.dimensions(), yd = y->dimensions();
  if (bd.size() != 1 || yd.size() != 4 || bd[0] != yd[3])
    return ffi::Error::InvalidArgument("conv: bias must be (cout,)");
  Epilogue epilogue;
  epilogue.bias = bias.typed_data();
  epilogue.relu = relu;
  return RunDirectConv(pool, x, w, y, stride, padding, groups, unit, epilogue);
}

}  // namespace
}  // namespace resnext

using resnext::DirectConv;
using resnext::DirectConvBiasAct;

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextDirectConvBiasAct, DirectConvBiasAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("unit")
                                  .Attr<bool>("relu"));

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
extern "C" int resnext_direct_conv_vectorized() { return resnext::kAvx2 ? 1 : 0; }

// Benchmarks: cap the helper threads taken from XLA's pool (0: the calling thread alone).
extern "C" void resnext_direct_conv_set_helpers(int helpers) {
  resnext::g_max_helpers.store(helpers);
}
