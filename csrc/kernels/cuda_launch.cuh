// Host side of the CUDA kernels: launch shapes, workspace layout, and the
// one-time dispatch (activation x pack width x index type) into the
// templates of cuda_kernels.cuh, for one dtype T (typed:: below). Each
// cuda_kernels_<dtype>.cu instantiates it for its dtype, so the kernels of
// the four dtypes compile as four jobs; cuda_kernels.cu holds the entry
// points. Torch-free; see cuda_dispatch.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda_dispatch.h"
#include "cuda_kernels.cuh"

namespace fusedbn {
namespace cuda {
namespace {

// A reduction wants one wave of resident blocks (the occupancy API's count
// for the kernel): enough to saturate DRAM, few enough partials that the
// finalize kernel stays negligible. Elementwise kernels: two waves, so the
// last one's tail is short.
constexpr int64_t kElemWaves = 2;
constexpr int64_t kMaxElemIters = 8;  // kUnroll-pack batches per thread and block
constexpr int64_t kMaxGridY = 65535;
// Values behind one block partial: below 2^24 its count is exact in float.
constexpr int64_t kMaxBlockValues = int64_t(1) << 24;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A device attribute, or `fallback` when it cannot be read: it only shapes
// the launch, and a real failure shows at the first launch.
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, attr, dev) != cudaSuccess ||
      n <= 0) {
    cudaGetLastError();
    return fallback;
  }
  return n;
}

inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount, 132); }

// Blocks of kThreads that one SM can hold at most, whatever the kernel: the
// bound the workspace is sized for before a kernel is picked.
inline int max_resident_blocks() {
  return std::max(1, device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, 2048) / kThreads);
}

// Blocks of `kernel` (kThreads each, no dynamic shared memory) resident per
// SM, from the occupancy API: registers and static shared memory decide it.
template <typename K>
int resident_blocks(K kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess ||
      n <= 0) {
    cudaGetLastError();
    return 1;
  }
  return std::min(n, max_resident_blocks());
}

template <typename T>
constexpr int kPack = int(16 / sizeof(T));

// 16-byte packs when the innermost extent splits into whole packs and every
// pointer is 16-byte aligned (then every row or plane start is too).
template <typename T>
int pack_width(int64_t inner, std::initializer_list<const void*> ptrs) {
  if (inner % kPack<T> != 0) return 1;
  for (const void* q : ptrs)
    if (q && reinterpret_cast<uintptr_t>(q) % 16 != 0) return 1;
  return kPack<T>;
}

// 32-bit indices up to 2^30 elements, not 2^31: the kernels form sums such
// as v0 + chunk that may pass the tensor's end by up to one chunk.
inline bool wide_index(const Shape& s) {
#ifdef FUSEDBN_SIMT
  if (simt::force_wide) return true;  // tests/simt: the int64 kernels on small tensors
#endif
  return s.N * s.C * s.S >= (int64_t(1) << 30);
}

// NSC blocks: BX threads across pack columns (a power of two up to a warp,
// so a warp reads whole rows), BY = kThreads / BX down the rows.
inline int block_x(int64_t Cv) {
  int bx = 1;
  while (bx < 32 && bx < Cv) bx *= 2;
  return bx;
}

struct ReducePlan {
  int vec = 1;
  int64_t inner = 0;  // Sv (NCS) or Cv (NSC), in packs
  int64_t chunk = 0;  // packs of a channel (NCS) or rows (NSC) per block
  int64_t K = 0;      // partials per channel
  int64_t cs = 0, ks = 0;  // partial of channel c, chunk k: c * cs + k * ks
  dim3 grid, block;
};

