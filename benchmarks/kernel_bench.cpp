// Times the torch-free CPU kernels (the AVX-512 copy, or the AVX2 one with
// -DFUSEDBN_KB_AVX2) against memcpy, without
// torch or Python in the way: what the kernels themselves reach, as a
// percentage of the copy bandwidth under the pass model (forward-train 3
// passes, eval 2, backward 5; see fusedbn/bench/passes.py).
//
//   g++ -O3 -std=c++17 -fopenmp -fno-math-errno -fno-trapping-math -Icsrc/kernels
//       [-DFUSEDBN_ONLY_ACT=GELUAct] [-DFUSEDBN_KB_AVX2] benchmarks/kernel_bench.cpp
//       -o /tmp/kernel_bench
//   /tmp/kernel_bench [threads] [filter] [NxCxS ...]
//
// NxCxS: time these shapes (float32, bfloat16 and float16, both layouts)
// instead of the default set, e.g. the layers of a model ("8x2048x16
// 8x512x196").
//
// filter: run only the cases whose "dtype NxCxS layout" contains it from the
// start of a word, e.g. "bfloat16 64x256x196 NSC" (handy under perf record).
//
// FUSEDBN_KB_RESIDUAL=1 in the environment: every case with a residual,
// y = act(bn(x) + z), whose backward writes dz as well as dx. The
// percentages keep the plain pass model, so they understate such cases
// (one more read in each mode, one more write in the backward).
//
// Best of 5 rounds of ~0.15 s each, wall time; the machine must be quiet.
// Each call takes the next input of a pool of twice the last-level cache (at
// least 64 MB), as fusedbn.bench does, so no input is still cached.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <vector>

// One copy of the kernels, compiled as the extension does (its flags above),
// for the one activation FUSEDBN_ONLY_ACT (the default parameters).
#ifndef FUSEDBN_ONLY_ACT
#define FUSEDBN_ONLY_ACT ReLUAct
#endif
#ifdef FUSEDBN_KB_AVX2
#define FUSEDBN_ISA_AVX2
#include "cpu_isa.h"
namespace isa = fusedbn::avx2;
#else
#define FUSEDBN_ISA_AVX512
#include "cpu_isa.h"
namespace isa = fusedbn::avx512;
#endif

using namespace fusedbn;

template <class F>
double best_ms(F f) {
  f();
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    int it = 0;
    double s;
    do {
      f();
      ++it;
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (s < 0.15);
    best = std::min(best, s / it);
  }
  return best * 1e3;
}

static const char* g_filter = "";

// Whether filter occurs in label at the start of a word ("float16" is not
// found in "bfloat16").
static bool matches(const char* label, const char* filter) {
  for (const char* at = std::strstr(label, filter); at; at = std::strstr(at + 1, filter))
    if (at == label || at[-1] == ' ') return true;
  return false;
}

// A value in [-1, 1) from a mixed hash of i (the splitmix64 finalizer): signs
// no branch predictor can learn, as with torch.randn. (A linear sequence mod
// 1000 was used before; its signs were predictable enough to hide the cost
// of a branch per value in scalar loop tails.)
inline float uniform(uint64_t i) {
  uint64_t z = i + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(z >> 40) / float(1 << 23) - 1.f;
}

