// CPU kernel templates for fused BatchNorm + activation.
//
// This header is compiled once per instruction set: cpu_isa.h sets
// `#pragma GCC target(...)`, defines FUSEDBN_CPU_ISA (the namespace that
// keeps the copies apart) and includes it, in two units per copy (the
// forward, FUSEDBN_CPU_HALF_FORWARD, and the backward, _BACKWARD; neither
// defined: both entry points). cpu_dispatch.cpp picks a copy at run time,
// so one build runs anywhere and still uses AVX-512 where it exists.
//
// Vectorization without -ffast-math: every reduction runs over kLanes
// independent accumulators, which the compiler maps to vector registers
// without having to reassociate a floating-point sum.
//
// Pass structure (one pass = one read or write of a full tensor):
//   forward, NCS:  per channel (short planes: per group of channels),
//                  statistics then normalize while the values are still in
//                  L2 -> 1 read + 1 write from DRAM when a channel fits in L2
//                  (N*H*W values), 2 reads + 1 write if not.
//   forward, NSC:  statistics (1 read), normalize (1 read + 1 write).
//   backward:      reductions (read x, dy), then dx (read x, dy, write dx);
//                  NCS keeps a channel's (a group's) x and dy in cache
//                  between the two.
// Statistics: two-pass mean/M2 inside blocks of kBlock values that sit in L1,
// blocks merged with Chan's formula in double, so a large mean with a small
// spread keeps its variance and no value is read twice from DRAM.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "activations.h"
#include "bn_math.h"
#include "cpu_types.h"
#include "params.h"

#ifndef FUSEDBN_CPU_ISA
#error "define FUSEDBN_CPU_ISA before including cpu_kernels.h"
#endif

namespace fusedbn {
namespace FUSEDBN_CPU_ISA {

#define FUSEDBN_INLINE inline __attribute__((always_inline))

#ifndef FUSEDBN_CPU_F16C
#define FUSEDBN_CPU_F16C 0
#endif
#ifndef FUSEDBN_CPU_AVX2
#define FUSEDBN_CPU_AVX2 0
#endif
#ifndef FUSEDBN_CPU_AVX512
#define FUSEDBN_CPU_AVX512 0
#endif
#ifndef FUSEDBN_CPU_FLOAT64
#define FUSEDBN_CPU_FLOAT64 0
#endif

// 32 independent accumulators: enough vector registers in flight to hide the
// add latency (GCC turns 16 lanes into a slow scalar-ish loop: measured 5 GB/s
// vs 45 GB/s for 32 on a run in L1, AVX-512, AVX2 and SSE2 alike). The same
// count on every ISA keeps the summation order, hence the results, identical.
constexpr int kLanes = 32;
constexpr int64_t kBlock = 4096;          // values per cached two-pass block
// Values per thread: below this a thread costs more than it saves. At 32768
// a 2x512x7x7 layer (50176 values) ran on one thread, bound by the latency of
// its reads: kernels alone, 2 threads against 1, contiguous 1.3-1.7x faster
// in every mode (float32, bfloat16, float16), channels-last 1.0-1.3x. At 16
// values per plane (2x512x4x4), 8192 helped the contiguous kernels but cost
// channels-last forward-train 1.4x.
constexpr int64_t kMinPerThread = 16384;

inline int threads_for(int64_t work, int max_threads, int64_t max_items) {
  int64_t t = std::max<int64_t>(1, work / kMinPerThread);
  t = std::min<int64_t>(t, max_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, max_items));
  return static_cast<int>(t);
}

template <typename A>
FUSEDBN_INLINE A lane_sum(const A* a) {
  A t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = a[j];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

// Mean and M2 of a block whose fast two-pass (block_moments, moments_nsc)
// came out non-finite: each(f) calls f on the block's n values in order.
// With an inf or NaN among them, eager's pattern: mean = sum / n (inf, -inf
// or NaN), M2 = NaN. Otherwise the sums overflowed (|x| near the dtype's
// maximum): the corrected two-pass again, in double, on the values scaled
// by a power of two (exact) that brings the largest magnitude near 1, so
// neither sum can overflow; M2 scaled back may still overflow for float64
// data, to inf, as eager's does.
template <typename A, typename Each>
void exact_moments(Each each, double n, double& mean, double& m2) {
  double sum = 0, big = 0;
  bool finite = true;
  each([&](A v) {
    sum += double(v);
    finite &= std::isfinite(v);
    big = std::max(big, std::fabs(double(v)));
  });
  if (!finite) {
    mean = sum / n;
    m2 = NAN;
    return;
  }
  const int e = big > 0 ? std::ilogb(big) : 0;
  const double down = std::ldexp(1.0, -e), up = std::ldexp(1.0, e);
  double m = 0;
  each([&](A v) { m += double(v) * down; });
  m /= n;
  double s1 = 0, s2 = 0;
  each([&](A v) {
    const double d = double(v) * down - m;
    s1 += d;
    s2 += d * d;
  });
  mean = (m + s1 / n) * up;
  m2 = (s2 - s1 * s1 / n) * up * up;
}

// Channels whose planes are short (a channel's planes lie C*S values apart,
// each a short stream the hardware prefetcher barely starts on) are taken
// by groups of adjacent channels that fit in L2 (group_channels): the
// statistics or the backward sums of each channel, then the elementwise
// pass over the group in memory order, while its values are still cached.
// (Per channel, writing short planes is as slow as reading them.)
// Short planes are also grouped several to a block (for_each_block).
inline bool short_planes(const Shape& s) { return s.S < kBlock / 2; }

// Channels per group (short_planes): a group's inputs (N*S values per
// channel, bytes_per_value over all the input tensors) are read from memory
// by the first pass and again by the second, so they should fit in half of
// L2 for the second read to hit it; and at least 4 groups per thread keep
// the threads busy to the end. Only the traffic depends on it, not the
// results.
inline int64_t group_channels(const Shape& s, int64_t bytes_per_value, int nt) {
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(1) << 20;
  }();
  const int64_t per_channel = std::max<int64_t>(1, s.N * s.S * bytes_per_value);
  const int64_t fit = std::max<int64_t>(1, l2 / 2 / per_channel);
  return std::clamp<int64_t>(std::min(fit, s.C / (4 * int64_t(nt))), 1, s.C);
}

// How the contiguous passes share out a tensor: groups of G adjacent
// channels (G = 1 for long planes), and, when that leaves fewer than 4
// groups per thread, each group's N planes in P parts as well (a single
// channel used to run on one thread). The work items are (group, part)
// pairs, item = group * P + part. With P > 1 the parts' statistics or sums
// are merged in part order after a barrier, so the results depend on the
// thread count but not on the timing.
struct NcsWork {
  bool grouped;
  int nt;
  int64_t G, groups, P;
  NcsWork(const Shape& s, int64_t bytes_per_value, int max_threads) {
    grouped = short_planes(s);
    nt = threads_for(s.N * s.C * s.S, max_threads, s.N * s.C);
    G = grouped ? group_channels(s, bytes_per_value, nt) : 1;
    groups = (s.C + G - 1) / G;
    P = nt == 1 || groups >= 4 * int64_t(nt)
            ? 1
            : std::clamp<int64_t>((4 * int64_t(nt) + groups - 1) / std::max<int64_t>(groups, 1), 1,
                                  s.N);
    nt = int(std::clamp<int64_t>(groups * P, 1, nt));  // no channels: still one thread
  }
  int64_t items() const { return groups * P; }
  // Planes lo..hi-1 of part `part`.
  int64_t lo(const Shape& s, int64_t part) const { return s.N * part / P; }
};

// Whether the contiguous backward sums planes of 64 values and more one by
// one in memory order (sums_part), or channel by channel in blocks of
// planes. Chosen per copy from the machines measured (kernels alone, 2
// threads): on the AVX-512 Xeon the channel walk was latency-bound (float32
// 64x256x14x14 1.4x slower); on the AVX2 EPYC it is each plane's lane
// zeroing and lane sums that cost, and the channel walk is faster (backward,
// 64x256x14x14 float32 1.1-1.3x, bfloat16 1.3-1.9x; 8x512x14x14 1.3-1.6x,
// 1.2-1.7x). The copies then sum such planes in different orders.
constexpr bool kPlaneOrderSums = FUSEDBN_CPU_AVX512;

// Planes of the backward's memory-order sums over a group asked for this far
// ahead: a group's planes come in chunks (G*S values, then a jump of C*S)
// that the hardware prefetcher restarts on at each chunk (8x512x14x14
// kernel-only backward 1.2x faster with 4 than without; 2 and 8 less).
constexpr int64_t kAhead = 4;

// Calls f(n0, n1, off, len) for blocks of planes lo..hi-1 of a channel:
// planes n0..n1-1, values off..off+len-1 of each plane, about kBlock values
// per block (NCS layout).
template <typename F>
FUSEDBN_INLINE void for_each_block(const Shape& s, int64_t lo, int64_t hi, F f) {
  if (!short_planes(s)) {
    for (int64_t n = lo; n < hi; ++n)
      for (int64_t off = 0; off < s.S; off += kBlock) f(n, n + 1, off, std::min(kBlock, s.S - off));
  } else {
    const int64_t per = std::max<int64_t>(1, kBlock / s.S);
    for (int64_t n0 = lo; n0 < hi; n0 += per) f(n0, std::min(n0 + per, hi), int64_t(0), s.S);
  }
}

// Asks for the n values that start `ahead` bytes after p (none when n <= 0)
// to be brought into cache; past the end of the tensor too: a prefetch never
// faults (and the address is computed as an integer, not a pointer).
template <typename T>
FUSEDBN_INLINE void prefetch_values(const T* p, int64_t n, int64_t ahead = 0) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) + uintptr_t(ahead);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a + uintptr_t(b)));
}

// Activations built on exp, erf or tanh: slow per value, so their passes
// read ahead (reads_ahead) and the backward's column loop takes their rows
// one at a time (rows_at_once).
template <typename Act>
struct Transcendental : std::false_type {};
template <typename A>
struct Transcendental<ELUAct<A>> : std::true_type {};
template <typename A>
struct Transcendental<SiLUAct<A>> : std::true_type {};
template <typename A>
struct Transcendental<GELUAct<A>> : std::true_type {};
template <typename A>
struct Transcendental<GELUTanhAct<A>> : std::true_type {};
template <typename A>
struct Transcendental<MishAct<A>> : std::true_type {};

// A stream from memory whose loop spends tens of cycles per cache line
// (16-bit values widened and narrowed, exp- or erf-based activations) is not
// fetched far enough ahead by the hardware prefetcher, and waits for each
// line: gelu eval took twice as long as gelu forward-train, whose normalize
// reads what its statistics pass left in L2. Such passes (reads_ahead) ask
// for their input kPrefetchBytes ahead (eval in pieces of kPiece values).
// Kernels alone, AVX-512, 2 threads: gelu eval 8x64x3136 2.0 -> 0.65 ms,
// 64x256x196 2.8 -> 2.0; bfloat16 and float16 1.1-1.3x faster in most modes
// (AVX2 copy: up to 1.37x). 4 KB ahead gained less, 16 KB less again; whole
// planes ahead (3136 values) cost float32 relu eval 10%. Not for float32 with
// the cheap activations, fast enough for the hardware prefetcher, where the
// extra instructions gained nothing in eval and cost up to 7% in the
// statistics (2026-12-02 prefetch report).
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kPiece = 256;

// Which passes ask (kPrefetchBytes), in one place: those reading T values
// in registers through a slow loop, bfloat16 or an exp/erf/tanh activation.
// float16 asks where it is widened (widen), which every pass reading it goes
// through, so its loops (over L1 buffers) do not ask again.
template <typename T, typename Act>
constexpr bool reads_ahead =
    (sizeof(T) == 2 || Transcendental<Act>::value) && !std::is_same<T, fp16_t>::value;

template <bool Ahead, typename T>
FUSEDBN_INLINE void prefetch_ahead(const T* p, int64_t n) {
  if constexpr (Ahead) prefetch_values(p, n, kPrefetchBytes);
}

// Short planes (the blocks above that span several) are short streams which
// the hardware prefetcher barely starts on before they end: ask for the
// planes of the next block (up to plane hi) while this one is worked on.
template <typename T>
FUSEDBN_INLINE void prefetch_next_block(const Shape& s, const T* chan, int64_t n0, int64_t n1,
                                        int64_t hi, int64_t len) {
  if (n1 - n0 < 2 || chan == nullptr) return;
  const int64_t stride = s.C * s.S, end = std::min(hi, n1 + (n1 - n0));
  for (int64_t pl = n1; pl < end; ++pl) prefetch_values(chan + pl * stride, len);
}

