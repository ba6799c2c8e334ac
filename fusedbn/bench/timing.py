"""Timing for ``fusedbn.bench``: clocks and the interleaved round-robin.

* CPU: ``torch.utils.benchmark.Timer`` with ``num_threads=torch.get_num_threads()``
  (the Timer's own default is one thread). CUDA: CUDA events around a block of
  calls, after a ``torch.cuda.synchronize()``.
* Every contender gets the same inputs. The inputs rotate through a pool large
  enough that one pass over it is at least twice the last-level cache (CPU) or
  L2 (CUDA), so no call finds its input in cache from the previous call.
* Each contender's output (and gradients) is checked against eager once before
  timing; a mismatching or failing contender is dropped from that case with a
  note.
* Warm-up, then contenders (and the copy) are interleaved round-robin over
  ``--rounds`` rounds, the starting contender rotating each round; in a round
  each gets about ``--round-time`` seconds of samples, a sample timing one
  call (or a block of calls when one call is shorter than 1 ms). The reported
  figure is the median per-call time over all samples: a sample hit by a
  preemption is an outlier the median drops. JSON/CSV also keep the minimum
  and every sample. The ``spread`` column is the largest interquartile range
  over median among the contenders of that case: a noisy machine shows there,
  and the header gives the load average at the start and the end.
"""
import math
import statistics

import torch


class CpuClock:
    """Per-call time of ``fn`` over ``number`` calls, torch.utils.benchmark.Timer
    with ``num_threads=torch.get_num_threads()`` (its default is one thread)."""

    def __init__(self, fn):
        from torch.utils import benchmark
        from torch.utils.benchmark.utils import common
        self.fn = fn
        self.num_threads = torch.get_num_threads()
        self.timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                     num_threads=self.num_threads)
        self._threads = getattr(common, "set_torch_threads", None)
        # Timer.timeit(n) first runs max(n // 100, 2) untimed calls: three
        # times the work for a one-call sample. Its timed core, under the
        # Timer's thread setting, does just the n calls.
        self._core = getattr(self.timer, "_timeit", None)

    def per_call(self, number):
        if self._core is not None and self._threads is not None:
            with self._threads(self.num_threads):
                return self._core(number) / number
        return self.timer.timeit(number).mean


class CudaClock:
    """Per-call time of ``fn`` over ``number`` calls, CUDA events."""

    def __init__(self, fn):
        self.fn = fn

    def per_call(self, number):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            self.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number


SAMPLE_TIME = 1e-3  # seconds per timed sample: one call, or a block of calls if shorter


def measure(fns, device, rounds, round_time, warmup_time):
    """Interleaved round-robin timing: {name: [per-call seconds, one per sample]}.

    Each round gives every contender (starting contender rotating) about
    ``round_time`` seconds of samples; a sample times one call, or a block of
    calls where one call is shorter than SAMPLE_TIME. A sample that a
    preemption hits is an outlier the median discards, which a long block
    would have averaged in."""
    clocks = {n: (CudaClock if device == "cuda" else CpuClock)(fn) for n, fn in fns.items()}
    plan = {}
    for name, clock in clocks.items():
        # Warm-up: at least two calls and warmup_time seconds.
        spent, calls, best = 0.0, 0, float("inf")
        while calls < 2 or spent < warmup_time:
            t = clock.per_call(1)
            spent += t
            calls += 1
            best = min(best, t)
        if best * 20 < SAMPLE_TIME:  # too short to time one call alone: refine
            best = min(best, clock.per_call(max(2, int(SAMPLE_TIME / (2 * best)))))
        per_sample = max(1, int(math.ceil(SAMPLE_TIME / max(best, 1e-9))))
        samples = max(1, int(round(round_time / (per_sample * best))))
        plan[name] = (per_sample, samples)
    names = list(clocks)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_sample, samples = plan[name]
            for _ in range(samples):
                times[name].append(clocks[name].per_call(per_sample))
    return times


def summarize(ts):
    med = statistics.median(ts)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(ts), "samples": len(ts),
            "times_s": ts}

