// CUDA kernel templates for fused BatchNorm + activation. Torch-free: raw
// pointers and sizes in, the host side (cuda_launch.cuh) picks the launch
// shapes. The formulas are bn_math.h's and the activations activations.h's,
// both shared with cpu_kernels.h.
//
// Pass structure (one pass = one read or write of a full tensor in DRAM):
//   forward, training: stats (read x) -> finalize (per channel)
//                      -> normalize (read x [, z], write y)     = 3 passes (+1 with z)
//   forward, eval:     normalize                                = 2 passes (+1 with z)
//   backward:          sums (read x, dy [, z]) -> finalize (per channel)
//                      -> dx (read x, dy [, z], write dx [, dz]) = 5 passes (+2 or 3 with z)
// Residual z (Res), the in-place backward (FromOut: x holds the output y),
// order ActBn (Pre: the activation applied to x as it is loaded) and
// activity counting (Count) are template switches, as in cpu_kernels.h, so
// the element loops never branch on them. In-place forward passes the same pointer as x and y: the normalize
// kernels take neither as __restrict__, and each thread reads its packs before
// writing them at the same indices, which no other thread touches.
// The reductions write one partial per block, and a small finalize kernel
// merges them in a fixed order: results do not depend on block scheduling,
// and no counters or atomics need resetting between calls.
//
// Layouts (see params.h): NCS = N planes of C channels of S values; NSC = M
// rows of C channels. Every data kernel moves 16-byte packs of V elements
// when the innermost extent (S or C) is a multiple of V and the pointers are
// aligned, single elements otherwise; `I` is int32_t or int64_t, picked by
// the host from the tensor size.
//
// Statistics: each thread loads a batch of up to kUnroll packs, takes the
// batch's exact mean and M2 in two passes over registers and merges them into
// its running (count, mean, M2) with Chan et al.'s formula; threads, warps and
// blocks are merged the same way, the per-block partials in double. So the
// variance never comes from E[x^2] - E[x]^2. The values are shifted by one
// of the channel's own (pivot_of), so that the float merges keep a small
// variance under a large mean.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "activations.h"
#include "bn_math.h"
#include "params.h"

namespace fusedbn {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every data kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocks = 2;
constexpr int kUnroll = 4;     // packs in flight per thread and input tensor
// Fewer packs per tensor in the heavier backward variants, found with
// -Xptxas -v: with a residual (three inputs) 4 packs took the 16-bit NSC
// kernels to ~170 registers on sm_90 (1 block per SM), 2 keep them <= 126 at
// about the same bytes in flight per SM; the in-place backward (a division
// per element for leaky_relu/elu) spilled at 4 packs and does not at 3.
constexpr int kUnrollBwdRes = 2;
constexpr int kUnrollBwdFromOut = 3;
constexpr int bwd_unroll(bool res, bool from_out) {
  return res ? kUnrollBwdRes : from_out ? kUnrollBwdFromOut : kUnroll;
}
// Channels-last kernels with V = 8 (16-bit packs) also hold 8 channels'
// constants per thread: at 4 packs the bfloat16 ELU dx kernel took 149
// registers (one block per SM); 2 packs fit kMinBlocks = 2 without spilling.
constexpr int nsc_unroll(int V, int u) { return V >= 8 && u > 2 ? 2 : u; }
constexpr int kFinalizeX = 32; // finalize blocks: 32 channels x 8 partial lanes
constexpr int kFinalizeY = 8;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Explicit conversions only: torch builds extensions with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Store;
template <> struct Store<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Store<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <> struct Store<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return Store<T>::from(v); }


template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// No __restrict__ here: the normalize kernels' x and y may be one buffer.
template <typename T, int V, typename I>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, I i) {
  return reinterpret_cast<const Pack<T, V>*>(p)[i];
}
template <typename T, int V, typename I>
__device__ __forceinline__ void store_pack(T* p, I i, const Pack<T, V>& v) {
  reinterpret_cast<Pack<T, V>*>(p)[i] = v;
}

// Element j of a residual pack as acc_t<T>; 0 without a residual (the pack
// is then never loaded nor read).
template <bool Res, typename T, int V>
__device__ __forceinline__ acc_t<T> res_at(const Pack<T, V>& p, int j) {
  if constexpr (Res) return to_acc(p.v[j]);
  else return acc_t<T>(0);
}

