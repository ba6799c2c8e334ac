// CPU kernel templates for fused BatchNorm + activation.
//
// This header is compiled once per instruction set: each cpu_isa_*.cpp file
// sets `#pragma GCC target(...)`, defines FUSEDBN_CPU_ISA (the namespace that
// keeps the copies apart) and includes it. cpu_dispatch.cpp picks a copy at
// run time, so one build runs anywhere and still uses AVX-512 where it exists.
//
// Vectorization without -ffast-math: every reduction runs over kLanes
// independent accumulators, which the compiler maps to vector registers
// without having to reassociate a floating-point sum.
//
// Pass structure (one pass = one read or write of a full tensor):
//   forward, NCS:  per channel, statistics then normalize while the channel's
//                  values are still in L2 -> 1 read + 1 write from DRAM when a
//                  channel fits in L2 (N*H*W values), 2 reads + 1 write if not.
//   forward, NSC:  statistics (1 read), normalize (1 read + 1 write).
//   backward:      reductions (read x, dy), then dx (read x, dy, write dx);
//                  NCS keeps a channel's x and dy in cache between the two.
// Statistics: two-pass mean/M2 inside blocks of kBlock values that sit in L1,
// blocks merged with Chan's formula in double, so a large mean with a small
// spread keeps its variance and no value is read twice from DRAM.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "activations.h"
#include "cpu_types.h"
#include "params.h"

#ifndef FUSEDBN_CPU_ISA
#error "define FUSEDBN_CPU_ISA before including cpu_kernels.h"
#endif

namespace fusedbn {
namespace FUSEDBN_CPU_ISA {

#define FUSEDBN_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;
constexpr int64_t kBlock = 4096;          // values per cached two-pass block
constexpr int64_t kMinPerThread = 32768;  // below this a thread costs more than it saves

inline int threads_for(int64_t work, int max_threads, int64_t max_items) {
  int64_t t = std::max<int64_t>(1, work / kMinPerThread);
  t = std::min<int64_t>(t, max_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, max_items));
  return static_cast<int>(t);
}

template <typename A>
FUSEDBN_INLINE A lane_sum(const A* a) {
  A s8[8];
  for (int j = 0; j < 8; ++j) s8[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; ++j) s8[j] += s8[j + 4];
  return (s8[0] + s8[2]) + (s8[1] + s8[3]);
}

// (count, mean, M2) merged with Chan et al.'s formula, in double.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  FUSEDBN_INLINE void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    double tot = n + nb;
    double d = mean_b - mean;
    mean += d * (nb / tot);
    m2 += m2_b + d * d * (n * nb / tot);
    n = tot;
  }
};

// Calls f(n0, n1, off, len) for blocks of channel c: planes n0..n1-1, values
// off..off+len-1 of each plane, about kBlock values per block (NCS layout).
template <typename F>
FUSEDBN_INLINE void for_each_block(const Shape& s, F f) {
  if (s.S >= kBlock / 2) {
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t off = 0; off < s.S; off += kBlock) f(n, n + 1, off, std::min(kBlock, s.S - off));
  } else {
    const int64_t per = std::max<int64_t>(1, kBlock / s.S);
    for (int64_t n0 = 0; n0 < s.N; n0 += per) f(n0, std::min(n0 + per, s.N), int64_t(0), s.S);
  }
}

// Exact two-pass mean and M2 of a block that fits in L1.
template <typename T>
FUSEDBN_INLINE void block_moments(const T* x, int64_t stride, int64_t planes, int64_t len,
                                  acc_t<T>& mean, acc_t<T>& m2) {
  using A = acc_t<T>;
  A acc[kLanes] = {};
  for (int64_t p = 0; p < planes; ++p) {
    const T* xp = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += load(xp[i + j]);
    for (int j = 0; i < len; ++i, ++j) acc[j] += load(xp[i]);
  }
  mean = lane_sum(acc) / A(planes * len);
  A sq[kLanes] = {};
  for (int64_t p = 0; p < planes; ++p) {
    const T* xp = x + p * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        A d = load(xp[i + j]) - mean;
        sq[j] += d * d;
      }
    for (int j = 0; i < len; ++i, ++j) {
      A d = load(xp[i]) - mean;
      sq[j] += d * d;
    }
  }
  m2 = lane_sum(sq);
}

