// 2-D convolution (NHWC float32 input, HWIO kernel, any groups) through oneDNN's
// convolution_forward, as an XLA typed-FFI handler.
//
// oneDNN picks its kernel's weight layout ("any"); the HWIO kernel is reordered into it on
// every call (0.05-1 ms, small next to the conv: benchmarks/conv_kernels.py), unless the weight
// cache is on (a benchmark switch, off by default), in which case the reordered weights of a
// kernel are kept per (buffer address, shape) and reused while the kernel's bytes are
// unchanged (checked with a full compare against a kept copy).
// Source and destination stay plain NHWC, so no activation reorders. Primitives are created
// once per shape and kept. Scratchpads are user-managed (thread-local buffers), so concurrent
// calls from several XLA threads are safe.
//
// This file does not link libdnnl: its dnnl_* symbols are resolved when it is loaded, from a
// libdnnl.so.3 loaded before it with RTLD_GLOBAL (the Python side does this).

#include <omp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Clock = std::chrono::steady_clock;

// n, h, w, c, kh, kw, d, cout, stride, padding, groups
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t>;

struct Entry {
  dnnl::convolution_forward prim;
  dnnl::memory::desc src, user_weights, weights, dst, scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weight_reorder;
  size_t scratchpad_bytes = 0;
  std::string impl;
};

struct CachedWeights {
  std::vector<char> source;  // the HWIO bytes the reordered copy was made from
  void* reordered = nullptr;
  size_t bytes = 0;
  ~CachedWeights() { std::free(reordered); }
};

struct Stats {
  double create_s = 0, reorder_s = 0, exec_s = 0;
  int64_t calls = 0, creates = 0, reorders = 0;
};

std::mutex g_mu;
std::map<Key, std::shared_ptr<Entry>>* g_entries = new std::map<Key, std::shared_ptr<Entry>>;
std::map<std::pair<const void*, Key>, std::shared_ptr<CachedWeights>>* g_weights =
    new std::map<std::pair<const void*, Key>, std::shared_ptr<CachedWeights>>;
Stats g_stats;
int g_threads = 0;          // omp threads per call; 0: OpenMP's default
bool g_weight_cache = false;
bool g_timing = false;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Grow-only 64-byte aligned buffer, one per calling thread.
struct Buffer {
  void* ptr = nullptr;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(ptr);
      size = (bytes + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(64, size);
    }
    return ptr;
  }
  ~Buffer() { std::free(ptr); }
};
thread_local Buffer t_weights, t_scratch;

std::shared_ptr<Entry> Create(const Key& key) {
  auto [n, h, w, c, kh, kw, d, cout, stride, pad, groups] = key;
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  const int64_t ho = (h + 2 * pad - kh) / stride + 1, wo = (w + 2 * pad - kw) / stride + 1;
  auto e = std::make_shared<Entry>();
  e->src = dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  e->dst = dnnl::memory::desc({n, cout, ho, wo}, dt::f32, tag::nhwc);
  // HWIO: element [i][j][k][o] at ((i * kw + j) * d + k) * cout + o, o = g * dout + od.
  const int64_t dout = cout / groups;
  dnnl::memory::dims wdims, wstrides;
  if (groups > 1) {
    wdims = {groups, dout, d, kh, kw};
    wstrides = {dout, 1, cout, kw * d * cout, d * cout};
  } else {
    wdims = {cout, d, kh, kw};
    wstrides = {1, cout, kw * d * cout, d * cout};
  }
  e->user_weights = dnnl::memory::desc(wdims, dt::f32, wstrides);
  auto any_weights = dnnl::memory::desc(wdims, dt::f32, tag::any);
  const int64_t pad_r_h = (ho - 1) * stride + kh - h - pad;
  const int64_t pad_r_w = (wo - 1) * stride + kw - w - pad;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      e->src, any_weights, e->dst, {stride, stride}, {pad, pad}, {pad_r_h, pad_r_w}, attr);
  e->weights = pd.weights_desc();
  e->prim = dnnl::convolution_forward(pd);
  e->scratchpad = pd.scratchpad_desc();
  e->scratchpad_bytes = e->scratchpad.get_size();
  e->impl = pd.impl_info_str();
  e->reorder_weights = e->weights != e->user_weights;
  if (e->reorder_weights) {
    e->weight_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), e->user_weights, Engine(), e->weights));
  }
  return e;
}

std::shared_ptr<Entry> Get(const Key& key) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_entries->find(key);
    if (it != g_entries->end()) return it->second;
  }
  const auto t0 = Clock::now();
  auto e = Create(key);
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  std::lock_guard<std::mutex> lock(g_mu);
  g_stats.create_s += dt;
  g_stats.creates += 1;
  return g_entries->emplace(key, e).first->second;  // a racing creator's entry wins: fine
}

void Reorder(const Entry& e, dnnl::stream& stream, const float* w, void* out) {
  dnnl::memory src(e.user_weights, Engine(), const_cast<float*>(w));
  dnnl::memory dst(e.weights, Engine(), out);
  e.weight_reorder.execute(stream, src, dst);
}