// A channel's constants, as every kernel and the CPU compute them
// (bn_math.h: channel_coef), so the forward and the backward see the same
// scale bit for bit.
template <bool FromOut = false, typename A, typename I>
__device__ __forceinline__ ChannelCoef<A> coef_of(const A* __restrict__ mean,
                                                  const A* __restrict__ invstd,
                                                  const A* __restrict__ w,
                                                  const A* __restrict__ b, I c) {
  return channel_coef(mean[c], invstd[c], w ? w[c] : A(1), b ? b[c] : A(0), FromOut);
}

// The kernels' input a = pre(x): with order ActBn the activation `pre` is
// applied as x is loaded (BnAct passes IdentityAct), so everything after the
// load is the plain BatchNorm of a.
template <typename T, typename Pre>
__device__ __forceinline__ acc_t<T> load_in(T v, const Pre& pre) {
  return pre.fwd(to_acc(v));
}

// The statistics are accumulated on x - K, K a value of the channel (its
// first, or 0 when that is not finite): the float merges of threads and
// warps then keep the variance of a channel whose |mean| >> std, which they
// would round to ulp(mean) otherwise. finalize adds K back in double.
template <typename T, typename Pre, typename I>
__device__ __forceinline__ acc_t<T> pivot_of(const T* __restrict__ x, I i, const Pre& pre) {
  const acc_t<T> v = load_in(x[i], pre);
  return bn_isfinite(v) ? v : acc_t<T>(0);
}

// Adds n active values to channel c's count (activity tracking): one atomic
// per run of a thread's values in one channel.
__device__ __forceinline__ void add_count(int64_t* counts, int64_t c, int n) {
  if (n) atomicAdd(reinterpret_cast<unsigned long long*>(counts + c), (unsigned long long)n);
}

// ------------------------------------------------------------- merging
//
// Moments, Chan's merge and the batch's two-pass moments: bn_math.h.

template <typename A>
__device__ __forceinline__ Moments<A> warp_merge(Moments<A> m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    m.merge(__shfl_down_sync(0xffffffffu, m.n, o), __shfl_down_sync(0xffffffffu, m.mean, o),
            __shfl_down_sync(0xffffffffu, m.m2, o));
  }
  return m;
}

// Block-wide merge of a 1D block of kThreads; the result is in thread 0.
template <typename A>
__device__ __forceinline__ Moments<A> block_merge(Moments<A> m) {
  __shared__ Moments<A> warp_part[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  m = warp_merge(m);
  if (lane == 0) warp_part[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? warp_part[lane] : Moments<A>{A(0), A(0), A(0)};
    m = warp_merge(m);
  }
  return m;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sums of two values of a 1D block of kThreads; results in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A part_a[kWarps], part_b[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    part_a[warp] = a;
    part_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? part_a[lane] : A(0));
    b = warp_sum(lane < kWarps ? part_b[lane] : A(0));
  }
}

// ------------------------------------------------------------- index walks

// How many of the indices first, first + step, ... fall below end.
template <typename I>
__device__ __forceinline__ I strided_count(I first, I end, I step) {
  return first < end ? (end - first + step - 1) / step : I(0);
}

// Walks the packs of one channel c of an NCS tensor: pack v of the channel
// is in plane n = v / Sv at position s = v % Sv, stored at pack
// (n * C + c) * Sv + s. Threads advance by a fixed stride D, so the division
// happens once per thread and each step is a few adds.
template <typename I>
struct ChannelWalk {
  I off, s, Sv, ds, dstep, wrap;
  __device__ __forceinline__ ChannelWalk(I v, I c, I C, I Sv_, I D) : Sv(Sv_) {
    const I n = v / Sv;
    s = v - n * Sv;
    off = (n * C + c) * Sv + s;
    const I dn = D / Sv;
    ds = D - dn * Sv;
    // Only used when a thread has a second pack, and then it is below the
    // tensor size; the 64-bit product keeps the unused case well defined.
    dstep = I(int64_t(dn) * C * Sv + ds);
    wrap = (C - 1) * Sv;
  }
  __device__ __forceinline__ void next() {
    s += ds;
    off += dstep;
    if (s >= Sv) {
      s -= Sv;
      off += wrap;
    }
  }
};

