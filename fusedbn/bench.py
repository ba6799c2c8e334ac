"""Self-check and benchmark of fusedbn against eager PyTorch: ``python -m fusedbn.bench``.

The run, in order (everything on stdout is markdown; progress goes to stderr):

1. **Header**: command line, git commit, machine (CPU model, cores, torch
   version and thread count, the CPU ISA fusedbn dispatches to, last-level
   cache, GPU), date.
2. **Self-check** on small shapes, float32/bfloat16, both layouts, every
   activation: the fusedbn module against eager ``nn.BatchNorm2d`` + the
   activation -- output, input/weight/bias gradients (training and eval),
   running statistics and ``num_batches_tracked``. One PASS/FAIL line per
   (device, dtype, layout, activation); any FAIL ends the run with exit status 1
   before anything is timed.
3. **Benchmark** on each device (CPU, and CUDA when available) over ResNet-50
   BatchNorm shapes x layouts x dtypes x activations x modes. Contenders:

   * ``fusedbn``:     ``fusedbn.BatchNormAct2d``;
   * ``fusedbn+activity``: the same with ``track_activity=True`` (dead-unit
     counting in the kernel; ``--no-activity`` drops it); the table's
     ``activity cost`` column is its time over plain fusedbn's;
   * ``eager``:       ``nn.BatchNorm2d`` + ``nn.ReLU(inplace=True)`` /
     ``nn.LeakyReLU(inplace=True)``, as torchvision builds it;
   * ``compile``:     ``torch.compile`` of that eager module (``--no-compile``
     drops it; off by default with ``--quick``; skipped with a note if
     compilation fails);
   * ``inplace_abn``: ``inplace_abn.InPlaceABN`` when importable (it
     overwrites its input, so its timed call includes an input clone).

   Modes: ``forward-train`` (training-mode forward with autograd recording,
   as in a training step; the graph is dropped), ``forward+backward``
   (that forward, then ``torch.autograd.grad`` for input, weight and bias with
   a dense upstream gradient), ``eval`` (inference-mode forward under
   ``torch.no_grad``), and, only on request, ``backward`` (the backward alone,
   ``retain_graph=True`` on a recorded forward).
4. **Memory report**: autograd-saved bytes and peak memory of one training
   step of a small ResNet-like stack (conv3x3 -> BN -> ReLU blocks), fusedbn
   vs eager.

Pass model
----------
The achieved bandwidth of a case is ``PASSES[mode] * numel * element_size``
bytes divided by the median time, the same byte count for every contender (an
*effective* bandwidth: it says how close a contender is to the minimal
unfused memory traffic, not what it really moved). One pass is one read or
one write of a full tensor:

* ``forward-train``    3 passes: read x (statistics), read x + write y;
* ``backward``         5 passes: read x and dy (reductions), read x and dy + write dx;
* ``forward+backward`` 8 passes: the two above;
* ``eval``             2 passes: read x, write y;
* ``copy``             2 passes: ``dst.copy_(src)``, read + write.

``% of copy`` is that bandwidth over the bandwidth of ``dst.copy_(src)`` on a
tensor of the same size, dtype and layout, timed in the same rounds as the
contenders. A fused kernel that keeps a channel in cache between its
statistics and its normalize pass moves fewer bytes than the model counts,
so it can exceed 100%.

Timing
------
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
import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import fusedbn

# ----------------------------------------------------------------- pass model
# The one definition of the pass model (see the module docstring).
PASSES = {
    "forward-train": 3,
    "backward": 5,
    "forward+backward": 8,
    "eval": 2,
    "copy": 2,
}


def pass_bytes(mode, numel, element_size):
    """Bytes ``mode`` moves under the pass model for a tensor of ``numel`` elements."""
    return PASSES[mode] * numel * element_size


# ------------------------------------------------------------------- settings
DEFAULT_MODES = ("forward-train", "forward+backward", "eval")
ALL_MODES = ("forward-train", "forward+backward", "eval", "backward")

SHAPE_PRESETS = {
    # BatchNorm inputs of ResNet-50 at batch 32, plus the second target.
    "resnet50": [(32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28), (32, 512, 28, 28),
                 (32, 256, 14, 14), (32, 1024, 14, 14), (32, 512, 7, 7), (32, 2048, 7, 7),
                 (64, 256, 14, 14)],
    "targets": [(32, 64, 56, 56), (64, 256, 14, 14)],
    "quick": [(8, 64, 56, 56), (16, 256, 14, 14)],
}
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
NEGATIVE_SLOPE = 0.01
ALPHA = 1.0
# "fusedbn+activity": the fused module with track_activity=True (dead-unit
# counting in the kernel, plus the module's few per-channel buffer updates).
CONTENDERS = ("fusedbn", "fusedbn+activity", "eager", "compile", "inplace_abn")
OTHERS = ("eager", "compile", "inplace_abn")

# Comparison tolerances: elementwise |got - ref| <= ATOL * max|ref| + RTOL * |ref|;
# per-channel sums (weight/bias gradients) |got - ref| <= ATOL * L1 + RTOL * |ref|,
# L1 being the sum of the magnitudes of the terms summed.
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
              torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# Kink ties: where the pre-activation is within rounding of ReLU's/LeakyReLU's
# kink, one implementation may take the other branch (eager bfloat16 computes
# the pre-activation with errors near 1e-3), and the input gradient there
# legitimately differs. Elements with |pre-activation| <= KINK_EPS (computed
# in float32 from the same values) are left out of the input-gradient check.
KINK_EPS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2,
            torch.float16: 4e-3}
KINKED = ("relu", "leaky_relu")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def shape_str(shape):
    return "x".join(str(s) for s in shape)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- comparisons
def compare(got, ref, dtype, exclude=None, l1=None, slack=None):
    """(ok, max error relative to the tolerance scale, mismatching elements).

    Elementwise unless ``l1`` (per-element scale, e.g. per-channel L1 of the
    summed terms) is given; ``exclude`` masks elements out of the check;
    ``slack`` is added to the allowed error (kink ties inside a sum)."""
    if got is None or ref is None:
        return (got is None) == (ref is None), 0.0, 0
    if tuple(got.shape) != tuple(ref.shape):
        return False, float("inf"), ref.numel()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    got = got.detach().to(work)
    ref = ref.detach().to(work)
    if ref.numel() == 0:
        return True, 0.0, 0
    atol, rtol = TOLERANCES.get(dtype, (2e-2, 2e-2))
    if l1 is None:
        scale = ref.abs().max().item()
        if not math.isfinite(scale):
            return False, float("inf"), ref.numel()
        scale = torch.tensor(scale if scale > 0 else 1.0, dtype=work, device=ref.device)
    else:
        scale = l1.to(work).clamp_min(torch.finfo(work).tiny)
    err = (got - ref).abs_()
    if slack is not None:
        err = (err - slack.to(work)).clamp_min_(0)
    bad = (err > atol * scale + rtol * ref.abs()) | err.isnan()
    if exclude is not None:
        bad &= ~exclude
        err = err.masked_fill(exclude, 0)
    nbad = int(bad.sum().item())
    max_err = (err / scale).max().item()
    return nbad == 0, max_err, nbad


def reference_terms(x, state, training, eps=1e-5):
    """x-hat and the pre-activation z, in float32 (float64 for float64), from
    the same values the contenders see: what tolerances are judged against."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().to(work)
    dims = (0, 2, 3)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
    else:
        mean, var = state["running_mean"].to(work), state["running_var"].to(work)
    view = (1, -1, 1, 1)
    xhat = (xf - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    z = xhat * state["weight"].to(work).view(view) + state["bias"].to(work).view(view)
    return xhat, z


def check_results(got, ref, dtype, activation, x, g, state, training):
    """Compare a contender's results with eager's; {quantity: (ok, err, bad)}."""
    out = {}
    xhat = kink = None
    dims = (0, 2, 3)
    for key, r in ref.items():
        if key in ("grad_input", "grad_weight", "grad_bias") and xhat is None:
            xhat, z = reference_terms(x, state, training)
            if activation in KINKED:
                kink = z.abs_() <= KINK_EPS.get(dtype, 3e-2)
            del z
        if key == "grad_input":
            out[key] = compare(got.get(key), r, dtype, exclude=kink)
        elif key in ("grad_bias", "grad_weight"):
            terms = g.detach().to(xhat.dtype).abs()
            if key == "grad_weight":
                terms.mul_(xhat.abs())
            slack = None if kink is None else (terms * kink).sum(dims)
            out[key] = compare(got.get(key), r, dtype, l1=terms.sum(dims), slack=slack)
            del terms
        else:
            out[key] = compare(got.get(key), r, dtype)
    return out


# ------------------------------------------------------------------- modules
def eager_activation(activation, inplace):
    if activation == "identity":
        return nn.Identity()
    if activation == "relu":
        return nn.ReLU(inplace=inplace)
    if activation == "leaky_relu":
        return nn.LeakyReLU(NEGATIVE_SLOPE, inplace=inplace)
    if activation == "elu":
        return nn.ELU(ALPHA, inplace=inplace)
    raise ValueError(activation)


def eager_module(C, activation, inplace=True):
    return nn.Sequential(nn.BatchNorm2d(C), eager_activation(activation, inplace))


def fused_module(C, activation, track_activity=False):
    return fusedbn.BatchNormAct2d(C, activation=activation, negative_slope=NEGATIVE_SLOPE,
                                  alpha=ALPHA, track_activity=track_activity)


def reference_state(C, dtype, device, seed):
    """BatchNorm parameters and buffers every contender starts a check from."""
    g = torch.Generator().manual_seed(seed)
    st = {
        "weight": torch.rand(C, generator=g) + 0.5,
        "bias": torch.randn(C, generator=g) * 0.2,
        "running_mean": torch.randn(C, generator=g) * 0.5,
        "running_var": torch.rand(C, generator=g) + 0.5,
    }
    st = {k: v.to(device=device, dtype=dtype) for k, v in st.items()}
    st["num_batches_tracked"] = torch.tensor(3, device=device)
    return st


def load_state(bn, state):
    with torch.no_grad():
        for name, value in state.items():
            t = getattr(bn, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(value)


def make_input(shape, dtype, device, layout, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.5  # a mean away from 0, std 2
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    return x.requires_grad_(requires_grad)


def make_grad(shape, dtype, device, layout, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(
        memory_format=LAYOUTS[layout])


class Contender:
    """A module under test, the BatchNorm holding its parameters/buffers, and
    how its input is prepared (inplace_abn clones it)."""

    def __init__(self, name, module, bn, clone_input=False):
        self.name = name
        self.module = module
        self.bn = bn
        self.clone_input = clone_input

    def params(self):
        return (self.bn.weight, self.bn.bias)

    def __call__(self, x):
        return self.module(x.clone() if self.clone_input else x)


def run_case_once(c, mode, x, g):
    """What a mode produces, for the pre-timing check against eager."""
    if mode == "eval":
        with torch.no_grad():
            return {"output": c(x)}
    out = c(x)
    if mode == "forward-train":
        return {"output": out.detach()}
    gx, gw, gb = torch.autograd.grad(out, (x,) + c.params(), g)
    return {"output": out.detach(), "grad_input": gx, "grad_weight": gw, "grad_bias": gb}


def make_timed_fn(c, mode, pool):
    """A no-argument callable doing one call of ``mode``, rotating through the pool."""
    params = c.params()
    if mode == "forward-train":
        xs = itertools.cycle([x for x, _ in pool])

        def fn():
            c(next(xs))
    elif mode == "forward+backward":
        it = itertools.cycle(pool)

        def fn():
            x, g = next(it)
            torch.autograd.grad(c(x), (x,) + params, g)
    elif mode == "eval":
        xs = itertools.cycle([x for x, _ in pool])

        def fn():
            with torch.no_grad():
                c(next(xs))
    elif mode == "backward":
        it = itertools.cycle([(c(x), x, g) for x, g in pool])

        def fn():
            out, x, g = next(it)
            torch.autograd.grad(out, (x,) + params, g, retain_graph=True)
    else:
        raise ValueError(mode)
    return fn


# ------------------------------------------------------------------- clocks
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


# -------------------------------------------------------------------- header
def git_commit():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        suffix = " (+ uncommitted changes)" if dirty.stdout.strip() else ""
        return commit.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return (model.group(1).strip() if model else platform.machine(),
            set(flags.group(1).split()) if flags else set())


def fusedbn_cpu_isa(flags):
    """The ISA fusedbn's CPU kernels run with: asked of fusedbn when it tells,
    else inferred with the rule of csrc/kernels/cpu_dispatch.cpp."""
    for owner in (getattr(fusedbn, "_C", None), fusedbn):
        for attr in ("cpu_isa", "isa_name", "cpu_isa_name"):
            f = getattr(owner, attr, None)
            if callable(f):
                try:
                    return str(f())
                except Exception:  # noqa: BLE001
                    pass
    if not flags:
        return "unknown"
    best = "baseline"
    if {"avx2", "fma", "f16c"} <= flags:
        best = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            best = "avx512"
    cap = os.environ.get("FUSEDBN_CPU_ISA")
    if cap == "baseline" or (cap == "avx2" and best == "avx512"):
        best = cap
    return f"{best} (inferred from the CPU flags and FUSEDBN_CPU_ISA; fusedbn does not report it)"


def load_average():
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def machine_busy(own_threads=0):
    """A line for the notes when other work competes for the cores
    (``own_threads``: this run's share of the load average, 0 at the start)."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return None
    if one - own_threads > 0.75 * (os.cpu_count() or 1):
        return (f"the machine was busy (1-min load average {one:.1f} on {os.cpu_count()} "
                "cores at some point of the run): timings are inflated and noisy; see spread")
    return None


def cpu_llc_bytes():
    """Largest CPU cache (bytes) from sysfs; 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            m = re.match(r"(\d+)([KMG]?)", s)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20,
                                                     "G": 1 << 30}[m.group(2)])
    except OSError:
        pass
    return best or (32 << 20)


def cache_bytes(device):
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    return cpu_llc_bytes()


def header(argv, devices):
    model, flags = cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    lines = [
        "## fusedbn benchmark",
        "",
        f"- command: `python -m fusedbn.bench {' '.join(shlex.quote(a) for a in argv)}`".rstrip(),
        f"- commit: {git_commit()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- CPU: {model}; {os.cpu_count()} logical cores ({affinity} usable); "
        f"last-level cache {cpu_llc_bytes() >> 20} MiB",
        f"- torch {torch.__version__}; torch.get_num_threads() = {torch.get_num_threads()}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- fusedbn {fusedbn.__version__}; CPU ISA: {fusedbn_cpu_isa(flags)}",
        f"- python {platform.python_version()}; {platform.platform()}",
        f"- load average at start: {load_average()}",
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"- GPU: {', '.join(names)} (CUDA {torch.version.cuda}); "
                     f"L2 {cache_bytes('cuda') >> 20} MiB")
    else:
        lines.append("- GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"- devices benchmarked: {', '.join(devices)}")
    return lines


# ----------------------------------------------------------------- self-check
SELF_CHECK_SHAPES = [(4, 8, 5, 5), (3, 16, 7, 3), (2, 32, 4, 4)]
SELF_CHECK_DTYPES = (torch.float32, torch.bfloat16)


class NotAvailable(Exception):
    pass


def self_check_one(device, dtype, layout, activation):
    """Failures (list of str) and max errors {quantity: err} over all shapes."""
    failures, errs = [], {}

    def record(tag, results, shape):
        for what, (ok, err, bad) in results.items():
            what = f"{tag} {what}".strip()
            errs[what] = max(errs.get(what, 0.0), err)
            if not ok:
                failures.append(f"{what} {shape_str(shape)} (max rel err {err:.2e}, "
                                f"{bad} elements)")

    for i, shape in enumerate(SELF_CHECK_SHAPES):
        C = shape[1]
        state = reference_state(C, dtype, device, seed=100 + i)
        eager = eager_module(C, activation, inplace=False).to(device=device, dtype=dtype)
        fused = fused_module(C, activation).to(device=device, dtype=dtype)
        for training in (True, False):
            load_state(eager[0], state)
            load_state(fused, state)
            eager.train(training)
            fused.train(training)
            x = make_input(shape, dtype, device, layout, seed=200 + i, requires_grad=True)
            g = make_grad(shape, dtype, device, layout, seed=300 + i)
            ref = eager(x)
            rgrads = torch.autograd.grad(ref, (x, eager[0].weight, eager[0].bias), g)
            try:
                out = fused(x)
            except NotImplementedError as e:
                raise NotAvailable(str(e).splitlines()[0]) from e
            grads = torch.autograd.grad(out, (x, fused.weight, fused.bias), g)
            tag = "train" if training else "eval"
            names = ("output", "grad_input", "grad_weight", "grad_bias")
            record(tag, check_results(dict(zip(names, (out,) + grads)),
                                      dict(zip(names, (ref,) + rgrads)),
                                      dtype, activation, x, g, state, training), shape)
            fmt = LAYOUTS[layout]
            if out.is_contiguous(memory_format=fmt) != ref.is_contiguous(memory_format=fmt):
                failures.append(f"{tag} output layout {shape_str(shape)}")
            if training:
                record("", {"running_mean": compare(fused.running_mean, eager[0].running_mean,
                                                    dtype),
                            "running_var": compare(fused.running_var, eager[0].running_var,
                                                   dtype)}, shape)
                if int(fused.num_batches_tracked) != int(eager[0].num_batches_tracked):
                    failures.append(f"num_batches_tracked {shape_str(shape)}")
    return failures, errs


def self_check(devices, out):
    """Prints PASS/FAIL/SKIP lines. Returns (all passed, {device: fusedbn available})."""
    out("### Self-check (fusedbn module vs eager nn.BatchNorm2d + activation)")
    out("")
    out(f"Shapes {', '.join(shape_str(s) for s in SELF_CHECK_SHAPES)}; training and eval; "
        "output, input/weight/bias gradients, running statistics, num_batches_tracked.")
    out("")
    out("```")
    all_ok, available = True, {}
    for device in devices:
        available[device] = True
        combos = itertools.product(SELF_CHECK_DTYPES, LAYOUTS, fusedbn.ACTIVATIONS)
        for dtype, layout, activation in combos:
            label = f"{device} {dtype_name(dtype)} {layout} {activation}"
            try:
                failures, errs = self_check_one(device, dtype, layout, activation)
            except NotAvailable as e:
                out(f"SKIP {device}: fusedbn has no kernel for this device ({e})")
                available[device] = False
                break
            except Exception as e:  # noqa: BLE001
                failures, errs = [f"raised {type(e).__name__}: {e}"], {}
            if failures:
                all_ok = False
                out(f"FAIL {label}: " + "; ".join(failures[:6])
                    + (f"; ... {len(failures) - 6} more" if len(failures) > 6 else ""))
            else:
                out(f"PASS {label} (max rel err {max(errs.values()):.1e})")
    out("```")
    out("")
    return all_ok, available


# ------------------------------------------------------------------ benchmark
def inplace_abn_module():
    try:
        import inplace_abn  # noqa: F401
        return inplace_abn
    except Exception:  # noqa: BLE001
        return None


def build_contenders(C, dtype, device, activation, use_compile, fused_ok, notes,
                     activity=False):
    cs = {}
    if fused_ok:
        m = fused_module(C, activation).to(device=device, dtype=dtype)
        cs["fusedbn"] = Contender("fusedbn", m, m)
        if activity:
            try:
                m = fused_module(C, activation, track_activity=True).to(device=device, dtype=dtype)
                cs["fusedbn+activity"] = Contender("fusedbn+activity", m, m)
            except Exception as exc:  # noqa: BLE001  (e.g. not implemented on CUDA yet)
                notes.add(f"fusedbn+activity unavailable on {device}: "
                          f"{type(exc).__name__}: {exc}")
    e = eager_module(C, activation).to(device=device, dtype=dtype)
    cs["eager"] = Contender("eager", e, e[0])
    if use_compile:
        ec = eager_module(C, activation).to(device=device, dtype=dtype)
        try:
            cs["compile"] = Contender("compile", torch.compile(ec, dynamic=False), ec[0])
        except Exception as exc:  # noqa: BLE001
            notes.add(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    iabn = inplace_abn_module()
    if iabn is not None:
        try:
            m = iabn.InPlaceABN(C, activation=activation,
                                activation_param=ALPHA if activation == "elu" else NEGATIVE_SLOPE)
            m = m.to(device=device, dtype=dtype)
            cs["inplace_abn"] = Contender("inplace_abn", m, m, clone_input=True)
        except Exception as exc:  # noqa: BLE001
            notes.add(f"inplace_abn: no InPlaceABN for {activation} on {device} "
                      f"({type(exc).__name__}: {exc})")
    return cs


def pool_for(shape, dtype, device, layout, mode_needs_grad, seed):
    """(x, g) pairs; the inputs x of the pool add up to >= 2x the cache."""
    numel = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    k = max(1, min(64, math.ceil(2 * cache_bytes(device) / (numel * esize))))
    return [(make_input(shape, dtype, device, layout, seed + i, requires_grad=mode_needs_grad),
             make_grad(shape, dtype, device, layout, seed + 1000 + i)) for i in range(k)]


def set_mode(cs, mode, state):
    for c in cs.values():
        load_state(c.bn, state)
        c.module.train(mode != "eval")


def bench_case(device, shape, dtype, layout, activation, mode, cs, pool, state, args, notes,
               compile_times):
    """Check every contender against eager, time the survivors and the copy."""
    numel = math.prod(shape)
    esize = pool[0][0].element_size()
    case_notes = []
    x, g = pool[0]
    set_mode(cs, mode, state)
    ref = run_case_once(cs["eager"], mode, x, g)
    live = {}
    for name, c in cs.items():
        if name == "eager":
            live[name] = c
            continue
        t0 = time.perf_counter()
        try:
            got = run_case_once(c, mode, x, g)
        except Exception as exc:  # noqa: BLE001
            msg = f"{name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            case_notes.append(msg)
            notes.add(f"{device} {shape_str(shape)} {layout} {dtype_name(dtype)} {activation} "
                      f"{mode}: {msg}; skipped")
            continue
        if name == "compile":
            dt = time.perf_counter() - t0
            if dt > 1.0:
                compile_times.append(dt)
                log(f"    torch.compile: first {mode} call took {dt:.1f} s")
        checks = check_results(got, ref, dtype, activation, x, g, state, mode != "eval")
        bad = [f"{k} max rel err {err:.1e}, {nbad} elements"
               for k, (ok, err, nbad) in checks.items() if not ok]
        del got
        if bad:
            msg = f"{name} mismatches eager ({'; '.join(bad)})"
            case_notes.append(msg)
            notes.add(f"{device} {shape_str(shape)} {layout} {dtype_name(dtype)} {activation} "
                      f"{mode}: {msg}; skipped")
            continue
        live[name] = c
    del ref
    set_mode(live, mode, state)
    fns = {}
    for name, c in live.items():
        try:
            fn = make_timed_fn(c, mode, pool)
            fn()  # a first call, outside the timer: a contender that fails here is dropped
            fns[name] = fn
        except Exception as exc:  # noqa: BLE001  (e.g. a retained graph compile refuses)
            if name == "eager":
                raise
            msg = f"{name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            case_notes.append(msg)
            notes.add(f"{device} {shape_str(shape)} {layout} {dtype_name(dtype)} {activation} "
                      f"{mode}: {msg}; skipped")
    srcs = itertools.cycle([p[0].detach() for p in pool])
    dst = torch.empty_like(pool[0][0], requires_grad=False)
    fns["copy"] = lambda: dst.copy_(next(srcs))
    times = measure(fns, device, args.rounds, args.round_time, args.warmup)
    del fns
    res = {
        "device": device, "shape": list(shape), "layout": layout, "dtype": dtype_name(dtype),
        "activation": activation, "mode": mode, "numel": numel, "element_size": esize,
        "passes": PASSES[mode], "pass_bytes": pass_bytes(mode, numel, esize),
        "pool": len(pool), "contenders": {}, "notes": case_notes,
    }
    for name, ts in times.items():
        s = summarize(ts)
        nbytes = pass_bytes("copy" if name == "copy" else mode, numel, esize)
        s["GBps"] = nbytes / s["median_s"] / 1e9
        res["contenders"][name] = s
    cont = res["contenders"]
    res["speedup"] = {}
    if "fusedbn" in cont:
        for o in OTHERS:
            if o in cont:
                res["speedup"][o] = cont[o]["median_s"] / cont["fusedbn"]["median_s"]
        res["fusedbn_pct_copy"] = 100 * cont["fusedbn"]["GBps"] / cont["copy"]["GBps"]
        if "fusedbn+activity" in cont:
            res["activity_cost"] = (cont["fusedbn+activity"]["median_s"]
                                    / cont["fusedbn"]["median_s"])
    res["spread"] = max((v["q3_s"] - v["q1_s"]) / v["median_s"] for k, v in cont.items()
                        if k != "copy")
    return res


def run_benchmark(args, devices, fused_available, notes):
    results = []
    compile_times = []
    cases = [(d, s, dt, lay, act, m) for d in devices for s in args.shapes for dt in args.dtypes
             for lay in args.layouts for act in args.activations for m in args.modes]
    total = len(cases)
    t_start = time.perf_counter()
    i = 0
    try:
        for device in devices:
            fused_ok = fused_available.get(device, False)
            use_compile = args.compile
            for shape in args.shapes:
                for dtype in args.dtypes:
                    for layout in args.layouts:
                        needs_grad = any(m != "eval" for m in args.modes)
                        pool = pool_for(shape, dtype, device, layout, needs_grad, seed=1)
                        state = reference_state(shape[1], dtype, device, seed=7)
                        for activation in args.activations:
                            if use_compile:
                                torch._dynamo.reset()
                            cs = build_contenders(shape[1], dtype, device, activation,
                                                  use_compile, fused_ok, notes, args.activity)
                            for mode in args.modes:
                                i += 1
                                label = (f"{device} {shape_str(shape)} {layout} "
                                         f"{dtype_name(dtype)} {activation} {mode}")
                                log(f"[{i}/{total}] {label} (pool {len(pool)}, "
                                    f"{time.perf_counter() - t_start:.0f} s elapsed)")
                                r = bench_case(device, shape, dtype, layout, activation, mode,
                                               cs, pool, state, args, notes, compile_times)
                                results.append(r)
                                cont = r["contenders"]
                                log("    " + ", ".join(
                                    f"{k} {fmt_ms(v['median_s'])} ms" for k, v in cont.items())
                                    + "".join(f", x{v:.2f} vs {k}"
                                              for k, v in r["speedup"].items()))
                            del cs
                        del pool
                        gc.collect()
    except KeyboardInterrupt:
        notes.add(f"interrupted after {len(results)} of {total} cases; the table is partial")
        log("interrupted; reporting the cases done so far")
    if compile_times:
        notes.add(f"torch.compile: {len(compile_times)} first calls compiled, "
                  f"{sum(compile_times):.0f} s in all (outside every timing)")
    return results


# --------------------------------------------------------------------- output
def fmt_ms(seconds):
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def table(results):
    present = [c for c in CONTENDERS if any(c in r["contenders"] for r in results)]
    vs = [o for o in OTHERS if any(o in r["speedup"] for r in results)]
    cols = (["device", "shape", "layout", "dtype", "act", "mode"]
            + [f"{c} ms" for c in present]
            + [f"fusedbn vs {o}" for o in vs]
            + (["activity cost"] if any("activity_cost" in r for r in results) else [])
            + ["fusedbn GB/s", "copy GB/s", "% of copy", "spread"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cont = r["contenders"]
        row = [r["device"], shape_str(r["shape"]), r["layout"], r["dtype"], r["activation"],
               r["mode"]]
        row += [fmt_ms(cont[c]["median_s"]) if c in cont else "-" for c in present]
        row += [f"{r['speedup'][o]:.2f}x" if o in r["speedup"] else "-" for o in vs]
        if "activity cost" in cols:
            row += [f"{r['activity_cost']:.2f}x" if "activity_cost" in r else "-"]
        row += [f"{cont['fusedbn']['GBps']:.1f}" if "fusedbn" in cont else "-",
                f"{cont['copy']['GBps']:.1f}",
                f"{r['fusedbn_pct_copy']:.0f}%" if "fusedbn_pct_copy" in r else "-",
                f"{100 * r['spread']:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary(results):
    """Geometric-mean speedups and mean % of copy per (device, mode)."""
    lines = []
    groups = {}
    for r in results:
        groups.setdefault((r["device"], r["mode"]), []).append(r)
    vs = [o for o in OTHERS if any(o in r["speedup"] for r in results)]
    if not vs:
        return lines
    lines += ["| device | mode | cases | " + " | ".join(f"geomean vs {o}" for o in vs)
              + " | mean % of copy |", "|" + "---|" * (4 + len(vs))]
    for (device, mode), rs in groups.items():
        cells = []
        for o in vs:
            sp = [r["speedup"][o] for r in rs if o in r["speedup"]]
            cells.append(f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x" if sp else "-")
        pct = [r["fusedbn_pct_copy"] for r in rs if "fusedbn_pct_copy" in r]
        pct_cell = f"{sum(pct) / len(pct):.0f}%" if pct else "-"
        lines.append(f"| {device} | {mode} | {len(rs)} | " + " | ".join(cells)
                     + f" | {pct_cell} |")
    return lines


CSV_CONTENDERS = CONTENDERS + ("copy",)


def write_csv(path, results):
    import csv
    fields = ["device", "shape", "layout", "dtype", "activation", "mode", "numel",
              "element_size", "passes", "pass_bytes", "pool"]
    for c in CSV_CONTENDERS:
        fields += [f"{c}_median_ms", f"{c}_q1_ms", f"{c}_q3_ms", f"{c}_GBps"]
    fields += [f"speedup_vs_{o}" for o in OTHERS] + ["fusedbn_pct_copy", "spread", "notes"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            row = {k: r[k] for k in fields[:11]}
            row["shape"] = shape_str(r["shape"])
            for c in CSV_CONTENDERS:
                if c in r["contenders"]:
                    v = r["contenders"][c]
                    row.update({f"{c}_median_ms": v["median_s"] * 1e3, f"{c}_q1_ms": v["q1_s"] * 1e3,
                                f"{c}_q3_ms": v["q3_s"] * 1e3, f"{c}_GBps": v["GBps"]})
            for o in OTHERS:
                if o in r["speedup"]:
                    row[f"speedup_vs_{o}"] = r["speedup"][o]
            row["fusedbn_pct_copy"] = r.get("fusedbn_pct_copy")
            row["spread"] = r["spread"]
            row["notes"] = "; ".join(r["notes"])
            w.writerow(row)


def write_plot(path, results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("--plot: matplotlib is not installed (pip install matplotlib, or "
                "pip install 'fusedbn[bench]'); no plot written")
    vs = [o for o in OTHERS if any(o in r["speedup"] for r in results)]
    if not vs:
        return "--plot: no fusedbn speedups to plot"
    results = [r for r in results if r["speedup"]]
    short = {"contiguous": "NCHW", "channels_last": "NHWC"}
    labels = [f"{r['device']} {shape_str(r['shape'])} {short[r['layout']]} {r['dtype']} "
              f"{r['activation']} {r['mode']}" for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(results) + 1.5))
    h = 0.8 / len(vs)
    for j, o in enumerate(vs):
        ax.barh([i + j * h for i in range(len(results))],
                [r["speedup"].get(o, float("nan")) for r in results], height=h, label=f"vs {o}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + h * (len(vs) - 1) / 2 for i in range(len(results))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fusedbn (time of other / time of fusedbn), log scale")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


# --------------------------------------------------------------- memory report
MEMORY_CONFIG = {"cpu": dict(N=8, C=64, H=28, W=28, blocks=6),
                 "cuda": dict(N=32, C=64, H=56, W=56, blocks=6)}


def resnet_stack(variant, C, blocks):
    layers = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(C, C, 3, padding=1, bias=False))
        if variant == "eager":
            layers += [nn.BatchNorm2d(C), nn.ReLU(inplace=True)]
        else:
            layers.append(fusedbn.BatchNormAct2d(C, activation="relu"))
    return nn.Sequential(*layers)


def saved_tensor_stats(model, x, g, act_bytes):
    seen, count = {}, [0]

    def pack(t):
        count[0] += 1
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        seen[key] = max(seen.get(key, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.backward(g)
    full = [b for b in seen.values() if b >= act_bytes]
    return {"saved_tensors": count[0], "unique_storages": len(seen),
            "saved_bytes": sum(seen.values()), "full_size_storages": len(full),
            "full_size_bytes": sum(full)}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+)\s+kB", f.read())
    return int(m.group(1))


def memory_one(variant, device, dtype, layout, cfg, measure_rss):
    torch.manual_seed(0)
    shape = (cfg["N"], cfg["C"], cfg["H"], cfg["W"])
    model = resnet_stack(variant, cfg["C"], cfg["blocks"]).to(device=device, dtype=dtype)
    model = model.to(memory_format=LAYOUTS[layout])
    x = make_input(shape, dtype, device, layout, seed=5)
    g = make_grad(shape, dtype, device, layout, seed=6)
    act_bytes = x.numel() * x.element_size()
    res = saved_tensor_stats(model, x, g, act_bytes)
    res["activation_bytes"] = act_bytes
    for _ in range(2):  # warm-up steps (lazy initialisations, grads allocated)
        model.zero_grad(set_to_none=True)
        model(x).backward(g)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).backward(g)
        torch.cuda.synchronize()
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        res["peak_how"] = "torch.cuda.max_memory_allocated() above the allocated baseline"
    elif measure_rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        base = _rss_kib("VmRSS")
        model(x).backward(g)
        res["peak_bytes"] = (_rss_kib("VmHWM") - base) * 1024
        res["peak_how"] = ("peak RSS above the resident baseline, in a subprocess with "
                           "MALLOC_MMAP_THRESHOLD_=65536 so every tensor is mmapped and freed "
                           "memory leaves the RSS")
    return res


def memory_child(spec):
    spec = json.loads(spec)
    out = {}
    for variant in ("eager", "fusedbn"):
        out[variant] = memory_one(variant, "cpu", DTYPE_NAMES[spec["dtype"]], spec["layout"],
                                  spec["cfg"], measure_rss=True)
        gc.collect()
    print("MEMORY-JSON " + json.dumps(out))


def memory_report(devices, dtype, layouts, fused_available, out, notes):
    report = []
    for device in devices:
        if not fused_available.get(device):
            continue
        cfg = MEMORY_CONFIG[device]
        for layout in layouts:
            stats = None
            if device == "cpu":
                spec = json.dumps({"dtype": dtype_name(dtype), "layout": layout, "cfg": cfg})
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                env["PYTHONPATH"] = os.pathsep.join(
                    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                    + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
                try:
                    # torch imported first: the extension needs torch's libraries loaded.
                    child = ("import sys, torch; from fusedbn.bench import main; "
                             "sys.exit(main(sys.argv[1:]))")
                    p = subprocess.run([sys.executable, "-c", child, "--_memory-child", spec],
                                       env=env, capture_output=True, text=True, timeout=600)
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMORY-JSON ")]
                    if p.returncode == 0 and line:
                        stats = json.loads(line[-1][len("MEMORY-JSON "):])
                    else:
                        notes.add("memory report: the peak-RSS subprocess failed "
                                  f"({p.stderr.strip().splitlines()[-1:]}); peak not measured")
                except (OSError, subprocess.SubprocessError) as e:
                    notes.add(f"memory report: subprocess failed ({e}); peak not measured")
                if stats is None:
                    stats = {v: memory_one(v, device, dtype, layout, cfg, measure_rss=False)
                             for v in ("eager", "fusedbn")}
            else:
                stats = {v: memory_one(v, device, dtype, layout, cfg, measure_rss=False)
                         for v in ("eager", "fusedbn")}
            report.append({"device": device, "layout": layout, "dtype": dtype_name(dtype),
                           "config": cfg, "variants": stats})
    if not report:
        return report
    out("### Memory: one training step (forward + backward)")
    out("")
    cfg_txt = "; ".join(f"{d}: {c['blocks']} x (conv3x3 -> BN -> ReLU), input "
                        f"{c['N']}x{c['C']}x{c['H']}x{c['W']}"
                        for d, c in MEMORY_CONFIG.items() if d in devices)
    out(f"{cfg_txt}; {dtype_name(dtype)}. Saved = tensors autograd saves for backward "
        "(torch.autograd.graph.saved_tensors_hooks), counted once per storage; full-size = "
        "storages at least one activation in size. Peak = extra memory at the step's peak.")
    out("")
    out("| device | layout | variant | saved tensors | unique storages | saved MiB | "
        "full-size storages | full-size MiB | peak MiB |")
    out("|---|---|---|---|---|---|---|---|---|")
    for rep in report:
        for v, s in rep["variants"].items():
            peak = f"{s['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in s else "not measured"
            out(f"| {rep['device']} | {rep['layout']} | {v} | {s['saved_tensors']} | "
                f"{s['unique_storages']} | {s['saved_bytes'] / 2**20:.1f} | "
                f"{s['full_size_storages']} | {s['full_size_bytes'] / 2**20:.1f} | {peak} |")
    hows = sorted({s.get("peak_how", "") for rep in report for s in rep["variants"].values()})
    hows = [h for h in hows if h]
    out("")
    out("Peak measured as: " + "; ".join(hows) if hows else
        "Peak memory not measured on CPU (torch's CPU allocations have no counter).")
    out("")
    return report


# ------------------------------------------------------------------------ CLI
def parse_shapes(text):
    shapes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part in SHAPE_PRESETS:
            shapes += SHAPE_PRESETS[part]
            continue
        dims = part.lower().split("x")
        if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(
                f"shape {part!r}: expected NxCxHxW (e.g. 32x64x56x56) or a preset "
                f"({', '.join(SHAPE_PRESETS)})")
        shapes.append(tuple(int(d) for d in dims))
    seen = []
    for s in shapes:
        if s not in seen:
            seen.append(s)
    return seen


def parse_list(choices, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        for t in items:
            if t not in choices:
                raise argparse.ArgumentTypeError(
                    f"{what} {t!r}: choose from {', '.join(choices)}")
        return items
    return parse


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fusedbn.bench",
        description="Self-check, then benchmark fusedbn against eager BatchNorm2d + activation "
                    "(and torch.compile, inplace_abn). Markdown report on stdout, progress on "
                    "stderr. See benchmarks/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="small run (~1 minute on 2 cores): shapes 'quick', relu, 3 rounds, "
                        "no torch.compile unless --compile")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="benchmark only this device (default: cpu, and cuda when available)")
    p.add_argument("--shapes", type=parse_shapes,
                   help="comma list of NxCxHxW and/or presets "
                        f"({', '.join(SHAPE_PRESETS)}); default resnet50 (quick: quick)")
    p.add_argument("--dtypes", type=parse_list(tuple(DTYPE_NAMES), "dtype"),
                   help="comma list (float32,bfloat16,float16,float64); default float32,bfloat16")
    p.add_argument("--layouts", type=parse_list(tuple(LAYOUTS), "layout"),
                   help="comma list (contiguous,channels_last); default both")
    p.add_argument("--activations", type=parse_list(fusedbn.ACTIVATIONS, "activation"),
                   help="comma list; default relu,leaky_relu (quick: relu)")
    p.add_argument("--modes", type=parse_list(ALL_MODES, "mode"),
                   help="comma list of forward-train,forward+backward,eval,backward; "
                        "default the first three")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile (the default except with --quick)")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave torch.compile out")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    p.add_argument("--round-time", type=float,
                   help="seconds per contender per round (default 0.2, quick 0.04)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per contender (default 0.2, "
                                                "quick 0.04)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) before anything")
    p.add_argument("--json", metavar="PATH", help="write all results (every round) as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one row per case as CSV")
    p.add_argument("--md", metavar="PATH",
                   help="append the markdown report (what stdout shows) to PATH")
    p.add_argument("--plot", metavar="PNG", help="bar chart of fusedbn's speedups "
                                                 "(needs matplotlib)")
    p.add_argument("--no-check", action="store_true", help="skip the self-check (not advised)")
    p.add_argument("--check-only", action="store_true", help="run the self-check and stop")
    p.add_argument("--no-memory", action="store_true", help="skip the memory report")
    p.add_argument("--no-activity", dest="activity", action="store_false",
                   help="leave out the fusedbn+activity contender (track_activity=True: "
                        "the dead-unit counting's cost, shown as 'activity cost', its time "
                        "over plain fusedbn's)")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p


def apply_defaults(args):
    q = args.quick
    args.shapes = args.shapes or SHAPE_PRESETS["quick" if q else "resnet50"]
    args.dtypes = [DTYPE_NAMES[d] for d in (args.dtypes or ["float32", "bfloat16"])]
    args.dtypes = list(dict.fromkeys(args.dtypes))
    args.layouts = args.layouts or list(LAYOUTS)
    args.activations = args.activations or (["relu"] if q else ["relu", "leaky_relu"])
    args.modes = args.modes or list(DEFAULT_MODES)
    if args.compile is None:
        args.compile = not q
    args.rounds = args.rounds or (3 if q else 7)
    args.round_time = args.round_time or (0.04 if q else 0.2)
    args.warmup = args.warmup if args.warmup is not None else (0.04 if q else 0.2)
    if args.rounds < 1 or args.round_time <= 0:
        raise SystemExit("--rounds must be >= 1 and --round-time > 0")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    apply_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    devices = [args.device] if args.device else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    t0 = time.perf_counter()
    report = []
    notes = set()

    def out(line=""):
        report.append(line)
        print(line, flush=True)

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("warning: --plot needs matplotlib (pip install matplotlib); "
                "the run goes on without a plot")

    for line in header(argv, devices):
        out(line)
    out("")
    busy = machine_busy()
    if busy and not any(n.startswith("the machine was busy") for n in notes):
        notes.add(busy)

    fused_available = {d: True for d in devices}
    ok = True
    if not args.no_check:
        ok, fused_available = self_check(devices, out)
    if not ok:
        out("Self-check FAILED: nothing benchmarked.")
        finish(args, report, [], [], notes, t0, out)
        return 1
    if args.check_only:
        finish(args, report, [], [], notes, t0, out)
        return 0
    for d, avail in fused_available.items():
        if not avail:
            notes.add(f"fusedbn has no {d} kernel: only the other contenders are timed on {d}")

    if inplace_abn_module() is None:
        notes.add("inplace_abn is not importable: that contender is absent")
    if not args.compile:
        notes.add("torch.compile left out (--no-compile, or --quick without --compile)")

    results = run_benchmark(args, devices, fused_available, notes)
    cache_note = []
    for d in devices:
        cache_note.append(f"{d} {cache_bytes(d) >> 20} MiB")
    out("### Benchmark")
    out("")
    out(f"Per-call milliseconds, median over the samples of {args.rounds} interleaved rounds "
        f"(~{args.round_time} s of samples per contender per round). `fusedbn vs X` = time of X / time of fusedbn (>1: "
        "fusedbn faster). GB/s under the pass model (forward-train 3, backward 5, "
        "forward+backward 8, eval 2 passes of numel x element size); `% of copy` = that over "
        "the bandwidth of `dst.copy_(src)` (2 passes) on the same tensor, timed in the same "
        f"rounds. Inputs rotate through a pool of >= 2x the cache ({', '.join(cache_note)}). "
        "`spread` = largest (Q3-Q1)/median among the contenders.")
    out("")
    for line in table(results):
        out(line)
    out("")
    summ = summary(results)
    if summ:
        out("Summary (geometric mean of the per-case speedups):")
        out("")
        for line in summ:
            out(line)
        out("")
    memory = []
    if not args.no_memory:
        log("memory report ...")
        memory = memory_report(devices, args.dtypes[0], args.layouts, fused_available, out, notes)
    if args.csv:
        write_csv(args.csv, results)
    if args.plot:
        msg = write_plot(args.plot, results)
        if msg:
            notes.add(msg)
    finish(args, report, results, memory, notes, t0, out)
    return 0


def finish(args, report, results, memory, notes, t0, out):
    busy = machine_busy(own_threads=torch.get_num_threads() if results else 0)
    if busy and not any(n.startswith("the machine was busy") for n in notes):
        notes.add(busy)
    if notes:
        out("Notes:")
        out("")
        for n in sorted(notes):
            out(f"- {n}")
        out("")
    out(f"Load average at end: {load_average()}")
    out("")
    out(f"Total runtime: {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": report, "results": results, "memory": memory,
                       "notes": sorted(notes), "pass_model": PASSES}, f, indent=1)
    if args.md:
        exists = os.path.exists(args.md) and os.path.getsize(args.md) > 0
        with open(args.md, "a") as f:
            if exists:
                f.write("\n---\n\n")
            f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    sys.exit(main())