// y = act((x - mean) * scale + shift). Subtracting the mean first (rather than
// folding it into the shift) keeps the result exact when |mean| >> std; the
// backward recomputes y with this same expression, so the branch it takes
// matches the forward bit for bit.
template <typename T, typename Act>
FUSEDBN_INLINE void normalize_run(const T* x, T* y, int64_t len, acc_t<T> mean, acc_t<T> scale,
                                  acc_t<T> shift, const Act& act) {
  for (int64_t i = 0; i < len; ++i) y[i] = store<T>(act.fwd((load(x[i]) - mean) * scale + shift));
}

// Per-channel constants derived from the statistics, in the accumulation type.
template <typename A>
struct ChannelCoef {
  std::vector<A> mean, scale, shift;
  ChannelCoef(int64_t C, const A* m, const A* invstd, const A* w, const A* b)
      : mean(m, m + C), scale(C), shift(C) {
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = (w ? w[c] : A(1)) * invstd[c];
      shift[c] = b ? b[c] : A(0);
    }
  }
};

// ---------------------------------------------------------------- forward

template <typename T, typename Act>
void forward_train_ncs(const ForwardParams& p, const Act& act, acc_t<T>* var) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  A* mean_out = static_cast<A*>(p.mean);
  A* invstd_out = static_cast<A*>(p.invstd);
  const int nt = threads_for(s.N * s.C * s.S, p.num_threads, s.C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t base = c * s.S, stride = s.C * s.S;
    Moments mo;
    for_each_block(s, [&](int64_t n0, int64_t n1, int64_t off, int64_t len) {
      A bm, bm2;
      block_moments(x + n0 * stride + base + off, stride, n1 - n0, len, bm, bm2);
      mo.merge(double((n1 - n0) * len), bm, bm2);
    });
    const A mean = A(mo.mean);
    const A v = A(mo.m2 / mo.n);
    const A invstd = A(1) / std::sqrt(v + A(p.eps));
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    var[c] = v;
    const A scale = (w ? w[c] : A(1)) * invstd;
    const A shift = b ? b[c] : A(0);
    for (int64_t n = 0; n < s.N; ++n)
      normalize_run(x + n * stride + base, y + n * stride + base, s.S, mean, scale, shift, act);
  }
}