// ------------------------------------------------- 16-bit <-> float
//
// bfloat16 is read where the loops use it: load() widens in registers (a
// shift), which vectorizes with the arithmetic around it. It is written with
// store<bf16_t>() (a few integer operations) in the baseline copy; the AVX2
// and AVX-512 copies compute outputs into float buffers and narrow those
// (y_buffered). float16 is widened into L1-sized float buffers and narrowed
// back (F16C; GCC converts _Float16 one value at a time). Float and double
// are read and written as they are.

template <typename T>
constexpr bool is_16bit = std::is_same<T, bf16_t>::value || std::is_same<T, fp16_t>::value;

template <typename T>
FUSEDBN_INLINE void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}
template <typename T>
FUSEDBN_INLINE void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(src[i]);
}
#if FUSEDBN_CPU_F16C
template <>
FUSEDBN_INLINE void widen(const fp16_t* src, float* dst, int64_t n) {
  const int64_t body = n - n % 8;
  for (int64_t l = 0; l < body; l += 32) {
    // A cache line (32 values) at a time: float16's passes read memory here.
    // (A test per 8 values instead cost the backward 5-8%.)
    prefetch_values(src + l, 32, kPrefetchBytes);
    for (int64_t i = l; i < std::min(l + 32, body); i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (int64_t i = body; i < n; ++i) dst[i] = load(src[i]);
}
template <>
FUSEDBN_INLINE void narrow(const float* src, fp16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = store<fp16_t>(src[i]);
}
#endif
#if FUSEDBN_CPU_AVX512
template <>
FUSEDBN_INLINE void narrow(const float* src, bf16_t* dst, int64_t n) {
  bf16_narrow_avx512(src, dst, n);
}
#elif FUSEDBN_CPU_AVX2
template <>
FUSEDBN_INLINE void narrow(const float* src, bf16_t* dst, int64_t n) {
  bf16_narrow_avx2(src, dst, n);
}
#endif

// Storage types the loops read and write themselves (load / store<T>).
template <typename T>
constexpr bool in_registers = !std::is_same<T, fp16_t>::value;

// The values x[0..n) as the loops read them, with load(): x itself, or for
// float16 widened into buf.
template <typename T>
FUSEDBN_INLINE auto as_acc(const T* x, int64_t n, acc_t<T>* buf) {
  if constexpr (in_registers<T>) {
    return x;
  } else {
    widen(x, buf, n);
    return static_cast<const acc_t<T>*>(buf);
  }
}
template <typename F>
struct IsIdentity : std::false_type {};
template <typename A>
struct IsIdentity<IdentityAct<A>> : std::true_type {};

// The kernels' input a = pre(x): with order ActBn the activation `pre` is
// applied as x is loaded (BnAct passes IdentityAct), so everything after the
// load is the plain BatchNorm of a. Transformed values (and float16) go
// through an L1 buffer.
template <typename T, typename Pre>
constexpr bool buffered = !in_registers<T> || !IsIdentity<Pre>::value;

template <typename T, typename Pre>
FUSEDBN_INLINE auto load_input(const T* x, int64_t n, acc_t<T>* buf, const Pre& pre) {
  if constexpr (IsIdentity<Pre>::value) {
    return as_acc(x, n, buf);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = pre.fwd(acc_t<T>(load(x[i])));
    return static_cast<const acc_t<T>*>(buf);
  }
}

// Outputs computed in a float buffer and narrowed afterwards (narrow_to):
// float16; bfloat16 in the AVX-512 and AVX2 copies, whose narrowing of a
// whole buffer (cpu_bf16_avx512.h, vcvtneps2bf16 where present;
// cpu_bf16_avx2.h) costs less than the rounding GCC vectorizes from
// store<bf16_t> (streaming eval of 14x14 planes: 1.3x faster, measured, in
// both); and 16-bit dx with order ActBn, whose chain rule
// through pre comes before the rounding. Everything else is stored where it
// belongs.
template <typename T>
constexpr bool y_buffered =
    !in_registers<T> || ((FUSEDBN_CPU_AVX512 || FUSEDBN_CPU_AVX2) && std::is_same<T, bf16_t>::value);
template <typename T, typename Pre>
constexpr bool out_buffered = y_buffered<T> || (is_16bit<T> && !IsIdentity<Pre>::value);

template <bool Buf, typename T>
FUSEDBN_INLINE auto out_view(T* y, acc_t<T>* buf) {
  if constexpr (Buf) return buf;
  else return y;
}
template <bool Buf, typename S, typename T>
FUSEDBN_INLINE void narrow_to(const S* src, T* y, int64_t n) {
  if constexpr (Buf) narrow(src, y, n);
}

// Buffered outputs of runs that follow each other in memory (the short
// planes of the memory-order passes), collected in buf and narrowed by one
// call when the next run is not adjacent, the buffer is full, or at flush():
// one call per 7x7 plane cost more than computing the plane.
template <typename T>
struct PendingNarrow {
  acc_t<T>* buf;
  int64_t cap;
  T* dst = nullptr;
  int64_t filled = 0;
  // Where to compute the n (<= cap) outputs bound for out.
  acc_t<T>* slot(T* out, int64_t n) {
    if (filled && (out != dst + filled || filled + n > cap)) flush();
    if (filled == 0) dst = out;
    acc_t<T>* at = buf + filled;
    filled += n;
    return at;
  }
  void flush() {
    if (filled) narrow(buf, dst, filled);
    filled = 0;
  }
};
template <bool Buf, typename T>
FUSEDBN_INLINE auto out_slot(PendingNarrow<T>& pending, T* out, int64_t n) {
  if constexpr (Buf) return pending.slot(out, n);
  else return out;
}

// With order ActBn, turns the n gradients d(bn)/da in g into dL/dx = g * pre'(x).
template <typename T, typename G, typename Pre>
FUSEDBN_INLINE void chain_input_grad(G* g, const T* x, int64_t n, const Pre& pre) {
  if constexpr (!IsIdentity<Pre>::value)
    for (int64_t i = 0; i < n; ++i) g[i] = pre.grad(g[i], acc_t<T>(load(x[i])));
}

// v stored as Y.
template <typename Y, typename A>
FUSEDBN_INLINE void put(Y* y, int64_t i, A v) {
  y[i] = store<Y>(v);
}

// z[i] as its accumulation type, or 0 without a residual (z is then null and
// never read).
template <bool Res, typename Z>
FUSEDBN_INLINE auto z_at(const Z* z, int64_t i) {
  if constexpr (Res) return load(z[i]);
  else return decltype(load(*z))(0);
}

// The residual values z[off..off+n) (as_acc), or null without a residual.
template <bool Res, typename T>
FUSEDBN_INLINE auto residual_acc(const T* z, int64_t off, int64_t n, acc_t<T>* buf) {
  if constexpr (Res) return as_acc(z + off, n, buf);
  else return static_cast<const T*>(nullptr);
}

// ---------------------------------------------------------- contiguous runs
// Loops over n contiguous values of one channel, in the accumulation type A.

// Lane accumulators: kLanes in registers for the vector body of each run,
// and a separate set for the runs' tails (fewer than kLanes values each),
// indexed by position in the tail: indexing `v` with a run-time index would
// keep it in memory instead of registers, and one scalar for every tail would
// sum a block of short planes (a 4x4 plane is all tail) sequentially, losing
// ~10 ulps of the variance.
template <typename A>
struct Lanes {
  A v[kLanes] = {};
  A t[kLanes] = {};
  FUSEDBN_INLINE A sum() const { return lane_sum(v) + lane_sum(t); }
};

// Mean and M2 of a block of `planes` runs of `len` values, run k at
// x + k * stride, all in L1, by the corrected two-pass algorithm: the first
// pass gives a rounded mean m, the second sums d = x - m and d^2, and
// M2 = sum(d^2) - sum(d)^2 / n removes what the rounding of m added (with
// |mean| >> std a float mean is off by far more than std allows).
// An inf or NaN anywhere in the lanes (an inf/NaN input, or sums that
// overflowed) reaches mean or M2, and one check per block sends those
// blocks to exact_moments.
template <typename X, typename A = acc_t<X>>
FUSEDBN_INLINE void block_moments(const X* x, int64_t stride, int64_t planes, int64_t len,
                                  double& mean, double& m2) {
  const int64_t body = len - len % kLanes;
  const A n = A(planes * len);
  Lanes<A> acc;
  for (int64_t k = 0; k < planes; ++k) {
    const X* r = x + k * stride;
    for (int64_t i = 0; i < body; i += kLanes) {
      prefetch_ahead<reads_ahead<X, IdentityAct<A>>>(r + i, kLanes);
      for (int j = 0; j < kLanes; ++j) acc.v[j] += A(load(r[i + j]));
    }
    for (int64_t i = body; i < len; ++i) acc.t[i - body] += A(load(r[i]));
  }
  const A m = acc.sum() / n;
  Lanes<A> s1, sq;
  for (int64_t k = 0; k < planes; ++k) {
    const X* r = x + k * stride;
    for (int64_t i = 0; i < body; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const A d = A(load(r[i + j])) - m;
        s1.v[j] += d;
        sq.v[j] += d * d;
      }
    for (int64_t i = body; i < len; ++i) {
      const A d = A(load(r[i])) - m;
      s1.t[i - body] += d;
      sq.t[i - body] += d * d;
    }
  }
  const double d1 = double(s1.sum());
  mean = double(m) + d1 / double(n);
  m2 = double(sq.sum()) - d1 * d1 / double(n);
  if (std::isfinite(mean) && std::isfinite(m2)) return;
  exact_moments<A>(
      [&](auto f) {
        for (int64_t k = 0; k < planes; ++k)
          for (int64_t i = 0; i < len; ++i) f(A(load(x[k * stride + i])));
      },
      double(n), mean, m2);
}

// ------------------------------------------------- short planes as columns
//
// In a group of short planes (group_channels), row n holds the group's
// channels side by side: (c1 - c0) * S contiguous values. The statistics
// take the group as a matrix of such rows, summed column by column (whole
// vectors whatever S) in chunks of channels of at most kCols columns and
// blocks of rows, each channel's S columns added at the end. Per channel and
// plane instead, block_moments paid a tail, lane zeroing and lane sums for
// every S-value plane (kernels alone, AVX2, float32 forward-train at
// 8x2048x16: 22% of a copy's bandwidth, 8x1024x49: 38%).
// Taken for planes shorter than S_max, where that pays: the column loops
// keep their per-column constants and sums in memory (for_rows), and each
// block adds per-channel work (constants repeated, column sums added),
// against the lanes' fixed cost per plane. Kernels alone, AVX2, 2 threads,
// columns against lanes, float32: forward-train 8x2048x16 2.5-3x,
// 8x1024x49 1.5x, 8x512x64 1.1-1.4x, 8x256x100 1.1-1.2x faster, 8x512x196
// 1.1x slower; backward 8x1024x49 1.05x, 32x256x49 1.4x faster, 8x512x64
// and 8x256x100 1.1x slower. So the forward takes S < 128, the backward
// S < 64. bfloat16 gained as much or more in every case tried. The AVX-512
// copy (Sapphire Rapids, 2 threads) gained in the backward at 64-100 too:
// 8x512x64, 32x128x81 and 8x256x100 1.1-2x faster, both dtypes; there it
// takes S < 128. Eval (normalize) takes S < 128 as the forward: 8x2048x16
// and 8x1024x49 1.15-2x faster (8x512x49 even), while at 144-529 the columns
// were up to 1.4x slower (AVX-512).
constexpr int64_t kCols = 1024;
constexpr int64_t kColumnsForward = 128;
#ifdef FUSEDBN_CPU_AVX512
constexpr int64_t kColumnsBackward = 128;
#else
constexpr int64_t kColumnsBackward = 64;
#endif
inline bool as_columns(const Shape& s, int64_t S_max) { return s.S < S_max; }
struct ColumnBlocks {
  int64_t S, per_chunk, rows;
  explicit ColumnBlocks(int64_t s)
      : S(s),
        per_chunk(std::max<int64_t>(1, kCols / std::max<int64_t>(s, 1))),
        // Rows per block: at most 64 values in a column's float sums; the
        // block (read twice) at most 16K values, in L2 with its group.
        rows(std::clamp<int64_t>(16 * kBlock / std::max<int64_t>(per_chunk * s, 1), 1, 64)) {}
  int64_t cols() const { return per_chunk * S; }  // most columns of a chunk
};

// sum(v[0..n)) in double, over 8 independent sums (one chain of n
// dependent adds was as slow as the column sums themselves at S = 196).
template <typename A>
FUSEDBN_INLINE double wide_sum(const A* v, int64_t n) {
  double a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) a[j] += double(v[i + j]);
  for (int j = 0; i < n; ++i, ++j) a[j] += double(v[i]);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Sets v[k * S + u] = f(k) for k < nc, u < S: channel constants repeated
// per column.
template <typename A, typename F>
FUSEDBN_INLINE void repeat_columns(A* v, int64_t nc, int64_t S, F f) {
  for (int64_t k = 0; k < nc; ++k) {
    const A a = f(k);
    for (int64_t u = 0; u < S; ++u) v[k * S + u] = a;
  }
}

// A chunk's normalization constants repeated per column: channel k's mean,
// scale and shift at columns k * S .. k * S + S - 1.
template <typename A>
struct ColumnConstants {
  std::vector<A> v;
  int64_t cw;  // most columns of a chunk
  explicit ColumnConstants(int64_t cols) : v(size_t(3 * cols)), cw(cols) {}
  void set(const ChannelCoef<A>* q, int64_t nc, int64_t S) {
    repeat_columns(v.data(), nc, S, [&](int64_t k) { return q[k].mean; });
    repeat_columns(v.data() + cw, nc, S, [&](int64_t k) { return q[k].scale; });
    repeat_columns(v.data() + 2 * cw, nc, S, [&](int64_t k) { return q[k].shift; });
  }
  const A* mean() const { return v.data(); }
  const A* scale() const { return v.data() + cw; }
  const A* shift() const { return v.data() + 2 * cw; }
};

// Calls f(i, Width<R>) for rows i..i+R-1 of 0..rows-1, four at a time
// (then one): the column loops load and store each column's sums, and
// read its constants, once per four rows (the stores and loads bound them
// otherwise). A column's values are still added row by row, in order.
template <int K>
using Width = std::integral_constant<int, K>;
constexpr int kRowsAtOnce = 4;
template <int R = kRowsAtOnce, typename F>
FUSEDBN_INLINE void for_rows(int64_t rows, F f) {
  int64_t i = 0;
  for (; i + R <= rows; i += R) f(i, Width<R>{});
  for (; i < rows; ++i) f(i, Width<1>{});
}

// Four inlined copies of an exp/erf/tanh derivative left GCC 12's column
// loop scalar (kernels alone, AVX-512, float32 8x512x49 backward: silu 0.89
// ms against 0.25 ms one row at a time).
template <typename Act>
constexpr int rows_at_once = Transcendental<Act>::value ? 1 : kRowsAtOnce;

// Mean and M2 of channels 0..nc-1 of a block of `rows` rows of nc * S
// columns, row i at r + i * rs, merged into mo[0..nc): the corrected
// two-pass of block_moments, on column sums. scratch: 3 * nc * S values.
template <typename A, typename X>
FUSEDBN_INLINE void column_moments(const X* r, int64_t rs, int64_t rows, int64_t nc, int64_t S,
                                   A* scratch, Moments<double>* mo) {
  const int64_t W = nc * S;
  A* m = scratch;
  A* s1 = m + W;
  A* sq = s1 + W;
  std::fill(s1, s1 + W, A(0));
  for_rows(rows, [&](int64_t i, auto nr) {
    constexpr int R = decltype(nr)::value;
#pragma GCC ivdep
    for (int64_t j = 0; j < W; ++j) {
      A a = s1[j];
      for (int u = 0; u < R; ++u) a += A(load(r[(i + u) * rs + j]));
      s1[j] = a;
    }
  });
  const double nb = double(rows * S);
  repeat_columns(m, nc, S, [&](int64_t k) { return A(wide_sum(s1 + k * S, S) / nb); });
  std::fill(s1, s1 + W, A(0));
  std::fill(sq, sq + W, A(0));
  for_rows(rows, [&](int64_t i, auto nr) {
    constexpr int R = decltype(nr)::value;
#pragma GCC ivdep
    for (int64_t j = 0; j < W; ++j) {
      A a = s1[j], b = sq[j];
      const A mj = m[j];
      for (int u = 0; u < R; ++u) {
        const A d = A(load(r[(i + u) * rs + j])) - mj;
        a += d;
        b += d * d;
      }
      s1[j] = a;
      sq[j] = b;
    }
  });
  for (int64_t k = 0; k < nc; ++k) {
    const double d1 = wide_sum(s1 + k * S, S), q = wide_sum(sq + k * S, S);
    double mean = double(m[k * S]) + d1 / nb, m2 = q - d1 * d1 / nb;
    if (!(std::isfinite(mean) && std::isfinite(m2)))
      exact_moments<A>(
          [&](auto f) {
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t u = 0; u < S; ++u) f(A(load(r[i * rs + k * S + u])));
          },
          nb, mean, m2);
    mo[k].merge(nb, mean, m2);
  }
}

// y = act((x - mean) * scale + shift [+ z]). Subtracting the mean first
// (rather than folding it into the shift) keeps the result exact when
// |mean| >> std; the backward recomputes the pre-activation with this same
// expression, so the branch it takes matches the forward bit for bit.
// Res: a residual z is added before the activation (z is null otherwise).
// Activity counting (p.active_count): see bn_math.h, Count.

// How many of x[0..n) `pre` counts as active (an integer reduction, which
// the compiler vectorizes freely).
template <typename T, typename Pre>
FUSEDBN_INLINE int64_t count_active(const T* x, int64_t n, Pre pre) {
  int32_t active = 0;  // n <= kBlock
  for (int64_t i = 0; i < n; ++i) active += pre.active(acc_t<T>(load(x[i])));
  return active;
}

// A channel constant of a run: k, or k[i] where the run spans several
// channels and the constants are repeated per column (short planes as
// columns).
template <typename K>
FUSEDBN_INLINE K at(K k, int64_t) {
  return k;
}
template <typename K>
FUSEDBN_INLINE K at(const K* k, int64_t i) {
  return k[i];
}

// Runs with one channel's constants compute their last n % kLanes values
// (the tail) as one whole vector in the AVX-512 copy: GCC 12 leaves a tail
// to scalar code, where a select on the sign (leaky_relu, relu's gradient)
// is a branch, mispredicted on random signs, and a bfloat16 value is widened
// and rounded one at a time. The tail is copied into a kLanes-value array by
// masked loads and whole-vector stores, which the loop's vector loads read
// straight from the store buffer (filled by scalar stores, the vector loads
// waited for them: float32 and float16 1.2x slower). Kernels alone, Zen 4,
// 2 threads: bfloat16 64x256x196 relu backward 1.36x, 16x512x169 2.05x
// faster; leaky_relu 1.4-2.6x (bfloat16, float16) and 1.1-1.2x (float32) in
// every mode; the rest within noise (2026-12-02 zen4 padded-tails report).
// Runs with per-column constants (K an array: whole rows of a chunk, one
// tail per many values) keep the scalar tail, as do the other copies.
template <typename K>
constexpr bool padded_tail = FUSEDBN_CPU_AVX512 && std::is_arithmetic<K>::value;
#if FUSEDBN_CPU_AVX512
static_assert(kLanes == 32, "pad_tail and unpad_tail move 32 values");
FUSEDBN_INLINE __mmask16 lanes_below(int64_t r) {
  return r >= 16 ? __mmask16(0xffff) : r <= 0 ? __mmask16(0) : __mmask16((1u << r) - 1);
}
// dst = src[0..r) followed by kLanes - r copies of fill (r < kLanes).
template <typename T>
FUSEDBN_INLINE void pad_tail(const T* src, int64_t r, T fill, T (&dst)[kLanes]) {
  if constexpr (sizeof(T) == 2) {
    uint16_t f;
    std::memcpy(&f, &fill, 2);
    const __mmask32 m = __mmask32((uint64_t(1) << r) - 1);
    _mm512_storeu_si512(dst, _mm512_mask_loadu_epi16(_mm512_set1_epi16(short(f)), m, src));
  } else {
    static_assert(sizeof(T) == 4, "float, bfloat16 and float16 only");
    uint32_t f;
    std::memcpy(&f, &fill, 4);
    const __m512i fv = _mm512_set1_epi32(int(f));
    _mm512_storeu_si512(dst, _mm512_mask_loadu_epi32(fv, lanes_below(r), src));
    _mm512_storeu_si512(dst + 16, _mm512_mask_loadu_epi32(fv, lanes_below(r - 16), src + 16));
  }
}
// dst[0..r) = src[0..r).
template <typename T>
FUSEDBN_INLINE void unpad_tail(const T (&src)[kLanes], int64_t r, T* dst) {
  if constexpr (sizeof(T) == 2) {
    _mm512_mask_storeu_epi16(dst, __mmask32((uint64_t(1) << r) - 1), _mm512_loadu_si512(src));
  } else {
    static_assert(sizeof(T) == 4, "float, bfloat16 and float16 only");
    _mm512_mask_storeu_epi32(dst, lanes_below(r), _mm512_loadu_si512(src));
    _mm512_mask_storeu_epi32(dst + 16, lanes_below(r - 16), _mm512_loadu_si512(src + 16));
  }
}
#else
// Named by the discarded branches of the other copies; never called there.
template <typename T>
void pad_tail(const T*, int64_t, T, T (&)[kLanes]);
template <typename T>
void unpad_tail(const T (&)[kLanes], int64_t, T*);
#endif

// A backward run's tail, the r values from `at`, padded (pad_tail) with
// dy = 0 and a value of the run: the padding adds g = 0 and g * xh = 0 to
// the sums, or where xh is not finite a NaN, which sends the block to
// reduce_exact (that reads only the run). Copied before any output is
// written: dx may be dy.
template <bool Res, typename X, typename Z, typename D>
struct PaddedTail {
  X x[kLanes];
  Z z[kLanes];
  D dy[kLanes];
  PaddedTail(const X* xs, const Z* zs, const D* ds, int64_t at, int64_t r) {
    pad_tail(xs + at, r, xs[at], x);
    pad_tail(ds + at, r, D{}, dy);
    if constexpr (Res) pad_tail(zs + at, r, zs[at], z);
  }
};

// Count == kCountPre: returns how many pre-activations `act` counts as
// active; 0 otherwise.
template <bool Res, int Count, typename X, typename Z, typename Y, typename K, typename Act>
FUSEDBN_INLINE int64_t run_normalize(const X* x, const Z* z, Y* y, int64_t n, K mean, K scale,
                                     K shift, Act act) {
  using A = decltype(at(mean, 0));
  int32_t active = 0;  // n <= kBlock
  // Counting would have to leave the padding out: those runs keep the
  // scalar tail.
  constexpr bool Pad = padded_tail<K> && Count != kCountPre;
  const int64_t body = Pad ? n - n % kLanes : n;
#pragma GCC ivdep
  for (int64_t i = 0; i < body; ++i) {
    const A pre = pre_activation<Res>(A(load(x[i])) - at(mean, i), A(z_at<Res>(z, i)),
                                      at(scale, i), at(shift, i));
    if constexpr (Count == kCountPre) active += act.active(pre);
    put(y, i, act.fwd(pre));
  }
  if constexpr (Pad) {
    if (body == n) return active;
    const int64_t r = n - body;
    X xt[kLanes];
    Z zt[kLanes];
    Y yt[kLanes];
    pad_tail(x + body, r, x[body], xt);
    if constexpr (Res) pad_tail(z + body, r, z[body], zt);
    for (int j = 0; j < kLanes; ++j)
      put(yt, j, act.fwd(pre_activation<Res>(A(load(xt[j])) - mean, A(z_at<Res>(zt, j)), scale,
                                             shift)));
    unpad_tail(yt, r, y + body);
  }
  return active;
}

// Adds the run's sum(g) and sum(g * xh) to the lanes sg, sgx.
template <bool Res, bool FromOut, typename X, typename Z, typename D, typename A, typename Act>
FUSEDBN_INLINE void run_reduce(const X* x, const Z* z, const D* dy, int64_t n, ChannelCoef<A> k,
                               Act act, Lanes<A>& sg, Lanes<A>& sgx) {
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    constexpr bool ahead = reads_ahead<X, Act>;
    prefetch_ahead<ahead>(x + i, kLanes);
    prefetch_ahead<ahead>(dy + i, kLanes);
    if constexpr (Res) prefetch_ahead<ahead>(z + i, kLanes);
    for (int j = 0; j < kLanes; ++j) {
      A xh;
      const A g = grad_pre<Res, FromOut>(A(load(x[i + j])), A(z_at<Res>(z, i + j)),
                                         A(load(dy[i + j])), k.mean, k.scale, k.shift, k.hat, act,
                                         xh);
      sg.v[j] += g;
      sgx.v[j] += g * xh;
    }
  }
  if constexpr (!padded_tail<A>) {
    for (int64_t i = body; i < n; ++i) {
      A xh;
      const A g = grad_pre<Res, FromOut>(A(load(x[i])), A(z_at<Res>(z, i)), A(load(dy[i])), k.mean,
                                         k.scale, k.shift, k.hat, act, xh);
      sg.t[i - body] += g;
      sgx.t[i - body] += g * xh;
    }
  } else if (body < n) {
    const PaddedTail<Res, X, Z, D> t(x, z, dy, body, n - body);
    for (int j = 0; j < kLanes; ++j) {
      A xh;
      const A g = grad_pre<Res, FromOut>(A(load(t.x[j])), A(z_at<Res>(t.z, j)), A(load(t.dy[j])),
                                         k.mean, k.scale, k.shift, k.hat, act, xh);
      sg.t[j] += g;
      sgx.t[j] += g * xh;
    }
  }
}