// Walks the packs of a whole contiguous NCS tensor by a fixed stride D,
// tracking the channel (v / Sv) % C of pack v without dividing per step.
template <typename I>
struct TensorWalk {
  I off, s, c, Sv, C, D, ds, dc;
  __device__ __forceinline__ TensorWalk(I v, I C_, I Sv_, I D_) : off(v), Sv(Sv_), C(C_), D(D_) {
    const I plane = v / Sv;
    s = v - plane * Sv;
    c = plane % C;
    const I dp = D / Sv;
    ds = D - dp * Sv;
    dc = dp % C;
  }
  __device__ __forceinline__ void next() {
    off += D;
    s += ds;
    c += dc;
    if (s >= Sv) {
      s -= Sv;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// ---------------------------------------------------------- forward: stats
//
// Pre: the activation applied to x as it is loaded (order ActBn), else
// IdentityAct. Each kernel accumulates a - K (pivot_of) and writes the
// channel's K to pivot[c] from its first chunk (k = 0).

// Block (c, k) of grid (C, K): packs [k * chunk, (k + 1) * chunk) of channel
// c. Writes the block's (n, mean, M2) to partial index c * K + k.
template <typename T, int V, typename I, typename Pre>
__global__ void __launch_bounds__(kThreads)
stats_ncs_kernel(const T* __restrict__ x, I C, I Sv, I Mv, I chunk, Pre pre,
                 acc_t<T>* __restrict__ pn, acc_t<T>* __restrict__ pmean,
                 acc_t<T>* __restrict__ pm2, acc_t<T>* __restrict__ pivot) {
  using A = acc_t<T>;
  const I c = I(blockIdx.x), k = I(blockIdx.y), t = I(threadIdx.x);
  const I v0 = k * chunk;
  const I v1 = v0 + chunk < Mv ? v0 + chunk : Mv;
  I left = strided_count<I>(v0 + t, v1, I(kThreads));
  const A K = pivot_of(x, c * Sv * I(V), pre);
  Moments<A> m{};
  if (left > 0) {
    ChannelWalk<I> walk(v0 + t, c, C, Sv, I(kThreads));
    while (left > 0) {
      const int nl = left < kUnroll ? int(left) : kUnroll;
      A v[kUnroll][V] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < nl) {
          const Pack<T, V> pk = load_pack<T, V>(x, walk.off);
#pragma unroll
          for (int j = 0; j < V; ++j) v[u][j] = load_in(pk.v[j], pre) - K;
          if (I(u + 1) < left) walk.next();
        }
      }
      left -= nl;
      A sum = A(0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (u < nl) sum += v[u][j];
      const A nb = A(nl * V);
      const A bmean = sum / nb;
      // Corrected two-pass (as the CPU): sum(d) undoes the rounding of bmean.
      A bs1 = A(0), bm2 = A(0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (u < nl) {
            const A d = v[u][j] - bmean;
            bs1 += d;
            bm2 += d * d;
          }
      A mb, m2b;
      batch_moments(sum, bmean, bs1, bm2, A(1) / nb, mb, m2b);
      m.merge(nb, mb, m2b);
    }
  }
  m = block_merge(m);
  if (threadIdx.x == 0) {
    const I idx = c * I(gridDim.y) + k;
    pn[idx] = m.n;
    pmean[idx] = m.mean;
    pm2[idx] = m.m2;
    if (k == 0) pivot[c] = K;
  }
}

// Block (gx, k) of grid (ceil(Cv / BX), K), threads (BX, BY): thread (tx, ty)
// owns the V channels of pack column cv = gx * BX + tx and rows
// r0 + ty, r0 + ty + BY, ... of chunk [r0, r1). Writes partials at k * C + c.
template <typename T, int V, typename I, typename Pre>
__global__ void __launch_bounds__(kThreads)
stats_nsc_kernel(const T* __restrict__ x, I M, I C, I Cv, I rows, Pre pre,
                 acc_t<T>* __restrict__ pn, acc_t<T>* __restrict__ pmean,
                 acc_t<T>* __restrict__ pm2, acc_t<T>* __restrict__ pivot) {
  using A = acc_t<T>;
  __shared__ A s_n[kThreads];
  __shared__ A s_mean[kThreads * V];
  __shared__ A s_m2[kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y, BX = blockDim.x, BY = blockDim.y;
  const I cv = I(blockIdx.x) * BX + tx, k = I(blockIdx.y);
  const I r0 = k * rows;
  const I r1 = r0 + rows < M ? r0 + rows : M;
  I left = cv < Cv ? strided_count<I>(r0 + ty, r1, I(BY)) : I(0);
  A n = A(0), mean[V], m2[V], K[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mean[j] = m2[j] = A(0);
    K[j] = cv < Cv ? pivot_of(x, cv * I(V) + I(j), pre) : A(0);
  }
  if (left > 0) {
    I off = (r0 + ty) * Cv + cv;
    const I step = I(int64_t(BY) * Cv);  // used only between two rows of the chunk
    while (left > 0) {
      const int nl = left < kUnroll ? int(left) : kUnroll;
      A v[kUnroll][V] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < nl) {
          const Pack<T, V> pk = load_pack<T, V>(x, off);
#pragma unroll
          for (int j = 0; j < V; ++j) v[u][j] = load_in(pk.v[j], pre) - K[j];
          if (I(u + 1) < left) off += step;
        }
      }
      left -= nl;
      // The batch's count is the same for all V channels: one division.
      const A nb = A(nl), inv_nb = A(1) / nb;
      const A tot = n + nb, fb = nb / tot, cross = n * fb;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A sum = A(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (u < nl) sum += v[u][j];
        const A bmean0 = sum * inv_nb;
        // Corrected two-pass (as the CPU): sum(d) undoes the rounding of bmean0.
        A bs1 = A(0), bm2 = A(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (u < nl) {
            const A d = v[u][j] - bmean0;
            bs1 += d;
            bm2 += d * d;
          }
        A bmean, bm2f;
        batch_moments(sum, bmean0, bs1, bm2, inv_nb, bmean, bm2f);
        const A d = bmean - mean[j];
        if (bn_isfinite(d)) {
          mean[j] += d * fb;
          m2[j] += bm2f + d * (d * cross);  // as in chan_update, divisions hoisted
        } else {
          chan_update(mean[j], m2[j], n, nb, tot, bmean, bm2f);
        }
      }
      n = tot;
    }
  }
  // Tree over ty: level h merges row ty + h into row ty (ty < h); BY is a
  // power of two.
  const int slot = ty * BX + tx;
  s_n[slot] = n;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_mean[slot * V + j] = mean[j];
    s_m2[slot * V + j] = m2[j];
  }
  __syncthreads();
  for (int h = BY / 2; h > 0; h >>= 1) {
    if (ty < h) {
      const int o = (ty + h) * BX + tx;
      const A nb = s_n[o], tot = n + nb;
      if (nb > A(0)) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          chan_update(mean[j], m2[j], n, nb, tot, s_mean[o * V + j], s_m2[o * V + j]);
          s_mean[slot * V + j] = mean[j];
          s_m2[slot * V + j] = m2[j];
        }
        n = tot;
        s_n[slot] = n;
      }
    }
    __syncthreads();
  }
  if (ty == 0 && cv < Cv) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I c = cv * V + j, idx = k * C + c;
      pn[idx] = n;
      pmean[idx] = mean[j];
      pm2[idx] = m2[j];
      if (k == 0) pivot[c] = K[j];
    }
  }
}