template <typename T>
void moments_nsc(const ForwardParams& p, acc_t<T>* var) {
  using A = acc_t<T>;
  const int64_t C = p.shape.C, M = p.shape.count();
  const T* x = static_cast<const T*>(p.x);
  const int nt = threads_for(M * C, p.num_threads, M);
  const int64_t R = std::max<int64_t>(8, kBlock / C);  // rows per block
  std::vector<double> tmean(size_t(nt) * C, 0.0), tm2(size_t(nt) * C, 0.0), tn(nt, 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int64_t r0 = M * t / nt, r1 = M * (t + 1) / nt;
    double* pm = &tmean[size_t(t) * C];
    double* pm2 = &tm2[size_t(t) * C];
    double n = 0;
    std::vector<A> bmean(C), bm2(C);
    for (int64_t r = r0; r < r1; r += R) {
      const int64_t rr = std::min(R, r1 - r);
      const T* xb = x + r * C;
      std::fill(bmean.begin(), bmean.end(), A(0));
      std::fill(bm2.begin(), bm2.end(), A(0));
      for (int64_t i = 0; i < rr; ++i)
        for (int64_t c = 0; c < C; ++c) bmean[c] += load(xb[i * C + c]);
      const A inv = A(1) / A(rr);
      for (int64_t c = 0; c < C; ++c) bmean[c] *= inv;
      for (int64_t i = 0; i < rr; ++i)
        for (int64_t c = 0; c < C; ++c) {
          A d = load(xb[i * C + c]) - bmean[c];
          bm2[c] += d * d;
        }
      const double nb = double(rr), tot = n + nb, fa = nb / tot, fb = n * nb / tot;
      for (int64_t c = 0; c < C; ++c) {
        double d = double(bmean[c]) - pm[c];
        pm[c] += d * fa;
        pm2[c] += double(bm2[c]) + d * d * fb;
      }
      n = tot;
    }
    tn[t] = n;
  }
  A* mean_out = static_cast<A*>(p.mean);
  A* invstd_out = static_cast<A*>(p.invstd);
  for (int64_t c = 0; c < C; ++c) {
    Moments mo;
    for (int t = 0; t < nt; ++t) mo.merge(tn[t], tmean[size_t(t) * C + c], tm2[size_t(t) * C + c]);
    const A v = A(mo.m2 / mo.n);
    mean_out[c] = A(mo.mean);
    invstd_out[c] = A(1) / std::sqrt(v + A(p.eps));
    var[c] = v;
  }
}

// Normalize + activate with per-channel statistics already in p.mean/p.invstd.
template <typename T, typename Act>
void normalize(const ForwardParams& p, const Act& act) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const int64_t C = s.C;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  ChannelCoef<A> k(C, static_cast<const A*>(p.mean), static_cast<const A*>(p.invstd),
                   static_cast<const A*>(p.weight), static_cast<const A*>(p.bias));
  const A* mean = k.mean.data();
  const A* scale = k.scale.data();
  const A* shift = k.shift.data();
  if (s.layout == Layout::NCS) {
    const int64_t planes = s.N * C;
    const int nt = threads_for(planes * s.S, p.num_threads, planes);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t pl = 0; pl < planes; ++pl) {
      const int64_t c = pl % C;
      normalize_run(x + pl * s.S, y + pl * s.S, s.S, mean[c], scale[c], shift[c], act);
    }
  } else {
    const int64_t M = s.count();
    const int nt = threads_for(M * C, p.num_threads, M);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < M; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
      for (int64_t c = 0; c < C; ++c)
        yr[c] = store<T>(act.fwd((load(xr[c]) - mean[c]) * scale[c] + shift[c]));
    }
  }
}

template <typename P, typename A>
void update_running_stats(P* rm, P* rv, const A* mean, const A* var, int64_t C, double count,
                          double momentum) {
  const A m = A(momentum), keep = A(1.0 - momentum);
  const A unbias = A(count / (count - 1.0));
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = store<P>(acc_t<P>(keep * A(load(rm[c])) + m * mean[c]));
    rv[c] = store<P>(acc_t<P>(keep * A(load(rv[c])) + m * var[c] * unbias));
  }
}

template <typename T, typename Act>
void forward_typed(const ForwardParams& p, bool training, const Act& act) {
  using A = acc_t<T>;
  if (!training) return normalize<T>(p, act);
  std::vector<A> var(p.shape.C);
  if (p.shape.layout == Layout::NCS) {
    forward_train_ncs<T>(p, act, var.data());
  } else {
    moments_nsc<T>(p, var.data());
    normalize<T>(p, act);
  }
  if (p.running_mean) {
    const A* mean = static_cast<const A*>(p.mean);
    const int64_t C = p.shape.C;
    const double cnt = double(p.shape.count());
    switch (p.running_dtype) {
      case DType::Float32:
        return update_running_stats(static_cast<float*>(p.running_mean), static_cast<float*>(p.running_var), mean, var.data(), C, cnt, p.momentum);
      case DType::Float64:
        return update_running_stats(static_cast<double*>(p.running_mean), static_cast<double*>(p.running_var), mean, var.data(), C, cnt, p.momentum);
      case DType::BFloat16:
        return update_running_stats(static_cast<bf16_t*>(p.running_mean), static_cast<bf16_t*>(p.running_var), mean, var.data(), C, cnt, p.momentum);
      case DType::Float16:
        return update_running_stats(static_cast<fp16_t*>(p.running_mean), static_cast<fp16_t*>(p.running_var), mean, var.data(), C, cnt, p.momentum);
    }
  }
}