// run_reduce's sums in double, for runs whose float lanes came out
// non-finite (|dy| near float's maximum): adds them to sg, sgx.
template <bool Res, bool FromOut, typename X, typename Z, typename D, typename A, typename Act>
void reduce_exact(const X* x, const Z* z, const D* dy, int64_t n, int64_t stride,
                  ChannelCoef<A> k, Act act, double& sg, double& sgx) {
  for (int64_t i = 0; i < n; ++i) {
    A xh;
    const A v = A(load(x[i * stride])), zi = A(z_at<Res>(z, i * stride));
    const A g = grad_pre<Res, FromOut>(v, zi, A(load(dy[i * stride])), k.mean, k.scale, k.shift,
                                       k.hat, act, xh);
    // xh again in double: in float it overflows (then g * xh is inf, or NaN
    // at g = 0) where eager's double sum is finite.
    double xd;
    if constexpr (FromOut) xd = (double(act.inverse(v)) - double(k.shift) - double(zi)) * double(k.hat);
    else xd = (double(v) - double(k.mean)) * double(k.hat);
    sg += double(g);
    sgx += double(g) * xd;
  }
}

// Whether a block's float sums need reduce_exact: only float lanes can
// overflow where eager's double sums do not.
template <typename A>
FUSEDBN_INLINE bool sums_overflowed(A sg, A sgx) {
  return std::is_same<A, float>::value && !(std::isfinite(sg) && std::isfinite(sgx));
}