// blocks: the wave to fill (SMs x resident blocks per SM). K grows with it,
// so a plan for max_resident_blocks() bounds every kernel's partials.
inline ReducePlan plan_reduce(const Shape& s, int vec, int64_t blocks) {
  ReducePlan r;
  r.vec = vec;
  const int64_t target = blocks;
  if (s.layout == Layout::NCS) {
    r.inner = s.S / vec;
    const int64_t Mv = s.N * r.inner;
    int64_t K = ceil_div(target, s.C);
    K = std::min(K, std::max<int64_t>(1, Mv / (kThreads * kUnroll)));
    K = std::max(K, ceil_div(Mv * vec, kMaxBlockValues));
    K = std::min(K, kMaxGridY);
    r.chunk = ceil_div(Mv, K);
    r.K = ceil_div(Mv, r.chunk);
    r.grid = dim3(unsigned(s.C), unsigned(r.K));
    r.block = dim3(kThreads);
    r.cs = r.K;
    r.ks = 1;
  } else {
    r.inner = s.C / vec;
    const int64_t M = s.count();
    const int bx = block_x(r.inner), by = kThreads / bx;
    const int64_t gx = ceil_div(r.inner, bx);
    int64_t K = ceil_div(target, gx);
    K = std::min(K, std::max<int64_t>(1, M / (by * kUnroll)));
    K = std::max(K, ceil_div(M, kMaxBlockValues));
    K = std::min(K, kMaxGridY);
    r.chunk = ceil_div(M, K);
    r.K = ceil_div(M, r.chunk);
    r.grid = dim3(unsigned(gx), unsigned(r.K));
    r.block = dim3(bx, by);
    r.cs = 1;
    r.ks = s.C;
  }
  return r;
}

struct ElemPlan {
  int vec = 1;
  int64_t inner = 0;  // Sv (NCS) or Cv (NSC), in packs
  int64_t total = 0;  // packs in the tensor (NCS)
  int64_t chunk = 0;  // packs (NCS) or rows (NSC) per block
  dim3 grid, block;
};

// blocks: one wave (SMs x resident blocks of the kernel per SM).
inline ElemPlan plan_elem(const Shape& s, int vec, int64_t blocks) {
  ElemPlan e;
  e.vec = vec;
  const int64_t target = blocks * kElemWaves;
  if (s.layout == Layout::NCS) {
    e.inner = s.S / vec;
    e.total = s.N * s.C * e.inner;
    const int64_t per_iter = int64_t(kThreads) * kUnroll;
    const int64_t iters = std::clamp<int64_t>(ceil_div(e.total, per_iter) / target, 1, kMaxElemIters);
    e.chunk = per_iter * iters;
    e.grid = dim3(unsigned(ceil_div(e.total, e.chunk)));
    e.block = dim3(kThreads);
  } else {
    e.inner = s.C / vec;
    const int64_t M = s.count();
    const int bx = block_x(e.inner), by = kThreads / bx;
    const int64_t gx = ceil_div(e.inner, bx);
    const int64_t per_iter = int64_t(by) * kUnroll;
    const int64_t iters = std::clamp<int64_t>(gx * ceil_div(M, per_iter) / target, 1, kMaxElemIters);
    e.chunk = std::max(per_iter * iters, ceil_div(M, kMaxGridY));
    e.grid = dim3(unsigned(gx), unsigned(ceil_div(M, e.chunk)));
    e.block = dim3(bx, by);
  }
  return e;
}

// Grid x is limited to 2^31 - 1 blocks: one per channel (NCS reductions) or
// per pack-column group (NSC).
inline bool grid_fits(const Shape& s) { return s.C <= int64_t(INT32_MAX); }

inline bool empty(const Shape& s) { return s.N == 0 || s.C == 0 || s.S == 0; }

// Workspace: named slices of one allocation, each 256-byte aligned.
struct Carve {
  char* base;
  size_t used = 0;
  template <typename A>
  A* take(int64_t n) {
    A* p = base ? reinterpret_cast<A*>(base + used) : nullptr;
    used += (size_t(n) * sizeof(A) + 255) / 256 * 256;
    return p;
  }
};

// Every kernel launch goes through here: <<<>>> under nvcc; the host build of
// tests/simt (FUSEDBN_SIMT) runs the kernel on the CPU instead. The arguments
// convert to the kernel's parameter types at the call, as with <<<>>>.
template <typename T>
struct LaunchArg {
  using type = T;
};
template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t st,
            typename LaunchArg<P>::type... args) {
#ifdef FUSEDBN_SIMT
  simt::launch(kernel, grid, block, st, args...);
#else
  kernel<<<grid, block, 0, st>>>(args...);
#endif
}

// ------------------------------------------------------- compile-time switches

template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_index(bool wide, F&& f) {
  if (wide) return f(int64_t{});
  return f(int32_t{});
}