// Threads (kFinalizeX, kFinalizeY), grid ceil(C / kFinalizeX): channel
// c = blockIdx.x * kFinalizeX + tx, its K partials at c * cs + k * ks merged
// in double, then mean (the pivot added back), invstd and the running
// statistics, as in cpu_kernels.h (forward_train_ncs, update_running_stats).
// momentum comes from num_batches_tracked when that is given.
template <typename A, typename P>
__global__ void __launch_bounds__(kFinalizeX * kFinalizeY)
finalize_stats_kernel(const A* __restrict__ pn, const A* __restrict__ pmean, const A* __restrict__ pm2,
                      const A* __restrict__ pivot, int64_t C, int64_t K, int64_t cs, int64_t ks,
                      A* __restrict__ mean_out, A* __restrict__ invstd_out,
                      P* __restrict__ running_mean, P* __restrict__ running_var, double eps,
                      double momentum, const int64_t* __restrict__ num_batches_tracked,
                      double count) {
  __shared__ double s_part[3][kFinalizeY][kFinalizeX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kFinalizeX + tx;
  Moments<double> m{};
  if (c < C) {
    for (int64_t k = ty; k < K; k += kFinalizeY) {
      const int64_t i = c * cs + k * ks;
      m.merge(double(pn[i]), double(pmean[i]), double(pm2[i]));
    }
  }
  s_part[0][ty][tx] = m.n;
  s_part[1][ty][tx] = m.mean;
  s_part[2][ty][tx] = m.m2;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  for (int r = 1; r < kFinalizeY; ++r) m.merge(s_part[0][r][tx], s_part[1][r][tx], s_part[2][r][tx]);
  const A mean = A(double(pivot[c]) + m.mean);
  const A var = A(m.m2 / m.n);
  mean_out[c] = mean;
  invstd_out[c] = invstd_of<A>(m.m2, m.n, eps);
  if (running_mean) {
    using PA = acc_t<P>;
    const RunningUpdate<A> u(momentum_of(momentum, num_batches_tracked), count);
    running_mean[c] = from_acc<P>(PA(u.mean(A(to_acc(running_mean[c])), mean)));
    running_var[c] = from_acc<P>(PA(u.var(A(to_acc(running_var[c])), var)));
  }
}

// Activity tracking's last step, per channel (bn_math.h: update_activity)
// from the counts the normalize kernels added up; n values per channel.
// A template (F = float) only so that every translation unit including this
// header (cuda_kernels_<dtype>.cu) may hold it, as it holds the others.
template <typename F>
__global__ void __launch_bounds__(kThreads)
activity_kernel(const int64_t* __restrict__ counts, F* __restrict__ activity, int64_t C,
                int rows, int64_t n, double momentum) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c < C) update_activity(activity, C, rows, c, counts[c], n, momentum);
}