// Channels-last: adds a chunk's K column sums g1, g2 over rr rows of
// `width` columns to sg, sgx, those that overflowed again in double
// (reduce_exact). Out of line, so the chunk loop keeps its accumulators in
// registers.
template <bool Res, bool FromOut, typename A, typename X, typename Z, typename D, typename Act>
__attribute__((noinline)) void redo_overflowed(const A* g1, const A* g2, int K, int64_t c0,
                                               const X* xb, const Z* zb, const D* dyb, int64_t rr,
                                               int64_t width, const ChannelCoef<A>* coef, Act act,
                                               double* sg, double* sgx) {
  for (int j = 0; j < K; ++j) {
    const int64_t e = c0 + j;
    if (sums_overflowed(g1[j], g2[j])) {
      reduce_exact<Res, FromOut>(xb + e, Res ? zb + e : nullptr, dyb + e, rr, width, coef[e], act,
                                 sg[e], sgx[e]);
    } else {
      sg[e] += double(g1[j]);
      sgx[e] += double(g2[j]);
    }
  }
}

// Which gradients the dx pass writes (a template switch, so the element
// loops never test for them): dx, and with a residual dz = g, or only dz.
enum Wanted : int { kDx = 1, kDz = 2, kDxDz = 3 };

// Calls f(Train, Out) with the pass's switches as types: training or eval,
// and which of dx, dz (non-null) are written. Without a residual only dx
// exists (and the pass runs only when it is wanted).
template <bool Res, typename F>
FUSEDBN_INLINE void with_dx_switches(bool training, const void* dx, const void* dz, F&& f) {
  auto out = [&](auto train) {
    using Out = std::integral_constant<int, kDx>;
    if constexpr (!Res) {
      f(train, Out{});
    } else if (dx && dz) {
      f(train, std::integral_constant<int, kDxDz>{});
    } else if (dx) {
      f(train, Out{});
    } else {
      f(train, std::integral_constant<int, kDz>{});
    }
  };
  if (training) out(std::true_type{});
  else out(std::false_type{});
}

// dx (Out & kDx) and, with a residual, dz = g (Out & kDz).
// Train: dx = g * scale + xh * k_xh + k_const (the batch statistics' terms);
// eval: dx = g * scale, which must not see xh (inf * 0 = NaN at an inf input).
// The constants are one channel's scalars (K = A), or arrays of per-value
// constants (K = const A*, see at).
template <typename K>
struct DxConstants {
  K mean, scale, shift, hat, k_xh, k_const;
};
template <bool Train, int Out, bool Res, bool FromOut, typename X, typename Z, typename D,
          typename O, typename OZ, typename K, typename Act>
FUSEDBN_INLINE void run_dx(const X* x, const Z* z, const D* dy, O* dx, OZ* dz, int64_t n,
                           DxConstants<K> k, Act act) {
  using A = decltype(at(k.mean, 0));
  const int64_t body = padded_tail<K> ? n - n % kLanes : n;
  // ivdep: as rows_dx's.
#pragma GCC ivdep
  for (int64_t i = 0; i < body; ++i) {
    A xh;
    const A sc = at(k.scale, i);
    const A g = grad_pre<Res, FromOut>(A(load(x[i])), A(z_at<Res>(z, i)), A(load(dy[i])),
                                       at(k.mean, i), sc, at(k.shift, i), at(k.hat, i), act, xh);
    if constexpr ((Out & kDx) != 0)
      put(dx, i, dx_value<Train>(g, xh, sc, at(k.k_xh, i), at(k.k_const, i)));
    if constexpr (Res && (Out & kDz) != 0) put(dz, i, g);
  }
  if constexpr (padded_tail<K>) {
    if (body == n) return;
    const int64_t r = n - body;
    const PaddedTail<Res, X, Z, D> t(x, z, dy, body, r);
    O ot[kLanes];
    OZ ozt[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      A xh;
      const A g = grad_pre<Res, FromOut>(A(load(t.x[j])), A(z_at<Res>(t.z, j)), A(load(t.dy[j])),
                                         k.mean, k.scale, k.shift, k.hat, act, xh);
      if constexpr ((Out & kDx) != 0)
        put(ot, j, dx_value<Train>(g, xh, k.scale, k.k_xh, k.k_const));
      if constexpr (Res && (Out & kDz) != 0) put(ozt, j, g);
    }
    if constexpr ((Out & kDx) != 0) unpad_tail(ot, r, dx + body);
    if constexpr (Res && (Out & kDz) != 0) unpad_tail(ozt, r, dz + body);
  }
}

// ---------------------------------------------------------------- forward
//
// Template switches of the forward: Res (a residual is added before the
// activation), Count (what activity counting counts, if anything), Act (the
// activation after the normalization) and Pre (the activation applied to the
// input, order ActBn; one of Act/Pre is identity).

template <typename T, bool Res, int Count, typename Act, typename Pre>
void forward_train_ncs(const ForwardParams& p, Act act, Pre pre, acc_t<T>* var) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  A* mean_out = static_cast<A*>(p.mean);
  A* invstd_out = static_cast<A*>(p.invstd);
  // Long planes: channel by channel, normalized right after the channel's
  // statistics, while its values are in cache. Short planes: groups of G
  // channels the same way, normalized in memory order over the group.
  // Channels split in P parts: each part's moments, a barrier, the merge,
  // a barrier, then each part normalized by the thread that read it.
  const NcsWork wk(s, int64_t(sizeof(T)) * (Res ? 2 : 1), p.num_threads);
  const int64_t G = wk.G, P = wk.P;
  std::vector<Moments<double>> part_mo(P > 1 ? size_t(s.C * P) : 0);
  std::vector<int64_t> part_active(size_t(s.C * P), 0);  // [c * P + part]
  std::vector<ChannelCoef<A>> coef(s.C);
  const int64_t stride = s.C * s.S;