// --------------------------------------------------------------- backward
//
// With g = dy * act'(y) and xc = x - mean:
//   grad_bias = sum(g), grad_weight = invstd * sum(g * xc)
//   training: dx = scale * (g - mean(g)) - xc * scale * invstd^2 * mean(g * xc)
//   eval:     dx = scale * g

template <typename A>
struct BackwardCoef {
  A mean, scale, shift, invstd;
};

template <typename T, typename Act>
FUSEDBN_INLINE void reduce_run(const T* x, const T* dy, int64_t len, const BackwardCoef<acc_t<T>>& k,
                               const Act& act, acc_t<T>* sg, acc_t<T>* sgx) {
  using A = acc_t<T>;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A xc = load(x[i + j]) - k.mean;
      const A g = act.grad(A(load(dy[i + j])), xc * k.scale + k.shift);
      sg[j] += g;
      sgx[j] += g * xc;
    }
  for (int j = 0; i < len; ++i, ++j) {
    const A xc = load(x[i]) - k.mean;
    const A g = act.grad(A(load(dy[i])), xc * k.scale + k.shift);
    sg[j] += g;
    sgx[j] += g * xc;
  }
}

template <typename T, typename Act>
FUSEDBN_INLINE void dx_run(const T* x, const T* dy, T* dx, int64_t len, const BackwardCoef<acc_t<T>>& k,
                           acc_t<T> k_xc, acc_t<T> k_const, const Act& act) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < len; ++i) {
    const A xc = load(x[i]) - k.mean;
    const A g = act.grad(A(load(dy[i])), xc * k.scale + k.shift);
    dx[i] = store<T>(g * k.scale + xc * k_xc + k_const);
  }
}

// The dx coefficients for channel c given its sums over `count` values.
template <typename A>
FUSEDBN_INLINE void dx_coefficients(bool training, const BackwardCoef<A>& k, double sg, double sgx,
                                    double count, A& k_xc, A& k_const) {
  if (!training) {
    k_xc = A(0);
    k_const = A(0);
    return;
  }
  k_xc = A(-double(k.scale) * double(k.invstd) * double(k.invstd) * (sgx / count));
  k_const = A(-double(k.scale) * (sg / count));
}

template <typename A>
FUSEDBN_INLINE BackwardCoef<A> backward_coef(const BackwardParams& p, int64_t c) {
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  const A invstd = static_cast<const A*>(p.invstd)[c];
  return {static_cast<const A*>(p.mean)[c], (w ? w[c] : A(1)) * invstd, b ? b[c] : A(0), invstd};
}

template <typename T, typename Act>
void backward_ncs(const BackwardParams& p, const Act& act) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  A* gw = static_cast<A*>(p.grad_weight);
  A* gb = static_cast<A*>(p.grad_bias);
  const double count = double(s.count());
  const int nt = threads_for(s.N * s.C * s.S, p.num_threads, s.C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < s.C; ++c) {
    const BackwardCoef<A> k = backward_coef<A>(p, c);
    const int64_t base = c * s.S, stride = s.C * s.S;
    double sg = 0, sgx = 0;
    for_each_block(s, [&](int64_t n0, int64_t n1, int64_t off, int64_t len) {
      A lg[kLanes] = {}, lgx[kLanes] = {};
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t o = n * stride + base + off;
        reduce_run(x + o, dy + o, len, k, act, lg, lgx);
      }
      sg += double(lane_sum(lg));
      sgx += double(lane_sum(lgx));
    });
    gb[c] = A(sg);
    gw[c] = A(sgx * double(k.invstd));
    if (!dx) continue;
    A k_xc, k_const;
    dx_coefficients(p.training, k, sg, sgx, count, k_xc, k_const);
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t o = n * stride + base;
      dx_run(x + o, dy + o, dx + o, s.S, k, k_xc, k_const, act);
    }
  }
}