// ------------------------------------------------------ forward: normalize
//
// y = act((pre(x) - mean) * scale + shift [+ z]). x and y may be the same
// buffer (in-place forward): no __restrict__ on x, z or y (z may be x too),
// and every thread loads its batch of packs before storing to those same
// packs. Count: activity counting (bn_math.h), into counts (zeroed int64[C]).

// Block b: packs [b * per_block, (b + 1) * per_block) of the whole tensor,
// thread t every kThreads-th pack from t.
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, int Count>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
normalize_ncs_kernel(const T* x, const T* z, T* y, I total, I C, I Sv, I per_block,
                     const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
                     const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b, Act act,
                     Pre pre, int64_t* __restrict__ counts) {
  using A = acc_t<T>;
  const I v0 = I(blockIdx.x) * per_block;
  const I v1 = v0 + per_block < total ? v0 + per_block : total;
  const I t = I(threadIdx.x);
  I left = strided_count<I>(v0 + t, v1, I(kThreads));
  if (left <= 0) return;
  TensorWalk<I> walk(v0 + t, C, Sv, I(kThreads));
  I run_c = walk.c;  // the channel whose active values run_n holds
  int run_n = 0;
  while (left > 0) {
    const int nl = left < kUnroll ? int(left) : kUnroll;
    Pack<T, V> pk[kUnroll], pz[kUnroll];
    I off[kUnroll], ch[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < nl) {
        off[u] = walk.off;
        ch[u] = walk.c;
        pk[u] = load_pack<T, V>(x, walk.off);
        if constexpr (Res) pz[u] = load_pack<T, V>(z, walk.off);
        if (I(u + 1) < left) walk.next();
      }
    }
    left -= nl;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < nl) {
        const ChannelCoef<A> k = coef_of(mean, invstd, w, b, ch[u]);
        Pack<T, V> out;
        int active = 0;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xv = to_acc(pk[u].v[j]);
          const A v = pre_activation<Res>(pre.fwd(xv) - k.mean, res_at<Res>(pz[u], j), k.scale,
                                          k.shift);
          out.v[j] = from_acc<T>(act.fwd(v));
          active += is_active<Count>(act, pre, xv, v);
        }
        store_pack<T, V>(y, off[u], out);
        if constexpr (Count != kCountNone) {
          if (ch[u] != run_c) {
            add_count(counts, run_c, run_n);
            run_c = ch[u];
            run_n = 0;
          }
          run_n += active;
        }
      }
    }
  }
  if constexpr (Count != kCountNone) add_count(counts, run_c, run_n);
}