#pragma omp parallel num_threads(wk.nt) firstprivate(act, pre)
  {
    const size_t nb = buffered<T, Pre> ? kBlock : 0;
    std::vector<A> buf(nb), zbuf(in_registers<T> ? 0 : kBlock), obuf(y_buffered<T> ? kBlock : 0);
    PendingNarrow<T> pending{obuf.data(), kBlock};
    // Short planes: the group as columns (column_moments), and its
    // constants repeated per column for the normalization.
    const ColumnBlocks cb(s.S);
    const bool cols = wk.grouped && as_columns(s, kColumnsForward);
    const int64_t cw = cols ? std::min(cb.cols(), G * s.S) : 0;
    std::vector<A> cbuf(cols && buffered<T, Pre> ? std::min(cb.rows, s.N) * cw : 0),
        scratch(3 * cw);
    ColumnConstants<A> kcol(cw);
    std::vector<Moments<double>> gmo(cols ? size_t(G) : 0);
    // Moments of planes lo..hi-1 of channels c0..c1-1 (short planes), in gmo.
    auto group_moments = [&](int64_t c0, int64_t c1, int64_t lo, int64_t hi) {
      std::fill(gmo.begin(), gmo.end(), Moments<double>{});
      for (int64_t ca = c0; ca < c1; ca += cb.per_chunk) {
        const int64_t nc = std::min(cb.per_chunk, c1 - ca), W = nc * s.S;
        const T* xa = x + ca * s.S;
        for (int64_t n0 = lo; n0 < hi; n0 += cb.rows) {
          const int64_t n1 = std::min(hi, n0 + cb.rows);
          for (int64_t pl = n1; pl < std::min(hi, n1 + cb.rows); ++pl)
            prefetch_values(xa + pl * stride, W);
          if constexpr (buffered<T, Pre>) {
            for (int64_t pl = n0; pl < n1; ++pl)
              load_input(xa + pl * stride, W, cbuf.data() + (pl - n0) * W, pre);
            column_moments<A>(static_cast<const A*>(cbuf.data()), W, n1 - n0, nc, s.S,
                              scratch.data(), &gmo[size_t(ca - c0)]);
          } else {
            column_moments<A>(xa + n0 * stride, stride, n1 - n0, nc, s.S, scratch.data(),
                              &gmo[size_t(ca - c0)]);
          }
        }
      }
    };
    // Moments of planes lo..hi-1 of channel c.
    auto moments_of = [&](int64_t c, int64_t lo, int64_t hi) {
      const int64_t base = c * s.S;
      Moments<double> mo{};
      for_each_block(s, lo, hi, [&](int64_t n0, int64_t n1, int64_t off, int64_t len) {
        prefetch_next_block(s, x + base, n0, n1, hi, len);
        // Buffered planes are loaded side by side into one buffer first.
        double bm, bm2;
        if constexpr (buffered<T, Pre>) {
          for (int64_t pl = n0; pl < n1; ++pl)
            load_input(x + pl * stride + base + off, len, buf.data() + (pl - n0) * len, pre);
          block_moments(buf.data(), len, n1 - n0, len, bm, bm2);
        } else {
          block_moments(x + n0 * stride + base + off, stride, n1 - n0, len, bm, bm2);
        }
        mo.merge(double((n1 - n0) * len), bm, bm2);
      });
      return mo;
    };
    auto finish = [&](int64_t c, const Moments<double>& mo) {
      const A mean = A(mo.mean);
      const A invstd = invstd_of<A>(mo.m2, mo.n, p.eps);
      mean_out[c] = mean;
      invstd_out[c] = invstd;
      var[c] = A(mo.m2 / mo.n);
      coef[c] = channel_coef(mean, invstd, w ? w[c] : A(1), b ? b[c] : A(0), false);
    };
    // y of the len values at offset o, which belong to channel c, part part.
    auto normalize_run = [&](int64_t c, int64_t part, int64_t o, int64_t len) {
      auto out = out_slot<y_buffered<T>>(pending, y + o, len);
      int64_t& active = part_active[size_t(c * P + part)];
      active += run_normalize<Res, Count>(load_input(x + o, len, buf.data(), pre),
                                          residual_acc<Res>(z, o, len, zbuf.data()), out, len,
                                          coef[c].mean, coef[c].scale, coef[c].shift, act);
      if constexpr (Count == kCountInput) active += count_active(x + o, len, pre);
    };
    // Planes lo..hi-1 of channels c0..c1-1.
    auto normalize_part = [&](int64_t c0, int64_t c1, int64_t part, int64_t lo, int64_t hi) {
      if (cols && Count == kCountNone) {
        for (int64_t ca = c0; ca < c1; ca += cb.per_chunk) {
          const int64_t nc = std::min(cb.per_chunk, c1 - ca), W = nc * s.S;
          kcol.set(&coef[size_t(ca)], nc, s.S);
          for (int64_t n = lo; n < hi; ++n) {
            const int64_t o = n * stride + ca * s.S;
            run_normalize<Res, Count>(load_input(x + o, W, buf.data(), pre),
                                      residual_acc<Res>(z, o, W, zbuf.data()),
                                      out_slot<y_buffered<T>>(pending, y + o, W), W, kcol.mean(),
                                      kcol.scale(), kcol.shift(), act);
          }
        }
      } else if (wk.grouped) {
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t c = c0; c < c1; ++c) normalize_run(c, part, n * stride + c * s.S, s.S);
      } else {
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t off = 0; off < s.S; off += kBlock)
            normalize_run(c0, part, n * stride + c0 * s.S + off, std::min(kBlock, s.S - off));
      }
    };
    if (P == 1) {
#pragma omp for schedule(static)
      for (int64_t gi = 0; gi < wk.groups; ++gi) {
        const int64_t c0 = gi * G, c1 = std::min(c0 + G, s.C);
        if (cols) {
          group_moments(c0, c1, 0, s.N);
          for (int64_t c = c0; c < c1; ++c) finish(c, gmo[size_t(c - c0)]);
        } else {
          for (int64_t c = c0; c < c1; ++c) finish(c, moments_of(c, 0, s.N));
        }
        normalize_part(c0, c1, 0, 0, s.N);
      }
    } else {
      // The same static schedule over the items twice: each thread normalizes
      // the parts it read.
#pragma omp for schedule(static)
      for (int64_t it = 0; it < wk.items(); ++it) {
        const int64_t gi = it / P, part = it % P, c0 = gi * G, c1 = std::min(c0 + G, s.C);
        const int64_t lo = wk.lo(s, part), hi = wk.lo(s, part + 1);
        if (cols) group_moments(c0, c1, lo, hi);
        for (int64_t c = c0; c < c1; ++c)
          part_mo[size_t(c * P + part)] = cols ? gmo[size_t(c - c0)] : moments_of(c, lo, hi);
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < s.C; ++c) {
        Moments<double> mo{};
        for (int64_t part = 0; part < P; ++part) {
          const Moments<double>& m = part_mo[size_t(c * P + part)];
          mo.merge(m.n, m.mean, m.m2);
        }
        finish(c, mo);
      }
#pragma omp for schedule(static)
      for (int64_t it = 0; it < wk.items(); ++it) {
        const int64_t gi = it / P, part = it % P, c0 = gi * G, c1 = std::min(c0 + G, s.C);
        normalize_part(c0, c1, part, wk.lo(s, part), wk.lo(s, part + 1));
      }
    }
    if constexpr (y_buffered<T>) pending.flush();
  }
  if constexpr (Count != kCountNone)
    for (int64_t c = 0; c < s.C; ++c) {
      int64_t total = 0;
      for (int64_t part = 0; part < P; ++part) total += part_active[size_t(c * P + part)];
      p.active_count[c] = total;
    }
}

// Rows of the channels-last layout are processed in blocks of R rows (about
// kBlock values). float16 takes a quarter of that: its rows are widened into
// float buffers (x, dy, the output) that must fit in L1 together (backward at
// 32x64x56x56 channels-last: 1.7x faster than with full-size blocks).
template <typename T>
inline int64_t rows_per_block(int64_t C) {
  return std::max<int64_t>(8, (in_registers<T> ? kBlock : kBlock / 4) / std::max<int64_t>(C, 1));
}
// The reductions (for_each_chunk below) only need a chunk's rows in L1, not
// the whole block: longer blocks there make the per-block merge of C
// channels' sums rarer (it cost as much as the sums at 16 rows of C = 256).
// float16 keeps rows_per_block: its whole block is widened into L1.
template <typename T>
inline int64_t rows_per_reduce_block(int64_t C) {
  if (!in_registers<T>) return rows_per_block<T>(C);
  return std::clamp<int64_t>(4 * kBlock / std::max<int64_t>(C, 1), 8, 64);
}

// The channels-last row loops run over chunks of K columns, f(c0, K), whose
// accumulators and per-channel constants stay in registers for all the rows
// of a block. Indexing arrays of C accumulators in the row loop instead costs
// a load and a store per accumulator and vector: the statistics of a block in
// L1 ran 2.6x (C = 256) to 5.6x (C = 64) slower that way. K = 64 for the bulk
// (GCC 12 keeps 16-wide chunks out of registers, again), 16 and 1 for the
// rest (WideRows makes the rows a multiple of 16 wide). Each column's sums
// run over the rows in the same order whatever K, so the results do not
// depend on the chunking.
//
// A chunk walks the block column by column, an order the hardware prefetcher
// does not follow, so for 16-bit types the next block is asked for explicitly
// (prefetch_rows). Not for float and double: their blocks are twice as many
// bytes, and asking for the next one cost more than it saved (float32
// 64x256x196: forward-train 1.26x, backward 1.25x faster without; bfloat16
// 1.15x slower without, best of 4 interleaved runs of kernel_bench).
template <typename T>
FUSEDBN_INLINE void prefetch_rows(const T* p, int64_t n) {
  if constexpr (sizeof(T) == 2) prefetch_values(p, n);
}
template <typename F>
FUSEDBN_INLINE void for_each_chunk(int64_t C, F f) {
  int64_t c0 = 0;
  for (; c0 + 64 <= C; c0 += 64) f(c0, Width<64>{});
  for (; c0 + 16 <= C; c0 += 16) f(c0, Width<16>{});
  for (; c0 < C; ++c0) f(c0, Width<1>{});
}

// Channels-last rows whose C is not a multiple of 16 would leave the row
// loops chunks of one channel (for_each_chunk): a stride of C values in
// scalar code, 8-27% of a copy's bandwidth at C = 3 and 18-74% at C = 24.
// Such rows are taken k at a time as wide rows of W = k*C values, whose
// column v belongs to channel v % C: the per-channel constants are repeated
// k times and each channel's k columns of sums are added at the end. W is a
// multiple of 64 (whole 64-column chunks) up to 256 columns, else of 16:
// wider rows cost more in per-column constants and block merges than they
// gain (C = 100 as 1600 columns: bfloat16 1.4x slower than as 400). The first
// C columns are the channels themselves, so the (fewer than k) rows left at
// the end of the tensor run through the same loops with width C (rows_of).
// Block sizes are counted in wide rows and blocks start at multiples of k
// rows, so only the tensor's last block has such rows.
struct WideRows {
  int64_t C, k, W;
  static int64_t multiple(int64_t c) {
    if (c <= 0) return 1;
    const int64_t k64 = 64 / std::gcd<int64_t>(c, 64);
    return k64 * c <= 256 ? k64 : 16 / std::gcd<int64_t>(c, 16);
  }
  explicit WideRows(int64_t c) : C(c), k(multiple(c)), W(k * c) {}
  // f(e0, rows, width) over a block of rr rows (rr a multiple of k except in
  // the last block): its wide rows, then the rows left, from value e0.
  template <typename F>
  FUSEDBN_INLINE void rows_of(int64_t rr, F f) const {
    const int64_t full = rr - rr % k;
    f(int64_t(0), full / k, W);
    if (full < rr) f(full * C, rr - full, C);
  }
  // v[0..C) repeated k times.
  template <typename V>
  std::vector<V> repeat(const std::vector<V>& v) const {
    std::vector<V> w(static_cast<size_t>(W));
    for (int64_t e = 0; e < W; ++e) w[size_t(e)] = v[size_t(e % C)];
    return w;
  }
  // Adds channel c's k columns of sums, [u * W + j * C + c] for u < blocks, j < k.
  template <typename V>
  V fold(const V* sums, int64_t blocks, int64_t c) const {
    V t = V(0);
    for (int64_t u = 0; u < blocks; ++u)
      for (int64_t j = 0; j < k; ++j) t += sums[size_t(u * W + j * C + c)];
    return t;
  }
};

template <typename T, typename Pre>
void moments_nsc(const ForwardParams& p, Pre pre, acc_t<T>* var) {
  using A = acc_t<T>;
  const int64_t C = p.shape.C, M = p.shape.count();
  const T* x = static_cast<const T*>(p.x);
  const WideRows wr(C);
  const int64_t W = wr.W, Mw = M / wr.k, rest = M - Mw * wr.k;
  const int nt = threads_for(M * C, p.num_threads, Mw);
  const int64_t R = rows_per_reduce_block<T>(W);
  std::vector<double> tmean(size_t(nt) * W, 0.0), tm2(size_t(nt) * W, 0.0), tn(nt, 0.0);
  // Mean and M2 of each of the `width` columns of `rows` rows at xb (in L1),
  // by the corrected two-pass, as in block_moments.
  auto block = [](const auto* xb, int64_t rows, int64_t width, double* bmean, double* bm2) {
    const A inv = A(1) / A(rows);
    const double nb = double(rows), inb = 1.0 / nb;
    for_each_chunk(width, [&](int64_t c0, auto chunk) {
      constexpr int K = decltype(chunk)::value;
      A m[K] = {}, s1[K] = {}, s2[K] = {};
      for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < K; ++j) m[j] += A(load(xb[i * width + c0 + j]));
      for (int j = 0; j < K; ++j) m[j] *= inv;
      for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < K; ++j) {
          const A d = A(load(xb[i * width + c0 + j])) - m[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      // One test per chunk for an inf/NaN in any of its sums (v - v is
      // 0 for every finite v), then exact_moments for those columns.
      A probe = A(0);
      for (int j = 0; j < K; ++j) {
        const double d1 = double(s1[j]);
        bmean[c0 + j] = double(m[j]) + d1 * inb;
        bm2[c0 + j] = double(s2[j]) - d1 * d1 * inb;
        probe += (s1[j] - s1[j]) + (s2[j] - s2[j]);
      }
      if (probe != A(0))
        for (int j = 0; j < K; ++j)
          if (!std::isfinite(bmean[c0 + j]) || !std::isfinite(bm2[c0 + j]))
            exact_moments<A>(
                [&](auto f) {
                  for (int64_t i = 0; i < rows; ++i) f(A(load(xb[i * width + c0 + j])));
                },
                nb, bmean[c0 + j], bm2[c0 + j]);
    });
  };
#pragma omp parallel num_threads(nt) firstprivate(pre)
  {
    const int t = omp_get_thread_num();
    const int64_t r0 = Mw * t / nt, r1 = Mw * (t + 1) / nt;  // wide rows
    double* pm = &tmean[size_t(t) * W];
    double* pm2 = &tm2[size_t(t) * W];
    double n = 0;
    std::vector<double> bmean(W), bm2(W);
    std::vector<A> buf(buffered<T, Pre> ? R * W : 0);
    for (int64_t r = r0; r < r1; r += R) {
      const int64_t rr = std::min(R, r1 - r);
      prefetch_rows(x + (r + rr) * W, std::min(R, r1 - r - rr) * W);
      block(load_input(x + r * W, rr * W, buf.data(), pre), rr, W, bmean.data(), bm2.data());
      // Chan's merge of the block into the thread's moments; divisions
      // hoisted out of the column loop (at C = 256 they cost a third of it).
      const double nb = double(rr), tot = n + nb, fa = nb / tot, fb = n * nb / tot;
      for (int64_t c = 0; c < W; ++c) {
        const double d = bmean[c] - pm[c];
        if (__builtin_expect(std::isfinite(d), 1)) {
          pm[c] += d * fa;
          pm2[c] += bm2[c] + d * (d * fb);  // as in chan_update
        } else {
          chan_update(pm[c], pm2[c], n, nb, tot, bmean[c], bm2[c]);
        }
      }
      n = tot;
    }
    tn[t] = n;
  }
  // The rows after the last wide row.
  std::vector<double> rmean(C), rm2(C);
  if (rest > 0) {
    std::vector<A> buf(buffered<T, Pre> ? rest * C : 0);
    block(load_input(x + Mw * W, rest * C, buf.data(), pre), rest, C, rmean.data(), rm2.data());
  }
  A* mean_out = static_cast<A*>(p.mean);
  A* invstd_out = static_cast<A*>(p.invstd);
  for (int64_t c = 0; c < C; ++c) {
    Moments<double> mo{};
    for (int t = 0; t < nt; ++t)
      for (int64_t j = 0; j < wr.k; ++j) {
        const size_t e = size_t(t * W + j * C + c);
        mo.merge(tn[t], tmean[e], tm2[e]);
      }
    mo.merge(double(rest), rmean[c], rm2[c]);
    const A v = A(mo.m2 / mo.n);
    mean_out[c] = A(mo.mean);
    invstd_out[c] = invstd_of<A>(mo.m2, mo.n, p.eps);
    var[c] = v;
  }
}

