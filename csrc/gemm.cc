// Dense 1x1 convolutions as a packed GEMM with a bias/residual/ReLU epilogue, as an XLA
// typed-FFI handler (the weights come in the direct kernel's dense layout, see direct_conv.cc).

#include "common.h"

// GCC 12's _mm512_max_ps passes an undefined vector as the unused source of its masked form.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace resnext {
namespace {

#if RESNEXT_X86

// The epilogue of the tile at column `col`, element `offset` of the output (and residual).
inline Epilogue AtTile(const Epilogue& epilogue, int64_t col, int64_t offset) {
  Epilogue here;
  if (epilogue.bias) here.bias = epilogue.bias + col;
  if (epilogue.residual) here.residual = epilogue.residual + offset;
  here.relu = epilogue.relu;
  return here;
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
        const Epilogue here = AtTile(epilogue, j, offset);
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


// ---- The AVX-512 form (CPUs with AVX-512F): a register tile of up to 12 rows x 32 columns
// (24 of the 32 zmm accumulators) that broadcasts A straight from the input, unpacked. A 1x1
// conv reads each output pixel's channels contiguously, so one pointer per row is all A needs
// (a strided conv too): nothing is copied per item, which on few rows (batch 1, 7x7 maps) or
// few columns would cost as much as the arithmetic. Each zmm FMA does the work of two AVX2
// ones with half the instructions and loads.
#define RESNEXT_AVX512 __attribute__((target("avx512f,avx2,fma")))

constexpr int kTileRows = 12;
constexpr int64_t kKc512 = 256, kMc512 = 96;

// Floats between a tile's rows where they are copied (RowsOfA): a slice of channels plus a
// cache line, so that the rows fall in different L1 sets.
constexpr int64_t kCopiedLd = kKc512 + 16;

// Where a register tile reads its rows of A: in the input, one pointer per row (channel k0 of
// row r at rows[r] + k0), or, where those rows would share one L1 set, copied to `copied`
// (channel k0 + k of row r at copied[r * kCopiedLd + k]). The copy's fixed row stride also
// lets every row be addressed from one register, where twelve pointers do not fit in the
// general registers.
struct RowsOfA {
  const float* const* rows = nullptr;
  const float* copied = nullptr;
};

#define RESNEXT_ROWS12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// Row r, vector v of a tile's output: added to y unless `first`, then the epilogue, stored.
// Always inlined: an out-of-line call per vector costs as much as a short channel loop.
__attribute__((always_inline, target("avx512f,avx2,fma"))) inline void Finish512(
    __m512 acc, float* y, int64_t ldy, int r, int v, bool first, const Epilogue* ep) {
  float* yr = y + r * ldy + 16 * v;
  if (!first) acc = _mm512_add_ps(acc, _mm512_loadu_ps(yr));
  if (ep != nullptr) {
    if (ep->bias != nullptr) acc = _mm512_add_ps(acc, _mm512_loadu_ps(ep->bias + 16 * v));
    if (ep->residual != nullptr)
      acc = _mm512_add_ps(acc, _mm512_loadu_ps(ep->residual + r * ldy + 16 * v));
    // max(0, acc): returns acc where it is NaN, as XLA's max does.
    if (ep->relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);
  }
  _mm512_storeu_ps(yr, acc);
}

// y[R rows, 16 V columns] (+)= A[rows, k0 : k0 + kc] * B; B is one or two 16-column panels
// (b0, b1) at channel k0. Adds into y unless `first`; applies `ep` (offset to this tile)
// unless null.
template <int R, int V, bool kCopied>
RESNEXT_AVX512 void Tile512(int64_t kc, const RowsOfA& a, int64_t k0, const float* b0,
                            const float* b1, float* y, int64_t ldy, bool first,
                            const Epilogue* ep) {
#define RESNEXT_DECL(r)                                                          \
  __m512 acc##r##0 = _mm512_setzero_ps(), acc##r##1 = _mm512_setzero_ps();      \
  const float* a##r = r >= R ? nullptr                                           \
                      : kCopied ? a.copied + r * kCopiedLd : a.rows[r] + k0;
  RESNEXT_ROWS12(RESNEXT_DECL)
#undef RESNEXT_DECL
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(b0 + k * 16);
    const __m512 w1 = V > 1 ? _mm512_loadu_ps(b1 + k * 16) : w0;
#define RESNEXT_STEP(r)                                                   \
    if constexpr (r < R) {                                                \
      const __m512 a = _mm512_set1_ps(a##r[k]);                           \
      acc##r##0 = _mm512_fmadd_ps(a, w0, acc##r##0);                      \
      if constexpr (V > 1) acc##r##1 = _mm512_fmadd_ps(a, w1, acc##r##1); \
    }
    RESNEXT_ROWS12(RESNEXT_STEP)
#undef RESNEXT_STEP
  }
#define RESNEXT_STORE(r)                               \
  if constexpr (r < R) {                               \
    Finish512(acc##r##0, y, ldy, r, 0, first, ep);     \
    if constexpr (V > 1) Finish512(acc##r##1, y, ldy, r, 1, first, ep); \
  }
  RESNEXT_ROWS12(RESNEXT_STORE)
#undef RESNEXT_STORE
}

#undef RESNEXT_ROWS12

template <int V, bool kCopied>
RESNEXT_AVX512 void Tile512Rows(int rows_here, int64_t kc, const RowsOfA& rows, int64_t k0,
                                const float* b0, const float* b1, float* y, int64_t ldy,
                                bool first, const Epilogue* ep) {
  switch (rows_here) {
#define RESNEXT_CASE(r) \
    case r: Tile512<r, V, kCopied>(kc, rows, k0, b0, b1, y, ldy, first, ep); break;
    RESNEXT_CASE(12) RESNEXT_CASE(11) RESNEXT_CASE(10) RESNEXT_CASE(9) RESNEXT_CASE(8)
    RESNEXT_CASE(7) RESNEXT_CASE(6) RESNEXT_CASE(5) RESNEXT_CASE(4) RESNEXT_CASE(3)
    RESNEXT_CASE(2) default: Tile512<1, V, kCopied>(kc, rows, k0, b0, b1, y, ldy, first, ep);
#undef RESNEXT_CASE
  }
}

// The tile at row i, columns j (one or two panels), over channels [k0, k0 + kc).
template <int V>
RESNEXT_AVX512 void Tile512At(int rows_here, int64_t kc, const RowsOfA& rows, int64_t k0,
                              const float* b0, const float* b1, float* y, int64_t ldy,
                              bool first, const Epilogue* ep) {
  if (rows.copied != nullptr)
    Tile512Rows<V, true>(rows_here, kc, rows, k0, b0, b1, y, ldy, first, ep);
  else
    Tile512Rows<V, false>(rows_here, kc, rows, k0, b0, b1, y, ldy, first, ep);
}

// Output rows [q0, q0 + rows) (rows <= kMc512), columns [n0, n0 + nc) (multiples of 16), all
// input channels; the epilogue goes with the last slice of channels.
RESNEXT_AVX512 void GemmBlock512(const Shape& s, const float* x, const float* wb, float* y,
                                 const Epilogue& epilogue, int64_t q0, int64_t rows,
                                 int64_t n0, int64_t nc) {
  const float* row_ptr[kMc512];
  int64_t n = q0 / (s.ho * s.wo), oh = (q0 / s.wo) % s.ho, ow = q0 % s.wo;
  for (int64_t i = 0; i < rows; ++i) {
    row_ptr[i] = x + ((n * s.h + oh * s.stride) * s.w + ow * s.stride) * s.c;
    if (++ow == s.wo) {
      ow = 0;
      if (++oh == s.ho) oh = 0, ++n;
    }
  }
  const bool any_epilogue = epilogue.bias || epilogue.residual || epilogue.relu;
  // Neighbouring rows of A are c x stride floats apart. Where that is a multiple of 4 KiB
  // (c = 1024, 2048; 512 at stride 2), a tile's twelve rows fall in one L1 set, which holds
  // eight lines, and evict each other on every column panel: each tile's slice is copied
  // once to rows that do not. Elsewhere the rows are read in place.
  const bool copy_rows = (s.c * s.stride * sizeof(float)) % 4096 == 0;
  alignas(64) float copied[kTileRows * kCopiedLd];
  for (int64_t k0 = 0; k0 < s.c; k0 += kKc512) {
    const int64_t kc = std::min(kKc512, s.c - k0);
    const bool last = k0 + kc >= s.c;
    // A row tile's slice of A (12 rows x 256 channels) stays in L1 while the columns' panels
    // stream past it from L2.
    for (int64_t i = 0; i < rows; i += kTileRows) {
      const int rows_here = static_cast<int>(std::min<int64_t>(kTileRows, rows - i));
      RowsOfA a;
      a.rows = row_ptr + i;
      if (copy_rows) {
        for (int r = 0; r < rows_here; ++r)
          std::memcpy(copied + r * kCopiedLd, row_ptr[i + r] + k0, kc * sizeof(float));
        a.copied = copied;
      }
      for (int64_t j = n0; j < n0 + nc; j += 32) {
        const float* b0 = wb + (j / 16) * s.c * 16 + k0 * 16;
        const float* b1 = b0 + s.c * 16;
        const int64_t offset = (q0 + i) * s.cout + j;
        const Epilogue here = AtTile(epilogue, j, offset);
        const Epilogue* ep = last && any_epilogue ? &here : nullptr;
        if (j + 32 <= n0 + nc)
          Tile512At<2>(rows_here, kc, a, k0, b0, b1, y + offset, s.cout, k0 == 0, ep);
        else
          Tile512At<1>(rows_here, kc, a, k0, b0, b1, y + offset, s.cout, k0 == 0, ep);
      }
    }
  }
}

bool CpuHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

#endif  // RESNEXT_X86

}  // namespace

#if RESNEXT_X86
RESNEXT_HIDDEN std::atomic<bool> g_gemm_avx512{CpuHasAvx512()};

// A 1x1 conv as a GEMM, in items of (a block of rows, a block of columns): at least ~8 items,
// so that small maps (batch 1, 7x7) still spread over the threads, and at most kGemmMaxNc
// columns per block (an even number of panels where there are several, for the 32-column
// tile).
void GemmConv(ffi::ThreadPool* pool, const Shape& s, const float* x, const float* wb,
              float* y, const Epilogue& epilogue) {
  const bool avx512 = g_gemm_avx512.load();
  const int64_t mc = avx512 ? kMc512 : kGemmMc;
  const int64_t pixels = s.n * s.ho * s.wo;
  const int64_t row_blocks = (pixels + mc - 1) / mc;
  const int64_t panels = s.cout / 16;
  int64_t col_blocks = std::max((s.cout + kGemmMaxNc - 1) / kGemmMaxNc,
                                (8 + row_blocks - 1) / row_blocks);
  col_blocks = std::min(col_blocks, panels);
  int64_t panels_per_block = (panels + col_blocks - 1) / col_blocks;
  if (avx512 && panels_per_block % 2 && panels_per_block < panels) ++panels_per_block;
  col_blocks = (panels + panels_per_block - 1) / panels_per_block;
  auto run = [&](int64_t item) {
    const int64_t q0 = (item / col_blocks) * mc;
    const int64_t p0 = (item % col_blocks) * panels_per_block;
    const int64_t p1 = std::min(panels, p0 + panels_per_block);
    const int64_t rows = std::min(mc, pixels - q0);
    if (avx512) {
      GemmBlock512(s, x, wb, y, epilogue, q0, rows, p0 * 16, (p1 - p0) * 16);
      return;
    }
    thread_local std::vector<float> packed;
    if (packed.size() < static_cast<size_t>(kGemmMc * kGemmKc)) packed.resize(kGemmMc * kGemmKc);
    GemmBlock(s, x, wb, y, epilogue, q0, rows, p0 * 16, (p1 - p0) * 16, packed.data());
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
  if (s.ho <= 0 || s.wo <= 0 || s.n == 0 || s.cout == 0) return ffi::Error::Success();
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

// Tests: 0 runs the GEMM's and the stem's AVX2 forms on a CPU with AVX-512 (1: the AVX-512
// forms where the CPU has it). Returns whether the AVX-512 forms were on before.
extern "C" int resnext_gemm_set_avx512(int on) {
#if RESNEXT_X86
  return resnext::g_gemm_avx512.exchange(on != 0 && resnext::CpuHasAvx512()) ? 1 : 0;
#else
  (void)on;
  return 0;
#endif
}