// Same block shape as stats_nsc_kernel; a thread's V channels' constants stay
// in registers for all its rows.
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, int Count>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
normalize_nsc_kernel(const T* x, const T* z, T* y, I M, I Cv, I rows,
                     const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
                     const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b, Act act,
                     Pre pre, int64_t* __restrict__ counts) {
  using A = acc_t<T>;
  const int tx = threadIdx.x, ty = threadIdx.y, BY = blockDim.y;
  const I cv = I(blockIdx.x) * I(blockDim.x) + tx;
  if (cv >= Cv) return;
  const I r0 = I(blockIdx.y) * rows;
  const I r1 = r0 + rows < M ? r0 + rows : M;
  I left = strided_count<I>(r0 + ty, r1, I(BY));
  if (left <= 0) return;
  constexpr int U = nsc_unroll(V, kUnroll);
  ChannelCoef<A> k[V];
  int active[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    k[j] = coef_of(mean, invstd, w, b, cv * V + j);
    active[j] = 0;
  }
  I off = (r0 + ty) * Cv + cv;
  const I step = I(int64_t(BY) * Cv);
  while (left > 0) {
    const int nl = left < U ? int(left) : U;
    Pack<T, V> pk[U], pz[U];
    I offs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        offs[u] = off;
        pk[u] = load_pack<T, V>(x, off);
        if constexpr (Res) pz[u] = load_pack<T, V>(z, off);
        if (I(u + 1) < left) off += step;
      }
    }
    left -= nl;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        Pack<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xv = to_acc(pk[u].v[j]);
          const A v = pre_activation<Res>(pre.fwd(xv) - k[j].mean, res_at<Res>(pz[u], j),
                                          k[j].scale, k[j].shift);
          out.v[j] = from_acc<T>(act.fwd(v));
          active[j] += is_active<Count>(act, pre, xv, v);
        }
        store_pack<T, V>(y, offs[u], out);
      }
    }
  }
  if constexpr (Count != kCountNone) {
#pragma unroll
    for (int j = 0; j < V; ++j) add_count(counts, int64_t(cv) * V + j, active[j]);
  }
}

// --------------------------------------------------------------- backward
//
// The formulas are bn_math.h's: g and xh from grad_pre, the sums
// (sum g, sum g * xh), dx_coefficients, dx_value; dz = g with a residual.
// Res: z is read (and dz may be written); FromOut: x holds the forward's
// output, only for invertible activations (the host never instantiates it
// for the others). z and dz are unused (null) without Res. Pre (order
// ActBn, Act then IdentityAct): the BatchNorm's input is pre(x), and dx
// gets pre's derivative at x.

// Same grid and partial layout as stats_ncs_kernel; partials (sum g, sum g*xh).
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, bool FromOut>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
sums_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ z, I C,
                I Sv, I Mv, I chunk, const acc_t<T>* __restrict__ mean,
                const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ w,
                const acc_t<T>* __restrict__ b, Act act, Pre pre, acc_t<T>* __restrict__ psg,
                acc_t<T>* __restrict__ psgx) {
  using A = acc_t<T>;
  constexpr int U = bwd_unroll(Res, FromOut);
  const I c = I(blockIdx.x), k = I(blockIdx.y), t = I(threadIdx.x);
  const I v0 = k * chunk;
  const I v1 = v0 + chunk < Mv ? v0 + chunk : Mv;
  I left = strided_count<I>(v0 + t, v1, I(kThreads));
  A sg = A(0), sgx = A(0);
  if (left > 0) {
    const ChannelCoef<A> kc = coef_of<FromOut>(mean, invstd, w, b, c);
    ChannelWalk<I> walk(v0 + t, c, C, Sv, I(kThreads));
    while (left > 0) {
      const int nl = left < U ? int(left) : U;
      Pack<T, V> px[U], pd[U], pz[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < nl) {
          px[u] = load_pack<T, V>(x, walk.off);
          pd[u] = load_pack<T, V>(dy, walk.off);
          if constexpr (Res) pz[u] = load_pack<T, V>(z, walk.off);
          if (I(u + 1) < left) walk.next();
        }
      }
      left -= nl;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < nl) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            A xh;
            const A g = grad_pre<Res, FromOut>(load_in(px[u].v[j], pre), res_at<Res>(pz[u], j),
                                               to_acc(pd[u].v[j]), kc.mean, kc.scale, kc.shift,
                                               kc.hat, act, xh);
            sg += g;
            sgx += g * xh;
          }
        }
      }
    }
  }
  block_sum2(sg, sgx);
  if (threadIdx.x == 0) {
    const I idx = c * I(gridDim.y) + k;
    psg[idx] = sg;
    psgx[idx] = sgx;
  }
}