// Normalize + activate in memory order, with per-channel statistics already
// in p.mean/p.invstd.
template <typename T, bool Res, int Count, typename Act, typename Pre>
void normalize(const ForwardParams& p, Act act, Pre pre) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const int64_t C = s.C;
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  const A* invstd = static_cast<const A*>(p.invstd);
  std::vector<ChannelCoef<A>> coef(C);
  std::vector<A> mean(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    coef[c] = channel_coef(static_cast<const A*>(p.mean)[c], invstd[c], w ? w[c] : A(1),
                           b ? b[c] : A(0), false);
    mean[c] = coef[c].mean;
    scale[c] = coef[c].scale;
    shift[c] = coef[c].shift;
  }
  const bool ncs = s.layout == Layout::NCS;
  // Short planes with nothing counted: row n's values of a chunk of channels
  // as one run, the constants repeated per column (short planes as columns;
  // plane by plane, each S-value plane paid a vector tail). Work items: the
  // rows of a chunk, in `parts` ranges; a thread repeats a chunk's constants
  // once for its consecutive items of that chunk.
  const ColumnBlocks cb(s.S);
  const bool cols =
      ncs && Count == kCountNone && s.N * C * s.S > 0 && as_columns(s, kColumnsForward);
  const int64_t chunks = cols ? (C + cb.per_chunk - 1) / cb.per_chunk : 1;
  const int64_t parts =
      cols ? std::min(s.N, (4 * int64_t(p.num_threads) + chunks - 1) / chunks) : 1;
  // Channels-last: the constants repeated over wide rows (WideRows).
  const WideRows wr(C);
  if (!ncs && wr.k > 1) {
    mean = wr.repeat(mean);
    scale = wr.repeat(scale);
    shift = wr.repeat(shift);
  }
  const A* m = mean.data();
  const int64_t M = s.count(), R = wr.k * rows_per_block<T>(wr.W);
  // Work items: chunks' rows (columns), planes (NCS) or blocks of R rows (NSC).
  const int64_t items = cols ? chunks * parts : ncs ? s.N * C : (M + R - 1) / R;
  const int nt = threads_for(s.N * C * s.S, p.num_threads, items);
  // Per-thread active counts, summed at the end.
  constexpr bool Track = Count != kCountNone;
  std::vector<int64_t> counts(Track ? size_t(nt) * C : 0, 0);
  const A* mp = m;
  const A* sc = scale.data();
  const A* sh = shift.data();
#pragma omp parallel num_threads(nt) firstprivate(act, pre)
  {
    int64_t* cnt = Track ? &counts[size_t(omp_get_thread_num()) * C] : nullptr;
    // Channels-last: a block's counts (at most R <= kBlock per channel, exact)
    // in the accumulation type, so the counting vectorizes with the rest of
    // the float loop instead of mixing in integer lanes.
    std::vector<A> bcnt(Track && !ncs ? wr.W : 0);
    const int64_t len_max = ncs ? kBlock : R * C;
    std::vector<A> buf(buffered<T, Pre> ? len_max : 0), zbuf(in_registers<T> ? 0 : len_max),
        obuf(y_buffered<T> ? len_max : 0);
    PendingNarrow<T> pending{obuf.data(), len_max};
    ColumnConstants<A> kcol(cols ? std::min(cb.cols(), C * s.S) : 0);
    int64_t kcol_chunk = -1;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      if (cols) {
        const int64_t chunk = it / parts, part = it % parts, ca = chunk * cb.per_chunk;
        const int64_t nc = std::min(cb.per_chunk, C - ca), W = nc * s.S;
        if (chunk != kcol_chunk) kcol.set(&coef[size_t(ca)], nc, s.S);
        kcol_chunk = chunk;
        for (int64_t n = s.N * part / parts; n < s.N * (part + 1) / parts; ++n) {
          const int64_t o = (n * C + ca) * s.S;
          run_normalize<Res, Count>(load_input(x + o, W, buf.data(), pre),
                                    residual_acc<Res>(z, o, W, zbuf.data()),
                                    out_slot<y_buffered<T>>(pending, y + o, W), W, kcol.mean(),
                                    kcol.scale(), kcol.shift(), act);
        }
      } else if (ncs) {
        const int64_t c = it % C;
        for (int64_t off = 0; off < s.S; off += kPiece) {
          const int64_t len = std::min(kPiece, s.S - off), o = it * s.S + off;
          prefetch_ahead<reads_ahead<T, Act>>(x + o, len);
          if constexpr (Res) prefetch_ahead<reads_ahead<T, Act>>(z + o, len);
          const int64_t a = run_normalize<Res, Count>(
              load_input(x + o, len, buf.data(), pre), residual_acc<Res>(z, o, len, zbuf.data()),
              out_slot<y_buffered<T>>(pending, y + o, len), len, mp[c], sc[c], sh[c], act);
          if constexpr (Track) cnt[c] += a;
          if constexpr (Count == kCountInput) cnt[c] += count_active(x + o, len, pre);
        }
      } else {
        const int64_t r = it * R, rr = std::min(R, M - r);
        const auto* xb = load_input(x + r * C, rr * C, buf.data(), pre);
        const auto* zb = residual_acc<Res>(z, r * C, rr * C, zbuf.data());
        auto* yb = out_view<y_buffered<T>>(y + r * C, obuf.data());
        A* bc = bcnt.data();
        if constexpr (Track) std::fill(bcnt.begin(), bcnt.end(), A(0));
        // `rows` rows of `width` columns from value e0 of the block.
        auto normalize_rows = [&](int64_t e0, int64_t rows, int64_t width) {
          // Local copies of the functors: read through the lambdas'
          // references, a parameter (leaky_relu's slope, hardtanh's bounds)
          // was reloaded from memory every element and GCC 12 left such
          // loops scalar, with branches (kernels alone, float32 64x256x196
          // channels-last backward: leaky_relu 4.5 ms against relu's 2.3).
          const Act ac = act;
          const Pre pr = pre;
          for (int64_t i = 0; i < rows; ++i) {
            prefetch_ahead<reads_ahead<T, Act>>(x + r * C + e0 + i * width, width);
            if constexpr (Res) prefetch_ahead<reads_ahead<T, Act>>(z + r * C + e0 + i * width, width);
#pragma GCC ivdep
            for (int64_t c = 0; c < width; ++c) {
              const int64_t e = e0 + i * width + c;
              const A v = pre_activation<Res>(A(load(xb[e])) - mp[c], A(z_at<Res>(zb, e)), sc[c],
                                              sh[c]);
              if constexpr (Count == kCountPre) bc[c] += ac.active(v) ? A(1) : A(0);
              if constexpr (Count == kCountInput)
                bc[c] += pr.active(A(load(x[r * C + e]))) ? A(1) : A(0);
              put(yb, e, ac.fwd(v));
            }
          }
        };
        wr.rows_of(rr, normalize_rows);
        if constexpr (Track)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t j = 0; j < wr.k; ++j) cnt[c] += int64_t(bc[j * C + c]);
        narrow_to<y_buffered<T>>(yb, y + r * C, rr * C);
      }
    }
    if constexpr (y_buffered<T>) pending.flush();
  }
  if constexpr (Track)
    for (int64_t c = 0; c < C; ++c) {
      int64_t total = 0;
      for (int t = 0; t < nt; ++t) total += counts[size_t(t) * C + c];
      p.active_count[c] = total;
    }
}

template <typename P, typename A>
void update_running_stats(P* rm, P* rv, const A* mean, const A* var, int64_t C, double count,
                          double momentum) {
  const RunningUpdate<A> u(momentum, count);
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = store<P>(acc_t<P>(u.mean(A(load(rm[c])), mean[c])));
    rv[c] = store<P>(acc_t<P>(u.var(A(load(rv[c])), var[c])));
  }
}

template <typename T, bool Res, int Count, typename Act, typename Pre>
void forward_typed(const ForwardParams& p, bool training, Act act, Pre pre) {
  using A = acc_t<T>;
  if (!training) return normalize<T, Res, Count>(p, act, pre);
  std::vector<A> var(p.shape.C);
  if (p.shape.layout == Layout::NCS) {
    forward_train_ncs<T, Res, Count>(p, act, pre, var.data());
  } else {
    moments_nsc<T>(p, pre, var.data());
    normalize<T, Res, Count>(p, act, pre);
  }
  if (p.running_mean) {
    const A* mean = static_cast<const A*>(p.mean);
    const int64_t C = p.shape.C;
    const double cnt = double(p.shape.count());
    const double mom = momentum_of(p.momentum, p.num_batches_tracked);
    switch (p.running_dtype) {
      case DType::Float32:
        return update_running_stats(static_cast<float*>(p.running_mean), static_cast<float*>(p.running_var), mean, var.data(), C, cnt, mom);
      case DType::Float64:
        return update_running_stats(static_cast<double*>(p.running_mean), static_cast<double*>(p.running_var), mean, var.data(), C, cnt, mom);
      case DType::BFloat16:
        return update_running_stats(static_cast<bf16_t*>(p.running_mean), static_cast<bf16_t*>(p.running_var), mean, var.data(), C, cnt, mom);
      case DType::Float16:
        return update_running_stats(static_cast<fp16_t*>(p.running_mean), static_cast<fp16_t*>(p.running_var), mean, var.data(), C, cnt, mom);
    }
  }
}

//
// The formulas are bn_math.h's (grad_pre, dx_coefficients, dx_value).

template <typename A>
FUSEDBN_INLINE ChannelCoef<A> backward_coef(const BackwardParams& p, int64_t c) {
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  return channel_coef(static_cast<const A*>(p.mean)[c], static_cast<const A*>(p.invstd)[c],
                      w ? w[c] : A(1), b ? b[c] : A(0), p.from_output);
}

// Adds up per-thread sums tsg/tsgx ([nt][W] over wide rows, in thread
// order) into grad_bias, grad_weight and each channel's dx coefficients,
// k_xh and k_const ([W], repeated as the wide rows want them).
template <typename A>
void finish_sums(const BackwardParams& p, const double* tsg, const double* tsgx, int nt,
                 const WideRows& wr, const ChannelCoef<A>* coef, A* k_xh, A* k_const) {
  const int64_t C = p.shape.C;
  A* gw = static_cast<A*>(p.grad_weight);
  A* gb = static_cast<A*>(p.grad_bias);
  for (int64_t c = 0; c < C; ++c) {
    const double s1 = wr.fold(tsg, nt, c), s2 = coef[c].sum_gxh(s1, wr.fold(tsgx, nt, c));
    gb[c] = A(s1);
    gw[c] = A(s2);
    dx_coefficients(p.training, coef[c], s1, s2, double(p.shape.count()), k_xh[c], k_const[c]);
  }
  for (int64_t e = C; e < wr.W; ++e) {
    k_xh[e] = k_xh[e % C];
    k_const[e] = k_const[e % C];
  }
}