template <typename T>
void run(int64_t N, int64_t C, int64_t S, Layout layout, DType dt, const char* name, int nt) {
  char label[96];
  std::snprintf(label, sizeof label, "%s %ldx%ldx%ld %s", name, long(N), long(C), long(S),
                layout == Layout::NCS ? "NCS" : "NSC");
  if (!matches(label, g_filter)) return;
  const size_t n = size_t(N * C * S), bytes = n * sizeof(T);
  auto alloc = [&] { return static_cast<T*>(aligned_alloc(64, (bytes + 63) / 64 * 64)); };
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  const size_t cold = std::max<size_t>(size_t(64) << 20, 2 * size_t(std::max(llc, 0L)));
  const size_t pool = std::max<size_t>(2, cold / bytes + 1);
  std::vector<T*> xs(pool), dys(pool);
  for (size_t k = 0; k < pool; ++k) {
    xs[k] = alloc();
    dys[k] = alloc();
    for (size_t i = 0; i < n; ++i) {
      xs[k][i] = store<T>(uniform(2 * (k * n + i)));
      dys[k][i] = store<T>(uniform(2 * (k * n + i) + 1));
    }
  }
  size_t next = 0;
  auto rotate = [&] { next = (next + 1) % pool; return next; };
  T *x = xs[0], *y = alloc(), *dx = alloc(), *z = nullptr, *dz = nullptr;
  const char* res_env = std::getenv("FUSEDBN_KB_RESIDUAL");
  if (res_env && std::strcmp(res_env, "1") == 0) {
    z = alloc();
    dz = alloc();
    for (size_t i = 0; i < n; ++i) z[i] = store<T>(float(i % 7) / 8.f - 0.375f);
  }
  std::vector<float> w(C, 1.5f), b(C, 0.1f), mean(C), invstd(C), rm(C, 0), rv(C, 1), gw(C), gb(C);
  const double copy = best_ms([&] {
    const T* src = xs[rotate()];
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t k = 0; k < 64; ++k) {
      const size_t a = n * k / 64, e = n * (k + 1) / 64;
      std::memcpy(y + a, src + a, (e - a) * sizeof(T));
    }
  });
  ForwardParams p;
  p.shape = {N, C, S, layout};
  p.dtype = dt;
  p.x = x;
  p.y = y;
  p.weight = w.data();
  p.bias = b.data();
  p.mean = mean.data();
  p.invstd = invstd.data();
  p.running_mean = rm.data();
  p.running_var = rv.data();
  p.num_threads = nt;
  p.residual = z;
  const double train = best_ms([&] { p.x = xs[rotate()]; isa::forward(p, true); });
  const double eval = best_ms([&] { p.x = xs[rotate()]; isa::forward(p, false); });
  BackwardParams q;
  q.shape = p.shape;
  q.dtype = dt;
  q.x = x;
  q.dx = dx;
  q.weight = w.data();
  q.bias = b.data();
  q.mean = mean.data();
  q.invstd = invstd.data();
  q.grad_weight = gw.data();
  q.grad_bias = gb.data();
  q.num_threads = nt;
  q.residual = z;
  q.grad_residual = dz;
  const double bwd = best_ms([&] {
    const size_t k = rotate();
    q.x = xs[k];
    q.dy = dys[k];
    isa::backward(q);
  });
  const double copy_gbs = 2.0 * bytes / copy / 1e6;
  auto pct = [&](double passes, double ms) { return passes * bytes / ms / 1e6 / copy_gbs * 100; };
  std::printf("| %s | %ldx%ldx%ld | %s | %.3f | %.3f (%.0f%%) | %.3f (%.0f%%) | %.3f (%.0f%%) |\n",
              name, long(N), long(C), long(S), layout == Layout::NCS ? "NCS" : "NSC", copy, train,
              pct(3, train), eval, pct(2, eval), bwd, pct(5, bwd));
  for (size_t k = 0; k < pool; ++k) {
    free(xs[k]);
    free(dys[k]);
  }
  free(y);
  free(dx);
  free(z);
  free(dz);
}

int main(int argc, char** argv) {
  const int nt = argc > 1 ? std::atoi(argv[1]) : 2;
  if (argc > 2) g_filter = argv[2];
  std::printf("threads %d; ms, (%% of copy bandwidth under the 3/2/5-pass model)\n\n", nt);
  std::printf("| dtype | NxCxS | layout | copy | forward-train | eval | backward |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  if (argc > 3) {
    for (Layout L : {Layout::NCS, Layout::NSC})
      for (int a = 3; a < argc; ++a) {
        long N = 0, C = 0, S = 0;
        if (std::sscanf(argv[a], "%ldx%ldx%ld", &N, &C, &S) != 3 || N < 1 || C < 1 || S < 1) {
          std::fprintf(stderr, "bad shape %s (want NxCxS)\n", argv[a]);
          return 2;
        }
        run<float>(N, C, S, L, DType::Float32, "float32", nt);
        run<bf16_t>(N, C, S, L, DType::BFloat16, "bfloat16", nt);
        run<fp16_t>(N, C, S, L, DType::Float16, "float16", nt);
      }
    return 0;
  }
  for (Layout L : {Layout::NCS, Layout::NSC}) {
    run<float>(32, 64, 3136, L, DType::Float32, "float32", nt);
    run<float>(64, 256, 196, L, DType::Float32, "float32", nt);
    run<float>(8, 512, 49, L, DType::Float32, "float32", nt);
    run<bf16_t>(32, 64, 3136, L, DType::BFloat16, "bfloat16", nt);
    run<bf16_t>(64, 256, 196, L, DType::BFloat16, "bfloat16", nt);
    run<bf16_t>(8, 512, 49, L, DType::BFloat16, "bfloat16", nt);
    run<fp16_t>(32, 64, 3136, L, DType::Float16, "float16", nt);
    run<fp16_t>(64, 256, 196, L, DType::Float16, "float16", nt);
    run<fp16_t>(8, 512, 49, L, DType::Float16, "float16", nt);
  }
}
