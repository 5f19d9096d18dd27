// Dense 1x1 convolutions as a packed GEMM with a bias/residual/ReLU epilogue, as an XLA
// typed-FFI handler (the weights come in the direct kernel's dense layout, see direct_conv.cc).

#include "common.h"

namespace resnext {
namespace {

#if RESNEXT_X86

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

}  // namespace

#if RESNEXT_X86
// A 1x1 conv as a GEMM, in items of (kGemmMc rows, a block of columns): at least ~8 items, so
// that small maps (batch 1, 7x7) still spread over the threads, and at most kGemmMaxNc
// columns per block.
void GemmConv(ffi::ThreadPool* pool, const Shape& s, const float* x, const float* wb,
              float* y, const Epilogue& epilogue) {
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

namespace {

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
}  // namespace resnext

using resnext::PointwiseConv;

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