template <typename T, typename F>
cudaError_t with_pack(int vec, F&& f) {
  if (vec == kPack<T>) return f(std::integral_constant<int, kPack<T>>{});
  return f(std::integral_constant<int, 1>{});
}

template <bool B>
using Flag = std::integral_constant<bool, B>;
template <int C>
using CountTag = std::integral_constant<int, C>;

// The forward's switches: f(act, pre, Res, Count) with Act the activation
// after the normalization and Pre the one before it (order ActBn), one of
// them IdentityAct. (The glue sends ActBn without a residual.)
template <typename A, typename F>
cudaError_t with_forward_mode(const ForwardParams& p, F&& f) {
  using Id = IdentityAct<A>;
  const bool count = p.activity != nullptr, res = p.residual != nullptr;
  return dispatch_activation<A>(p.act, [&](auto act) {
    // With the identity, ActBn is BnAct except for what activity counts.
    if (p.act.order == Order::ActBn)
      return count ? f(Id{}, act, Flag<false>{}, CountTag<kCountInput>{})
                   : f(Id{}, act, Flag<false>{}, CountTag<kCountNone>{});
    if (count)
      return res ? f(act, Id{}, Flag<true>{}, CountTag<kCountPre>{})
                 : f(act, Id{}, Flag<false>{}, CountTag<kCountPre>{});
    return res ? f(act, Id{}, Flag<true>{}, CountTag<kCountNone>{})
               : f(act, Id{}, Flag<false>{}, CountTag<kCountNone>{});
  });
}

// The backward's switches: f(act, pre, Res, FromOut). FromOut is instantiated
// only for invertible activations; the glue refuses the others, and the
// kernels report an invalid value rather than compute with a wrong inverse.
template <typename A, typename F>
cudaError_t with_backward_mode(const BackwardParams& p, F&& f) {
  using Id = IdentityAct<A>;
  const bool res = p.residual != nullptr;
  return dispatch_activation<A>(p.act, [&](auto act) {
    using Act = decltype(act);
    if (p.act.order == Order::ActBn) return f(Id{}, act, Flag<false>{}, Flag<false>{});
    if constexpr (Act::invertible) {
      if (p.from_output)
        return res ? f(act, Id{}, Flag<true>{}, Flag<true>{})
                   : f(act, Id{}, Flag<false>{}, Flag<true>{});
    } else {
      if (p.from_output) return cudaErrorInvalidValue;
    }
    return res ? f(act, Id{}, Flag<true>{}, Flag<false>{})
               : f(act, Id{}, Flag<false>{}, Flag<false>{});
  });
}

// The forward's statistics see pre(x): its activation, or the identity.
template <typename A, typename F>
cudaError_t with_input_act(const ActParams& a, F&& f) {
  if (a.order == Order::ActBn) return dispatch_activation<A>(a, f);
  return f(IdentityAct<A>{});
}

template <typename T>
const acc_t<T>* acc_ptr(const void* p) {
  return static_cast<const acc_t<T>*>(p);
}

inline int64_t inner_of(const Shape& s) { return s.layout == Layout::NCS ? s.S : s.C; }

// ------------------------------------------------------------------ forward

// The workspace: the statistics' partials, sized for the most partials any
// stats kernel can get (plan_reduce with max_resident_blocks), the pivots,
// and the activity counts.
template <typename T>
struct ForwardWork {
  int vec = 1;
  acc_t<T> *pn = nullptr, *pmean = nullptr, *pm2 = nullptr, *pivot = nullptr;
  int64_t* counts = nullptr;
  size_t bytes = 0;
};

template <typename T>
ForwardWork<T> forward_work(const ForwardParams& p, bool training, void* ws, int sms) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  ForwardWork<T> w;
  Carve carve{static_cast<char*>(ws)};
  if (training) {
    w.vec = pack_width<T>(inner_of(s), {p.x});
    const int64_t n = s.C * plan_reduce(s, w.vec, int64_t(sms) * max_resident_blocks()).K;
    w.pn = carve.take<A>(n);
    w.pmean = carve.take<A>(n);
    w.pm2 = carve.take<A>(n);
    w.pivot = carve.take<A>(s.C);
  }
  if (p.activity) w.counts = carve.take<int64_t>(s.C);
  w.bytes = carve.used;
  return w;
}