// dx (and dz) of rr channels-last rows of `width` columns from value e0 of
// the block, as run_dx.
template <bool Train, int Out, bool Res, bool FromOut, typename X, typename Z, typename D,
          typename O, typename OZ, typename A, typename Act>
FUSEDBN_INLINE void rows_dx(const X* xb, const Z* zb, const D* dyb, O* out, OZ* dzo, int64_t e0,
                            int64_t rr, int64_t width, const A* mp, const A* sc, const A* sh,
                            const A* ht, const A* kx, const A* kc, Act act) {
  // ivdep: no value is read after being written. Without it, with a
  // residual (three inputs, the six constants' arrays, dx and dz), the
  // backward ran 1.5-2x slower (kernels alone, AVX2, the columns' dx and
  // channels-last's alike; GCC's run-time overlap checks, presumably).
  for (int64_t i = 0; i < rr; ++i)
#pragma GCC ivdep
    for (int64_t c = 0; c < width; ++c) {
      A xh;
      const int64_t e = e0 + i * width + c;
      const A g = grad_pre<Res, FromOut>(A(load(xb[e])), A(z_at<Res>(zb, e)), A(load(dyb[e])),
                                         mp[c], sc[c], sh[c], ht[c], act, xh);
      if constexpr ((Out & kDx) != 0) put(out, e, dx_value<Train>(g, xh, sc[c], kx[c], kc[c]));
      if constexpr (Res && (Out & kDz) != 0) put(dzo, e, g);
    }
}

template <typename T, bool Res, bool FromOut, typename Act, typename Pre>
void backward_ncs(const BackwardParams& p, Act act, Pre pre) {
  using A = acc_t<T>;
  const Shape s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.residual);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  T* dz = static_cast<T*>(p.grad_residual);
  A* gw = static_cast<A*>(p.grad_weight);
  A* gb = static_cast<A*>(p.grad_bias);
  const double count = double(s.count());
  // Long planes: channel by channel, dx right after the channel's sums, while
  // its values are in cache. Short planes: groups of G channels the same way,
  // dx in memory order over the group (see short_planes). Channels split in
  // P parts (NcsWork): each part's sums, a barrier, their total, a barrier,
  // then each part's dx by the thread that read it.
  const NcsWork wk(s, int64_t(sizeof(T)) * (Res ? 3 : 2), p.num_threads);
  const int64_t G = wk.G, P = wk.P;
  std::vector<A> k_xh(s.C), k_const(s.C);
  std::vector<ChannelCoef<A>> coef(s.C);
  for (int64_t c = 0; c < s.C; ++c) coef[c] = backward_coef<A>(p, c);
  std::vector<double> part_sg(size_t(s.C * P)), part_sgx(size_t(s.C * P));  // [c * P + part]
  const int64_t stride = s.C * s.S;
#pragma omp parallel num_threads(wk.nt) firstprivate(act, pre)
  {
    constexpr bool OutBuf = out_buffered<T, Pre>, DzBuf = y_buffered<T>;
    const size_t nb = in_registers<T> ? 0 : kBlock;
    std::vector<A> xbuf(buffered<T, Pre> ? kBlock : 0), zbuf(nb), dybuf(nb),
        obuf(OutBuf ? kBlock : 0), dzbuf(DzBuf ? kBlock : 0);
    PendingNarrow<T> pdx{obuf.data(), kBlock}, pdz{dzbuf.data(), kBlock};
    // Short planes as columns (column_moments): the sums of g and g * xh
    // column by column over blocks of rows, and dx with the channel
    // constants repeated per column. cr: mean, scale, shift, hat, k_xh,
    // k_const, then the two column sums.
    const ColumnBlocks cb(s.S);
    const bool cols = wk.grouped && as_columns(s, kColumnsBackward);
    const int64_t cw = cols ? std::min(cb.cols(), G * s.S) : 0;
    std::vector<A> cr(8 * cw);
    A *km = cr.data(), *ks = km + cw, *kh = ks + cw, *kt = kh + cw, *kx = kt + cw, *kc = kx + cw,
      *sg = kc + cw, *sgx = sg + cw;
    // Channels ca..ca+nc-1's constants of the sums (and of dx) repeated.
    auto repeat_coef = [&](int64_t ca, int64_t nc, bool for_dx) {
      const ChannelCoef<A>* q = &coef[size_t(ca)];
      repeat_columns(km, nc, s.S, [&](int64_t k) { return q[k].mean; });
      repeat_columns(ks, nc, s.S, [&](int64_t k) { return q[k].scale; });
      repeat_columns(kh, nc, s.S, [&](int64_t k) { return q[k].shift; });
      repeat_columns(kt, nc, s.S, [&](int64_t k) { return q[k].hat; });
      if (!for_dx) return;
      repeat_columns(kx, nc, s.S, [&](int64_t k) { return k_xh[size_t(ca + k)]; });
      repeat_columns(kc, nc, s.S, [&](int64_t k) { return k_const[size_t(ca + k)]; });
    };
    // Adds the sums of planes lo..hi-1 of channels c0..c1-1 to g1[c - c0],
    // g2[c - c0].
    auto column_sums = [&](int64_t c0, int64_t c1, int64_t lo, int64_t hi, double* g1,
                           double* g2) {
      for (int64_t ca = c0; ca < c1; ca += cb.per_chunk) {
        const int64_t nc = std::min(cb.per_chunk, c1 - ca), W = nc * s.S;
        repeat_coef(ca, nc, false);
        for (int64_t n0 = lo; n0 < hi; n0 += cb.rows) {
          const int64_t n1 = std::min(hi, n0 + cb.rows);
          std::fill(sg, sg + 2 * cw, A(0));
          for_rows<rows_at_once<Act>>(n1 - n0, [&](int64_t i, auto nr) {
            constexpr int R = decltype(nr)::value;
            const Act ac = act;  // a local copy: see normalize_rows
            decltype(load_input(x, 0, xbuf.data(), pre)) xa[R];
            decltype(residual_acc<Res>(z, 0, 0, zbuf.data())) za[R];
            decltype(as_acc(dy, 0, dybuf.data())) dya[R];
            for (int u = 0; u < R; ++u) {  // W <= kCols: R rows fit the buffers
              const int64_t o = (n0 + i + u) * stride + ca * s.S;
              xa[u] = load_input(x + o, W, xbuf.data() + u * W, pre);
              za[u] = residual_acc<Res>(z, o, W, zbuf.data() + u * W);
              dya[u] = as_acc(dy + o, W, dybuf.data() + u * W);
            }
#pragma GCC ivdep
            for (int64_t j = 0; j < W; ++j) {
              A a = sg[j], b = sgx[j];
              for (int u = 0; u < R; ++u) {
                A xh;
                const A g = grad_pre<Res, FromOut>(A(load(xa[u][j])), A(z_at<Res>(za[u], j)),
                                                   A(load(dya[u][j])), km[j], ks[j], kh[j], kt[j],
                                                   ac, xh);
                a += g;
                b += g * xh;
              }
              sg[j] = a;
              sgx[j] = b;
            }
          });
          for (int64_t k = 0; k < nc; ++k) {
            const int64_t c = ca + k;
            const double b1 = wide_sum(sg + k * s.S, s.S), b2 = wide_sum(sgx + k * s.S, s.S);
            if (!(std::is_same<A, float>::value && !(std::isfinite(b1) && std::isfinite(b2)))) {
              g1[c - c0] += b1;
              g2[c - c0] += b2;
              continue;
            }
            for (int64_t n = n0; n < n1; ++n) {
              const int64_t o = n * stride + c * s.S;
              reduce_exact<Res, FromOut>(load_input(x + o, s.S, xbuf.data(), pre),
                                         residual_acc<Res>(z, o, s.S, zbuf.data()),
                                         as_acc(dy + o, s.S, dybuf.data()), s.S, 1, coef[c], act,
                                         g1[c - c0], g2[c - c0]);
            }
          }
        }
      }
    };
    // dx (and dz) of the len values at offset o, with the constants k.
    auto dx_run = [&](int64_t o, int64_t len, auto k) {
      const auto* xa = load_input(x + o, len, xbuf.data(), pre);
      const auto* za = residual_acc<Res>(z, o, len, zbuf.data());
      const auto* dya = as_acc(dy + o, len, dybuf.data());
      auto* out = dx ? out_slot<OutBuf>(pdx, dx + o, len) : nullptr;
      auto* dzo = dz ? out_slot<DzBuf>(pdz, dz + o, len) : nullptr;
      with_dx_switches<Res>(p.training, dx, dz, [&](auto train, auto wanted) {
        run_dx<decltype(train)::value, decltype(wanted)::value, Res, FromOut>(xa, za, dya, out,
                                                                              dzo, len, k, act);
      });
      if (dx) chain_input_grad(out, x + o, len, pre);
    };
    // Channel c's constants.
    auto channel_dx = [&](int64_t c) {
      const ChannelCoef<A>& q = coef[size_t(c)];
      return DxConstants<A>{q.mean, q.scale, q.shift, q.hat, k_xh[size_t(c)], k_const[size_t(c)]};
    };
    // Adds the sums of len values at offset o of each of the planes n0..n1-1
    // of channel c to g1, g2: float lanes over the block, added in double.
    auto block_sums = [&](int64_t c, int64_t n0, int64_t n1, int64_t off, int64_t len, double& g1,
                          double& g2) {
      Lanes<A> bg, bgx;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t o = n * stride + c * s.S + off;
        run_reduce<Res, FromOut>(load_input(x + o, len, xbuf.data(), pre),
                                 residual_acc<Res>(z, o, len, zbuf.data()),
                                 as_acc(dy + o, len, dybuf.data()), len, coef[c], act, bg, bgx);
      }
      const A bs = bg.sum(), bsx = bgx.sum();
      if (!sums_overflowed(bs, bsx)) {
        g1 += double(bs);
        g2 += double(bsx);
        return;
      }
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t o = n * stride + c * s.S + off;
        reduce_exact<Res, FromOut>(load_input(x + o, len, xbuf.data(), pre),
                                   residual_acc<Res>(z, o, len, zbuf.data()),
                                   as_acc(dy + o, len, dybuf.data()), len, 1, coef[c], act, g1, g2);
      }
    };
    // The sums of planes lo..hi-1 of channels c0..c1-1, into part_sg/part_sgx.
    auto sums_part = [&](int64_t c0, int64_t c1, int64_t part, int64_t lo, int64_t hi) {
      auto at = [&](int64_t c) { return size_t(c * P + part); };
      if (cols) {
        std::vector<double> t1(size_t(c1 - c0), 0.0), t2(size_t(c1 - c0), 0.0);
        column_sums(c0, c1, lo, hi, t1.data(), t2.data());
        for (int64_t c = c0; c < c1; ++c) {
          part_sg[at(c)] = t1[size_t(c - c0)];
          part_sgx[at(c)] = t2[size_t(c - c0)];
        }
      } else if (wk.grouped && s.S >= 64 && kPlaneOrderSums) {
        // Planes of at least 64 values: summed one by one in memory order (a
        // channel's planes lie C*S values apart, and walking them per channel
        // is latency-bound even with prefetching: 64x256x14x14 1.4x slower).
        const int64_t g = c1 - c0;
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t c = c0; c < c1; ++c) {
            // The plane kAhead further in this walk over the group's planes.
            const int64_t ahead = (n - lo) * g + (c - c0) + kAhead, na = lo + ahead / g,
                          ca = c0 + ahead % g;
            if (na < hi) {
              const int64_t oa = na * stride + ca * s.S;
              prefetch_values(x + oa, s.S);
              prefetch_values(dy + oa, s.S);
              if constexpr (Res) prefetch_values(z + oa, s.S);
            }
            block_sums(c, n, n + 1, 0, s.S, part_sg[at(c)], part_sgx[at(c)]);
          }
      } else {
        // Channel by channel in blocks (for_each_block): long planes, and
        // planes under 64 values, which cost more in per-plane lane sums than
        // in values; the next block prefetched.
        for (int64_t c = c0; c < c1; ++c)
          for_each_block(s, lo, hi, [&](int64_t n0, int64_t n1, int64_t off, int64_t len) {
            const int64_t base = c * s.S;
            prefetch_next_block(s, x + base, n0, n1, hi, len);
            prefetch_next_block(s, dy + base, n0, n1, hi, len);
            if constexpr (Res) prefetch_next_block(s, z + base, n0, n1, hi, len);
            block_sums(c, n0, n1, off, len, part_sg[at(c)], part_sgx[at(c)]);
          });
      }
    };
    // Channel c's gradients of weight and bias, and its dx coefficients.
    auto finish = [&](int64_t c) {
      double g1 = 0, g2 = 0;
      for (int64_t part = 0; part < P; ++part) {
        g1 += part_sg[size_t(c * P + part)];
        g2 += part_sgx[size_t(c * P + part)];
      }
      g2 = coef[c].sum_gxh(g1, g2);
      gb[c] = A(g1);
      gw[c] = A(g2);
      if (dx || dz) dx_coefficients(p.training, coef[c], g1, g2, count, k_xh[c], k_const[c]);
    };
    // dx of planes lo..hi-1 of channels c0..c1-1.
    auto dx_part = [&](int64_t c0, int64_t c1, int64_t lo, int64_t hi) {
      if (!dx && !dz) return;
      if (cols) {
        for (int64_t ca = c0; ca < c1; ca += cb.per_chunk) {
          const int64_t nc = std::min(cb.per_chunk, c1 - ca);
          repeat_coef(ca, nc, true);
          for (int64_t n = lo; n < hi; ++n)
            dx_run(n * stride + ca * s.S, nc * s.S, DxConstants<const A*>{km, ks, kh, kt, kx, kc});
        }
      } else if (wk.grouped) {
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t c = c0; c < c1; ++c) dx_run(n * stride + c * s.S, s.S, channel_dx(c));
      } else {
        for (int64_t n = lo; n < hi; ++n)
          for (int64_t off = 0; off < s.S; off += kBlock)
            dx_run(n * stride + c0 * s.S + off, std::min(kBlock, s.S - off), channel_dx(c0));
      }
    };
    if (P == 1) {
#pragma omp for schedule(static)
      for (int64_t gi = 0; gi < wk.groups; ++gi) {
        const int64_t c0 = gi * G, c1 = std::min(c0 + G, s.C);
        sums_part(c0, c1, 0, 0, s.N);
        for (int64_t c = c0; c < c1; ++c) finish(c);
        dx_part(c0, c1, 0, s.N);
      }
    } else {
      // The same static schedule over the items twice: each thread's dx
      // pass reads the parts it summed.
#pragma omp for schedule(static)
      for (int64_t it = 0; it < wk.items(); ++it) {
        const int64_t gi = it / P, part = it % P, c0 = gi * G, c1 = std::min(c0 + G, s.C);
        sums_part(c0, c1, part, wk.lo(s, part), wk.lo(s, part + 1));
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < s.C; ++c) finish(c);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < wk.items(); ++it) {
        const int64_t gi = it / P, part = it % P, c0 = gi * G, c1 = std::min(c0 + G, s.C);
        dx_part(c0, c1, wk.lo(s, part), wk.lo(s, part + 1));
      }
    }
    if constexpr (OutBuf) pdx.flush();
    if constexpr (DzBuf) pdz.flush();
  }
}