// The reordered weights for this call: from the cache when enabled and unchanged.
void* Weights(const Entry& e, const Key& key, dnnl::stream& stream, const float* w,
              std::shared_ptr<CachedWeights>* keep) {
  const size_t bytes = e.weights.get_size();
  if (!g_weight_cache) {
    void* out = t_weights.Get(bytes);
    Reorder(e, stream, w, out);
    return out;
  }
  const size_t source_bytes = e.user_weights.get_size();
  std::shared_ptr<CachedWeights> cached;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    // Keyed by buffer address: bound it, since new parameter buffers keep arriving.
    if (g_weights->size() >= 1024) g_weights->clear();
    auto& slot = (*g_weights)[{w, key}];
    if (!slot) slot = std::make_shared<CachedWeights>();
    cached = slot;
  }
  // Concurrent calls on the same kernel buffer: serialize on the entry (rare).
  static std::mutex weights_mu;
  std::lock_guard<std::mutex> lock(weights_mu);
  if (cached->reordered == nullptr || cached->source.size() != source_bytes ||
      std::memcmp(cached->source.data(), w, source_bytes) != 0) {
    if (cached->reordered == nullptr) cached->reordered = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    cached->source.assign(reinterpret_cast<const char*>(w),
                          reinterpret_cast<const char*>(w) + source_bytes);
    Reorder(e, stream, w, cached->reordered);
    cached->bytes = bytes;
  }
  *keep = cached;
  return cached->reordered;
}

ffi::Error OnednnConv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding,
                      int64_t groups) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv: expected rank-4 NHWC input, HWIO kernel");
  const int64_t n = xd[0], h = xd[1], wi = xd[2], c = xd[3];
  const int64_t kh = wd[0], kw = wd[1], d = wd[2], cout = wd[3];
  if (groups <= 0 || stride <= 0 || padding < 0 || c != d * groups || cout % groups)
    return ffi::Error::InvalidArgument("conv: inconsistent channels, groups or stride");
  const int64_t ho = (h + 2 * padding - kh) / stride + 1;
  const int64_t wo = (wi + 2 * padding - kw) / stride + 1;
  if (yd[0] != n || yd[1] != ho || yd[2] != wo || yd[3] != cout)
    return ffi::Error::InvalidArgument("conv: output shape does not match");
  if (n == 0 || ho <= 0 || wo <= 0) return ffi::Error::Success();
  const Key key{n, h, wi, c, kh, kw, d, cout, stride, padding, groups};
  try {
    if (g_threads > 0) omp_set_num_threads(g_threads);
    auto e = Get(key);
    thread_local dnnl::stream stream(Engine());
    const bool timing = g_timing;
    auto t0 = Clock::now();
    void* weights = const_cast<float*>(w.typed_data());
    std::shared_ptr<CachedWeights> keep;
    if (e->reorder_weights) weights = Weights(*e, key, stream, w.typed_data(), &keep);
    auto t1 = Clock::now();
    dnnl::memory src(e->src, Engine(), const_cast<float*>(x.typed_data()));
    dnnl::memory wts(e->weights, Engine(), weights);
    dnnl::memory dst(e->dst, Engine(), y->typed_data());
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wts}, {DNNL_ARG_DST, dst}};
    if (e->scratchpad_bytes) {
      args.emplace(DNNL_ARG_SCRATCHPAD,
                   dnnl::memory(e->scratchpad, Engine(), t_scratch.Get(e->scratchpad_bytes)));
    }
    e->prim.execute(stream, args);
    stream.wait();
    if (timing) {
      auto t2 = Clock::now();
      std::lock_guard<std::mutex> lock(g_mu);
      g_stats.reorder_s += std::chrono::duration<double>(t1 - t0).count();
      g_stats.exec_s += std::chrono::duration<double>(t2 - t1).count();
      g_stats.calls += 1;
      g_stats.reorders += e->reorder_weights ? 1 : 0;
    }
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextOnednnConv, OnednnConv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("groups"));

// ---- Controls and introspection for benchmarks (ctypes).

// OpenMP threads oneDNN uses per call (0: OpenMP's default); weight cache on/off; timing.
extern "C" void resnext_onednn_configure(int threads, int weight_cache, int timing) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_threads = threads;
  g_weight_cache = weight_cache != 0;
  g_timing = timing != 0;
}

// create_s, reorder_s, exec_s, calls, creates, reorders; then reset.
extern "C" void resnext_onednn_stats(double* out) {
  std::lock_guard<std::mutex> lock(g_mu);
  out[0] = g_stats.create_s, out[1] = g_stats.reorder_s, out[2] = g_stats.exec_s;
  out[3] = g_stats.calls, out[4] = g_stats.creates, out[5] = g_stats.reorders;
  g_stats = Stats();
}

// Drops cached primitives and weights (to time primitive creation).
extern "C" void resnext_onednn_clear() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_entries->clear();
  g_weights->clear();
}

// The oneDNN implementation chosen for a shape, into buf; returns 0 on success.
extern "C" int resnext_onednn_impl(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh,
                                   int64_t kw, int64_t cout, int64_t stride, int64_t padding,
                                   int64_t groups, char* buf, int64_t size) {
  try {
    auto e = Get(Key{n, h, w, c, kh, kw, c / groups, cout, stride, padding, groups});
    std::snprintf(buf, size, "%s", e->impl.c_str());
    return 0;
  } catch (const dnnl::error& err) {
    std::snprintf(buf, size, "%s", err.what());
    return 1;
  }
}