template <typename T, typename Act>
void backward_nsc(const BackwardParams& p, const Act& act) {
  using A = acc_t<T>;
  const int64_t C = p.shape.C, M = p.shape.count();
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  std::vector<BackwardCoef<A>> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = backward_coef<A>(p, c);
  const int nt = threads_for(M * C, p.num_threads, M);
  const int64_t R = std::max<int64_t>(8, kBlock / C);
  std::vector<double> tsg(size_t(nt) * C, 0.0), tsgx(size_t(nt) * C, 0.0);
  // Split into arrays so the loop over channels vectorizes.
  std::vector<A> mean(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = k[c].mean;
    scale[c] = k[c].scale;
    shift[c] = k[c].shift;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int64_t r0 = M * t / nt, r1 = M * (t + 1) / nt;
    std::vector<A> bg(C), bgx(C);
    double* sg = &tsg[size_t(t) * C];
    double* sgx = &tsgx[size_t(t) * C];
    for (int64_t r = r0; r < r1; r += R) {
      const int64_t rr = std::min(R, r1 - r);
      std::fill(bg.begin(), bg.end(), A(0));
      std::fill(bgx.begin(), bgx.end(), A(0));
      for (int64_t i = 0; i < rr; ++i) {
        const T* xr = x + (r + i) * C;
        const T* dyr = dy + (r + i) * C;
        for (int64_t c = 0; c < C; ++c) {
          const A xc = load(xr[c]) - mean[c];
          const A g = act.grad(A(load(dyr[c])), xc * scale[c] + shift[c]);
          bg[c] += g;
          bgx[c] += g * xc;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += double(bg[c]);
        sgx[c] += double(bgx[c]);
      }
    }
  }
  A* gw = static_cast<A*>(p.grad_weight);
  A* gb = static_cast<A*>(p.grad_bias);
  std::vector<A> k_xc(C), k_const(C);
  for (int64_t c = 0; c < C; ++c) {
    double sg = 0, sgx = 0;
    for (int t = 0; t < nt; ++t) {
      sg += tsg[size_t(t) * C + c];
      sgx += tsgx[size_t(t) * C + c];
    }
    gb[c] = A(sg);
    gw[c] = A(sgx * double(k[c].invstd));
    dx_coefficients(p.training, k[c], sg, sgx, double(M), k_xc[c], k_const[c]);
  }
  if (!dx) return;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    const T* xr = x + r * C;
    const T* dyr = dy + r * C;
    T* dxr = dx + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const A xc = load(xr[c]) - mean[c];
      const A g = act.grad(A(load(dyr[c])), xc * scale[c] + shift[c]);
      dxr[c] = store<T>(g * scale[c] + xc * k_xc[c] + k_const[c]);
    }
  }
}

// ------------------------------------------------------------ entry points

template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(bf16_t{});
    case DType::Float16: return f(fp16_t{});
  }
}

void forward(const ForwardParams& p, bool training) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_activation<acc_t<T>>(p.act, [&](auto act) { forward_typed<T>(p, training, act); });
  });
}

void backward(const BackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_activation<acc_t<T>>(p.act, [&](auto act) {
      if (p.shape.layout == Layout::NCS)
        backward_ncs<T>(p, act);
      else
        backward_nsc<T>(p, act);
    });
  });
}

#undef FUSEDBN_INLINE

}  // namespace FUSEDBN_CPU_ISA
}  // namespace fusedbn