// Launches the statistics kernel; `used` gets its plan (the partials' layout).
template <typename T>
cudaError_t launch_stats(const ForwardParams& p, const ForwardWork<T>& w, int sms,
                         cudaStream_t st, ReducePlan& used) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  return with_input_act<A>(p.act, [&](auto pre) {
    using Pre = decltype(pre);
    return with_index(wide_index(s), [&](auto itag) {
      using I = decltype(itag);
      return with_pack<T>(w.vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        if (s.layout == Layout::NCS) {
          auto kernel = stats_ncs_kernel<T, V, I, Pre>;
          const ReducePlan r = used = plan_reduce(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, r.grid, r.block, st, x, I(s.C), I(r.inner), I(s.N * r.inner),
                 I(r.chunk), pre, w.pn, w.pmean, w.pm2, w.pivot);
        } else {
          auto kernel = stats_nsc_kernel<T, V, I, Pre>;
          const ReducePlan r = used = plan_reduce(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, r.grid, r.block, st, x, I(s.count()), I(s.C), I(r.inner), I(r.chunk),
                 pre, w.pn, w.pmean, w.pm2, w.pivot);
        }
        return cudaGetLastError();
      });
    });
  });
}

template <typename T>
cudaError_t launch_finalize_stats(const ForwardParams& p, const ForwardWork<T>& w,
                                  const ReducePlan& r, cudaStream_t st) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const dim3 grid(unsigned(ceil_div(s.C, kFinalizeX))), block(kFinalizeX, kFinalizeY);
  auto go = [&](auto ptag) {
    using P = decltype(ptag);
    launch(finalize_stats_kernel<A, P>, grid, block, st,
        w.pn, w.pmean, w.pm2, w.pivot, s.C, r.K, r.cs, r.ks, static_cast<A*>(p.mean),
        static_cast<A*>(p.invstd), static_cast<P*>(p.running_mean), static_cast<P*>(p.running_var),
        p.eps, p.momentum, p.num_batches_tracked, double(s.count()));
    return cudaGetLastError();
  };
  if (!p.running_mean || !p.running_var) return go(A{});
  return dispatch_dtype(p.running_dtype, go);
}

template <typename T>
cudaError_t launch_normalize(const ForwardParams& p, const ForwardWork<T>& wk, int sms,
                             cudaStream_t st) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const int vec = pack_width<T>(inner_of(s), {p.x, p.y, p.residual});
  // x and y are the same buffer in the in-place forward (see normalize_*_kernel).
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const auto *mean = acc_ptr<T>(p.mean), *invstd = acc_ptr<T>(p.invstd);
  const auto *w = acc_ptr<T>(p.weight), *b = acc_ptr<T>(p.bias);
  return with_forward_mode<A>(p, [&](auto act, auto pre, auto rtag, auto ctag) {
    using Act = decltype(act);
    using Pre = decltype(pre);
    constexpr bool Res = decltype(rtag)::value;
    constexpr int Count = decltype(ctag)::value;
    return with_index(wide_index(s), [&](auto itag) {
      using I = decltype(itag);
      return with_pack<T>(vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        if (s.layout == Layout::NCS) {
          auto kernel = normalize_ncs_kernel<T, V, I, Act, Pre, Res, Count>;
          const ElemPlan e = plan_elem(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, e.grid, e.block, st, x, z, y, I(e.total), I(s.C), I(e.inner),
                 I(e.chunk), mean, invstd, w, b, act, pre, wk.counts);
        } else {
          auto kernel = normalize_nsc_kernel<T, V, I, Act, Pre, Res, Count>;
          const ElemPlan e = plan_elem(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, e.grid, e.block, st, x, z, y, I(s.count()), I(e.inner), I(e.chunk),
                 mean, invstd, w, b, act, pre, wk.counts);
        }
        return cudaGetLastError();
      });
    });
  });
}