// Same grid and partial layout as stats_nsc_kernel.
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, bool FromOut>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
sums_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ z, I M,
                I C, I Cv, I rows, const acc_t<T>* __restrict__ mean,
                const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ w,
                const acc_t<T>* __restrict__ b, Act act, Pre pre, acc_t<T>* __restrict__ psg,
                acc_t<T>* __restrict__ psgx) {
  using A = acc_t<T>;
  constexpr int U = nsc_unroll(V, bwd_unroll(Res, FromOut));
  __shared__ A s_g[kThreads * V];
  __shared__ A s_gx[kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y, BX = blockDim.x, BY = blockDim.y;
  const I cv = I(blockIdx.x) * BX + tx, k = I(blockIdx.y);
  const I r0 = k * rows;
  const I r1 = r0 + rows < M ? r0 + rows : M;
  I left = cv < Cv ? strided_count<I>(r0 + ty, r1, I(BY)) : I(0);
  A sg[V], sgx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sg[j] = sgx[j] = A(0);
  if (left > 0) {
    ChannelCoef<A> kc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) kc[j] = coef_of<FromOut>(mean, invstd, w, b, cv * V + j);
    I off = (r0 + ty) * Cv + cv;
    const I step = I(int64_t(BY) * Cv);
    while (left > 0) {
      const int nl = left < U ? int(left) : U;
      Pack<T, V> px[U], pd[U], pz[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < nl) {
          px[u] = load_pack<T, V>(x, off);
          pd[u] = load_pack<T, V>(dy, off);
          if constexpr (Res) pz[u] = load_pack<T, V>(z, off);
          if (I(u + 1) < left) off += step;
        }
      }
      left -= nl;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < nl) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            A xh;
            const A g = grad_pre<Res, FromOut>(load_in(px[u].v[j], pre), res_at<Res>(pz[u], j),
                                               to_acc(pd[u].v[j]), kc[j].mean, kc[j].scale,
                                               kc[j].shift, kc[j].hat, act, xh);
            sg[j] += g;
            sgx[j] += g * xh;
          }
        }
      }
    }
  }
  const int slot = ty * BX + tx;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_g[slot * V + j] = sg[j];
    s_gx[slot * V + j] = sgx[j];
  }
  __syncthreads();
  for (int h = BY / 2; h > 0; h >>= 1) {
    if (ty < h) {
      const int o = (ty + h) * BX + tx;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sg[j] += s_g[o * V + j];
        sgx[j] += s_gx[o * V + j];
        s_g[slot * V + j] = sg[j];
        s_gx[slot * V + j] = sgx[j];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && cv < Cv) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const I idx = k * C + cv * V + j;
      psg[idx] = sg[j];
      psgx[idx] = sgx[j];
    }
  }
}

// Same shape as finalize_stats_kernel. Sums in double; writes grad_bias,
// grad_weight and, when k_xh is given, the dx coefficients (bn_math.h).
template <typename A>
__global__ void __launch_bounds__(kFinalizeX * kFinalizeY)
finalize_sums_kernel(const A* __restrict__ psg, const A* __restrict__ psgx, int64_t C, int64_t K,
                     int64_t cs, int64_t ks, const A* __restrict__ mean,
                     const A* __restrict__ invstd, const A* __restrict__ w,
                     const A* __restrict__ b, bool from_output, A* __restrict__ grad_weight,
                     A* __restrict__ grad_bias, A* __restrict__ k_xh, A* __restrict__ k_const,
                     bool training, double count) {
  __shared__ double s_part[2][kFinalizeY][kFinalizeX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kFinalizeX + tx;
  double sg = 0.0, sgx = 0.0;
  if (c < C) {
    for (int64_t k = ty; k < K; k += kFinalizeY) {
      const int64_t i = c * cs + k * ks;
      sg += double(psg[i]);
      sgx += double(psgx[i]);
    }
  }
  s_part[0][ty][tx] = sg;
  s_part[1][ty][tx] = sgx;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  for (int r = 1; r < kFinalizeY; ++r) {
    sg += s_part[0][r][tx];
    sgx += s_part[1][r][tx];
  }
  const ChannelCoef<A> k = channel_coef(mean[c], invstd[c], w ? w[c] : A(1), b ? b[c] : A(0),
                                         from_output);
  sgx = k.sum_gxh(sg, sgx);
  grad_bias[c] = A(sg);
  grad_weight[c] = A(sgx);
  if (k_xh) dx_coefficients(training, k, sg, sgx, count, k_xh[c], k_const[c]);
}

// dx (see above) and, with a residual, dz = g. Without
// Res, dx is always written; with Res, each of dx, dz only where non-null
// (a uniform branch per pack, outside the element loop).
template <bool Res, typename T, int V, typename I>
__device__ __forceinline__ void store_grads(T* __restrict__ dx, T* __restrict__ dz, I off,
                                            const Pack<T, V>& gx, const Pack<T, V>& gz) {
  if (!Res || dx) store_pack<T, V>(dx, off, gx);
  if constexpr (Res) {
    if (dz) store_pack<T, V>(dz, off, gz);
  }
}

// Same walk as normalize_ncs_kernel.
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, bool FromOut,
          bool Train>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
dx_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ z,
              T* __restrict__ dx, T* __restrict__ dz, I total, I C, I Sv, I per_block,
              const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
              const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b,
              const acc_t<T>* __restrict__ k_xh, const acc_t<T>* __restrict__ k_const, Act act,
              Pre pre) {
  using A = acc_t<T>;
  constexpr int U = bwd_unroll(Res, FromOut);
  const I v0 = I(blockIdx.x) * per_block;
  const I v1 = v0 + per_block < total ? v0 + per_block : total;
  const I t = I(threadIdx.x);
  I left = strided_count<I>(v0 + t, v1, I(kThreads));
  if (left <= 0) return;
  TensorWalk<I> walk(v0 + t, C, Sv, I(kThreads));
  while (left > 0) {
    const int nl = left < U ? int(left) : U;
    Pack<T, V> px[U], pd[U], pz[U];
    I off[U], ch[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        off[u] = walk.off;
        ch[u] = walk.c;
        px[u] = load_pack<T, V>(x, walk.off);
        pd[u] = load_pack<T, V>(dy, walk.off);
        if constexpr (Res) pz[u] = load_pack<T, V>(z, walk.off);
        if (I(u + 1) < left) walk.next();
      }
    }
    left -= nl;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        const ChannelCoef<A> k = coef_of<FromOut>(mean, invstd, w, b, ch[u]);
        const A kx = k_xh[ch[u]], k0 = k_const[ch[u]];
        Pack<T, V> out, gz;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          A xh;
          const A xv = to_acc(px[u].v[j]);
          const A g = grad_pre<Res, FromOut>(pre.fwd(xv), res_at<Res>(pz[u], j),
                                             to_acc(pd[u].v[j]), k.mean, k.scale, k.shift, k.hat,
                                             act, xh);
          out.v[j] = from_acc<T>(pre.grad(dx_value<Train>(g, xh, k.scale, kx, k0), xv));
          if constexpr (Res) gz.v[j] = from_acc<T>(g);
        }
        store_grads<Res>(dx, dz, off[u], out, gz);
      }
    }
  }
}