template <typename T, bool Res, bool FromOut, typename Act, typename Pre>
void backward_nsc(const BackwardParams& p, Act act, Pre pre) {
  using A = acc_t<T>;
  const int64_t C = p.shape.C, M = p.shape.count();
  const T* x = static_cast<const T*>(p.x);
  const T* z = static_cast<const T*>(p.residual);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  T* dz = static_cast<T*>(p.grad_residual);
  // Blocks of R rows for dx, of RR rows for the reductions, over wide rows
  // of W columns (WideRows).
  const WideRows wr(C);
  const int64_t W = wr.W, R = wr.k * rows_per_block<T>(W),
                RR = wr.k * rows_per_reduce_block<T>(W);
  const int64_t blocks = (M + R - 1) / R, rblocks = (M + RR - 1) / RR;
  const int nt = threads_for(M * C, p.num_threads, rblocks);
  // The constants per column, and as flat arrays too, for the vectorized
  // row loops.
  std::vector<ChannelCoef<A>> coef(W);
  std::vector<A> mean(W), scale(W), shift(W), hat(W);
  for (int64_t e = 0; e < W; ++e) {
    coef[e] = backward_coef<A>(p, e % C);
    mean[e] = coef[e].mean;
    scale[e] = coef[e].scale;
    shift[e] = coef[e].shift;
    hat[e] = coef[e].hat;
  }
  const A* mp = mean.data();
  const A* sc = scale.data();
  const A* sh = shift.data();
  const A* ht = hat.data();
  std::vector<double> tsg(size_t(nt) * W, 0.0), tsgx(size_t(nt) * W, 0.0);
  std::vector<A> k_xh(W), k_const(W);
  const A* kx = k_xh.data();
  const A* kc = k_const.data();
#pragma omp parallel num_threads(nt) firstprivate(act, pre)
  {
    const int t = omp_get_thread_num();
    constexpr bool OutBuf = out_buffered<T, Pre>, DzBuf = y_buffered<T>;
    const size_t len_max = size_t(std::max(R, RR) * C), nb = in_registers<T> ? 0 : len_max;
    std::vector<A> xbuf(buffered<T, Pre> ? len_max : 0), zbuf(nb), dybuf(nb),
        obuf(OutBuf ? len_max : 0), dzbuf(DzBuf ? len_max : 0);
    double* sg = &tsg[size_t(t) * W];
    double* sgx = &tsgx[size_t(t) * W];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < rblocks; ++blk) {
      const int64_t r = blk * RR, rr = std::min(RR, M - r), next = std::min(RR, M - r - rr) * C;
      prefetch_rows(x + (r + rr) * C, next);
      prefetch_rows(dy + (r + rr) * C, next);
      if constexpr (Res) prefetch_rows(z + (r + rr) * C, next);
      const auto* xb = load_input(x + r * C, rr * C, xbuf.data(), pre);
      const auto* zb = residual_acc<Res>(z, r * C, rr * C, zbuf.data());
      const auto* dyb = as_acc(dy + r * C, rr * C, dybuf.data());
      // Adds the sums of `rows` rows of `width` columns from value e0 of the
      // block to sg, sgx.
      auto sums_of = [&](int64_t e0, int64_t rows, int64_t width) {
        for_each_chunk(width, [&](int64_t c0, auto chunk) {
          constexpr int K = decltype(chunk)::value;
          const Act ac = act;  // a local copy: see normalize_rows
          A m[K], k[K], h[K], ik[K], g1[K] = {}, g2[K] = {};
          for (int j = 0; j < K; ++j) {
            m[j] = mp[c0 + j];
            k[j] = sc[c0 + j];
            h[j] = sh[c0 + j];
            ik[j] = ht[c0 + j];
          }
          for (int64_t i = 0; i < rows; ++i)
            for (int j = 0; j < K; ++j) {
              const int64_t e = e0 + i * width + c0 + j;
              A xh;
              const A g = grad_pre<Res, FromOut>(A(load(xb[e])), A(z_at<Res>(zb, e)),
                                                 A(load(dyb[e])), m[j], k[j], h[j], ik[j], ac, xh);
              g1[j] += g;
              g2[j] += g * xh;
            }
          // One test per chunk (v - v is 0 for every finite v); the columns
          // whose float sums overflowed are summed again in double.
          A probe = A(0);
          for (int j = 0; j < K; ++j) probe += (g1[j] - g1[j]) + (g2[j] - g2[j]);
          if (__builtin_expect(std::is_same<A, float>::value && probe != A(0), 0)) {
            redo_overflowed<Res, FromOut>(g1, g2, K, c0, xb + e0, Res ? zb + e0 : zb, dyb + e0,
                                          rows, width, coef.data(), act, sg, sgx);
            return;
          }
          for (int j = 0; j < K; ++j) {
            sg[c0 + j] += double(g1[j]);
            sgx[c0 + j] += double(g2[j]);
          }
        });
      };
      wr.rows_of(rr, sums_of);
    }
#pragma omp barrier
#pragma omp single
    finish_sums(p, tsg.data(), tsgx.data(), nt, wr, coef.data(), k_xh.data(), k_const.data());
    // implicit barrier: every thread sees the coefficients
    // Train and the wanted gradients as template switches (with_dx_switches).
    if (dx || dz) {
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r = blk * R, rr = std::min(R, M - r);
        const auto* xb = load_input(x + r * C, rr * C, xbuf.data(), pre);
        const auto* zb = residual_acc<Res>(z, r * C, rr * C, zbuf.data());
        const auto* dyb = as_acc(dy + r * C, rr * C, dybuf.data());
        auto* out = dx ? out_view<OutBuf>(dx + r * C, obuf.data()) : nullptr;
        auto* dzo = dz ? out_view<DzBuf>(dz + r * C, dzbuf.data()) : nullptr;
        with_dx_switches<Res>(p.training, dx, dz, [&](auto train, auto wanted) {
          wr.rows_of(rr, [&](int64_t e0, int64_t n, int64_t width) {
            rows_dx<decltype(train)::value, decltype(wanted)::value, Res, FromOut>(
                xb, zb, dyb, out, dzo, e0, n, width, mp, sc, sh, ht, kx, kc, act);
          });
        });
        if (dx) {
          chain_input_grad(out, x + r * C, rr * C, pre);
          narrow_to<OutBuf>(out, dx + r * C, rr * C);
        }
        if (dz) narrow_to<DzBuf>(dzo, dz + r * C, rr * C);
      }
    }
  }
}

// ------------------------------------------------------------ entry points

template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(float{});
    case DType::Float64:
#if FUSEDBN_CPU_FLOAT64
      return f(double{});
#else
      __builtin_trap();  // cpu_dispatch.cpp sends float64 to the baseline copy
#endif
    case DType::BFloat16: return f(bf16_t{});
    case DType::Float16: return f(fp16_t{});
  }
}

#ifndef FUSEDBN_CPU_HALF_BACKWARD
void forward(const ForwardParams& p, bool training) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Id = IdentityAct<acc_t<T>>;
    dispatch_activation<acc_t<T>>(p.act, [&](auto act) {
      // (The glue sends ActBn without a residual.)
      if (p.act.order == Order::ActBn) {
        // With the identity, ActBn is BnAct except for what activity counts.
        if (p.active_count) return forward_typed<T, false, kCountInput>(p, training, Id{}, act);
        return forward_typed<T, false, kCountNone>(p, training, Id{}, act);
      }
      auto run = [&](auto count) {
        constexpr int Count = decltype(count)::value;
        if (p.residual) forward_typed<T, true, Count>(p, training, act, Id{});
        else forward_typed<T, false, Count>(p, training, act, Id{});
      };
      using None = std::integral_constant<int, kCountNone>;
      using Pre = std::integral_constant<int, kCountPre>;
      p.active_count ? run(Pre{}) : run(None{});
    });
  });
}
#endif

#ifndef FUSEDBN_CPU_HALF_FORWARD
void backward(const BackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Id = IdentityAct<acc_t<T>>;
    dispatch_activation<acc_t<T>>(p.act, [&](auto act) {
      using Act = decltype(act);
      const bool ncs = p.shape.layout == Layout::NCS;
      auto run = [&](auto res, auto from_out, auto post, auto pre) {
        constexpr bool R = decltype(res)::value, F = decltype(from_out)::value;
        ncs ? backward_ncs<T, R, F>(p, post, pre) : backward_nsc<T, R, F>(p, post, pre);
      };
      using WithResidual = std::true_type;
      using NoResidual = std::false_type;
      using FromOutput = std::true_type;
      using FromInput = std::false_type;
      if constexpr (!IsIdentity<Act>::value) {
        if (p.act.order == Order::ActBn) return run(NoResidual{}, FromInput{}, Id{}, act);
      }
      if constexpr (Act::invertible) {
        if (p.from_output)
          return p.residual ? run(WithResidual{}, FromOutput{}, act, Id{})
                            : run(NoResidual{}, FromOutput{}, act, Id{});
      }
      // (The glue refuses in-place mode for activations that cannot be inverted.)
      p.residual ? run(WithResidual{}, FromInput{}, act, Id{})
                 : run(NoResidual{}, FromInput{}, act, Id{});
    });
  });
}
#endif

#undef FUSEDBN_INLINE

}  // namespace FUSEDBN_CPU_ISA
}  // namespace fusedbn