inline cudaError_t launch_activity(const ForwardParams& p, const int64_t* counts, cudaStream_t st) {
  const Shape& s = p.shape;
  launch(activity_kernel<float>, dim3(unsigned(ceil_div(s.C, kThreads))), dim3(kThreads), st, counts,
         p.activity, s.C, p.activity_rows, s.count(), p.activity_momentum);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const ForwardParams& p, bool training, void* ws, cudaStream_t st) {
  const int sms = sm_count();
  const ForwardWork<T> w = forward_work<T>(p, training, ws, sms);
  cudaError_t err = cudaSuccess;
  if (training) {
    ReducePlan r;
    err = launch_stats<T>(p, w, sms, st, r);
    if (err == cudaSuccess) err = launch_finalize_stats<T>(p, w, r, st);
  }
  if (err == cudaSuccess && w.counts)
    err = cudaMemsetAsync(w.counts, 0, size_t(p.shape.C) * sizeof(int64_t), st);
  if (err == cudaSuccess) err = launch_normalize<T>(p, w, sms, st);
  if (err == cudaSuccess && w.counts) err = launch_activity(p, w.counts, st);
  return err;
}

// ----------------------------------------------------------------- backward

// The dx pass runs when dx or dz is wanted; dz (= g) exists only with a
// residual.
inline bool wants_dx_pass(const BackwardParams& p) { return p.dx || (p.residual && p.grad_residual); }

// The workspace: the sums' partials (sized as ForwardWork's) and the dx
// coefficients.
template <typename T>
struct BackwardWork {
  int vec = 1;
  acc_t<T> *psg = nullptr, *psgx = nullptr, *k_xh = nullptr, *k_const = nullptr;
  size_t bytes = 0;
};

template <typename T>
BackwardWork<T> backward_work(const BackwardParams& p, void* ws, int sms) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  BackwardWork<T> w;
  w.vec = pack_width<T>(inner_of(s), {p.x, p.dy, p.residual});
  Carve carve{static_cast<char*>(ws)};
  const int64_t n = s.C * plan_reduce(s, w.vec, int64_t(sms) * max_resident_blocks()).K;
  w.psg = carve.take<A>(n);
  w.psgx = carve.take<A>(n);
  if (wants_dx_pass(p)) {
    w.k_xh = carve.take<A>(s.C);
    w.k_const = carve.take<A>(s.C);
  }
  w.bytes = carve.used;
  return w;
}

template <typename T>
cudaError_t launch_sums(const BackwardParams& p, const BackwardWork<T>& w, int sms,
                        cudaStream_t st, ReducePlan& used) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.residual);
  const auto *mean = acc_ptr<T>(p.mean), *invstd = acc_ptr<T>(p.invstd);
  const auto *wt = acc_ptr<T>(p.weight), *b = acc_ptr<T>(p.bias);
  return with_backward_mode<A>(p, [&](auto act, auto pre, auto rtag, auto ftag) {
    using Act = decltype(act);
    using Pre = decltype(pre);
    constexpr bool Res = decltype(rtag)::value, FromOut = decltype(ftag)::value;
    return with_index(wide_index(s), [&](auto itag) {
      using I = decltype(itag);
      return with_pack<T>(w.vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        if (s.layout == Layout::NCS) {
          auto kernel = sums_ncs_kernel<T, V, I, Act, Pre, Res, FromOut>;
          const ReducePlan r = used = plan_reduce(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, r.grid, r.block, st, x, dy, z, I(s.C), I(r.inner), I(s.N * r.inner),
                 I(r.chunk), mean, invstd, wt, b, act, pre, w.psg, w.psgx);
        } else {
          auto kernel = sums_nsc_kernel<T, V, I, Act, Pre, Res, FromOut>;
          const ReducePlan r = used = plan_reduce(s, V, int64_t(sms) * resident_blocks(kernel));
          launch(kernel, r.grid, r.block, st, x, dy, z, I(s.count()), I(s.C), I(r.inner),
                 I(r.chunk), mean, invstd, wt, b, act, pre, w.psg, w.psgx);
        }
        return cudaGetLastError();
      });
    });
  });
}