// Same shape as normalize_nsc_kernel.
template <typename T, int V, typename I, typename Act, typename Pre, bool Res, bool FromOut,
          bool Train>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
dx_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ z,
              T* __restrict__ dx, T* __restrict__ dz, I M, I Cv, I rows,
              const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
              const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b,
              const acc_t<T>* __restrict__ k_xh, const acc_t<T>* __restrict__ k_const, Act act,
              Pre pre) {
  using A = acc_t<T>;
  constexpr int U = nsc_unroll(V, bwd_unroll(Res, FromOut));
  const int tx = threadIdx.x, ty = threadIdx.y, BY = blockDim.y;
  const I cv = I(blockIdx.x) * I(blockDim.x) + tx;
  if (cv >= Cv) return;
  const I r0 = I(blockIdx.y) * rows;
  const I r1 = r0 + rows < M ? r0 + rows : M;
  I left = strided_count<I>(r0 + ty, r1, I(BY));
  if (left <= 0) return;
  ChannelCoef<A> k[V];
  A kx[V], k0[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const I c = cv * V + j;
    k[j] = coef_of<FromOut>(mean, invstd, w, b, c);
    kx[j] = k_xh[c];
    k0[j] = k_const[c];
  }
  I off = (r0 + ty) * Cv + cv;
  const I step = I(int64_t(BY) * Cv);
  while (left > 0) {
    const int nl = left < U ? int(left) : U;
    Pack<T, V> px[U], pd[U], pz[U];
    I offs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        offs[u] = off;
        px[u] = load_pack<T, V>(x, off);
        pd[u] = load_pack<T, V>(dy, off);
        if constexpr (Res) pz[u] = load_pack<T, V>(z, off);
        if (I(u + 1) < left) off += step;
      }
    }
    left -= nl;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nl) {
        Pack<T, V> out, gz;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          A xh;
          const A xv = to_acc(px[u].v[j]);
          const A g = grad_pre<Res, FromOut>(pre.fwd(xv), res_at<Res>(pz[u], j),
                                             to_acc(pd[u].v[j]), k[j].mean, k[j].scale,
                                             k[j].shift, k[j].hat, act, xh);
          out.v[j] = from_acc<T>(pre.grad(dx_value<Train>(g, xh, k[j].scale, kx[j], k0[j]), xv));
          if constexpr (Res) gz.v[j] = from_acc<T>(g);
        }
        store_grads<Res>(dx, dz, offs[u], out, gz);
      }
    }
  }
}

}  // namespace cuda
}  // namespace fusedbn