template <typename T>
cudaError_t launch_finalize_sums(const BackwardParams& p, const BackwardWork<T>& w,
                                 const ReducePlan& r, cudaStream_t st) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const dim3 grid(unsigned(ceil_div(s.C, kFinalizeX))), block(kFinalizeX, kFinalizeY);
  launch(finalize_sums_kernel<A>, grid, block, st,
      w.psg, w.psgx, s.C, r.K, r.cs, r.ks, acc_ptr<T>(p.mean), acc_ptr<T>(p.invstd),
      acc_ptr<T>(p.weight), acc_ptr<T>(p.bias), p.from_output, static_cast<A*>(p.grad_weight),
      static_cast<A*>(p.grad_bias), w.k_xh, w.k_const, p.training, double(s.count()));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dx(const BackwardParams& p, const BackwardWork<T>& w, int sms, cudaStream_t st) {
  using A = acc_t<T>;
  const Shape& s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.residual);
  T* dx = static_cast<T*>(p.dx);
  T* dz = z ? static_cast<T*>(p.grad_residual) : nullptr;  // dz needs a residual
  const int vec = pack_width<T>(inner_of(s), {p.x, p.dy, dx, z, dz});
  const auto *mean = acc_ptr<T>(p.mean), *invstd = acc_ptr<T>(p.invstd);
  const auto *wt = acc_ptr<T>(p.weight), *b = acc_ptr<T>(p.bias);
  return with_backward_mode<A>(p, [&](auto act, auto pre, auto rtag, auto ftag) {
    using Act = decltype(act);
    using Pre = decltype(pre);
    constexpr bool Res = decltype(rtag)::value, FromOut = decltype(ftag)::value;
    return with_index(wide_index(s), [&](auto itag) {
      using I = decltype(itag);
      return with_pack<T>(vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        // Training and eval as a template switch: the eval kernels have no
        // xh term (dx = g * scale).
        auto go = [&](auto ttag) {
          constexpr bool Train = decltype(ttag)::value;
          if (s.layout == Layout::NCS) {
            auto kernel = dx_ncs_kernel<T, V, I, Act, Pre, Res, FromOut, Train>;
            const ElemPlan e = plan_elem(s, V, int64_t(sms) * resident_blocks(kernel));
            launch(kernel, e.grid, e.block, st, x, dy, z, dx, dz, I(e.total), I(s.C), I(e.inner),
                   I(e.chunk), mean, invstd, wt, b, w.k_xh, w.k_const, act, pre);
          } else {
            auto kernel = dx_nsc_kernel<T, V, I, Act, Pre, Res, FromOut, Train>;
            const ElemPlan e = plan_elem(s, V, int64_t(sms) * resident_blocks(kernel));
            launch(kernel, e.grid, e.block, st, x, dy, z, dx, dz, I(s.count()), I(e.inner),
                   I(e.chunk), mean, invstd, wt, b, w.k_xh, w.k_const, act, pre);
          }
        };
        if (p.training) go(std::true_type{});
        else go(std::false_type{});
        return cudaGetLastError();
      });
    });
  });
}

template <typename T>
cudaError_t backward_typed(const BackwardParams& p, void* ws, cudaStream_t st) {
  const int sms = sm_count();
  const BackwardWork<T> w = backward_work<T>(p, ws, sms);
  ReducePlan r;
  cudaError_t err = launch_sums<T>(p, w, sms, st, r);
  if (err != cudaSuccess) return err;
  err = launch_finalize_sums<T>(p, w, r, st);
  if (err != cudaSuccess || !wants_dx_pass(p)) return err;
  return launch_dx<T>(p, w, sms, st);
}

}  // namespace

// The entry points for one dtype (cuda_kernels.cu dispatches to them).
namespace typed {

template <typename T>
size_t forward_workspace_bytes(const ForwardParams& p, bool training) {
  return forward_work<T>(p, training, nullptr, sm_count()).bytes;
}

template <typename T>
size_t backward_workspace_bytes(const BackwardParams& p) {
  return backward_work<T>(p, nullptr, sm_count()).bytes;
}

template <typename T>
cudaError_t forward(const ForwardParams& p, bool training, void* workspace, cudaStream_t stream) {
  return forward_typed<T>(p, training, workspace, stream);
}

template <typename T>
cudaError_t backward(const BackwardParams& p, void* workspace, cudaStream_t stream) {
  return backward_typed<T>(p, workspace, stream);
}

}  // namespace typed

#define FUSEDBN_CUDA_TYPED(kind, T)                                                            \
  kind template size_t typed::forward_workspace_bytes<T>(const ForwardParams&, bool);          \
  kind template size_t typed::backward_workspace_bytes<T>(const BackwardParams&);              \
  kind template cudaError_t typed::forward<T>(const ForwardParams&, bool, void*, cudaStream_t); \
  kind template cudaError_t typed::backward<T>(const BackwardParams&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace fusedbn
