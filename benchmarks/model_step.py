"""A whole ResNet-50-shaped training step on CPU: eager against fusedbn.convert.

    PYTHONPATH=. python benchmarks/model_step.py [--batch 8] [--size 112]
        [--threads 2] [--steps 3] [--rounds 5] [--dtype float32|bfloat16]
        [--channels-last] [--eval] [--md benchmarks/results/DATE-cpu-MACHINE-model-step.md]
    FUSEDBN_CPU_ISA=avx2 PYTHONPATH=. python benchmarks/model_step.py ...   # the AVX2 copy

(PYTHONPATH=.: from the repository root after an in-place build; not needed
where fusedbn is installed.)

The network is torchvision's resnet50 rebuilt here (torchvision is not a
dependency): bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv, plain
nn.BatchNorm2d / nn.ReLU(inplace=True) and ``out += identity; relu(out)``.
Two copies with the same weights, eager and converted, each with its own SGD
(lr 0.01, momentum 0.9); a step is forward, cross-entropy on random labels,
backward, optimizer step (``--eval``: a forward under no_grad in eval mode).
After 2 warm-up steps each, every round times ``--steps`` steps of one model
then of the other, the first alternating per round; the medians are compared.

In the same run torch.profiler splits two more steps of each model: the
time of the BatchNorm and activation ops, forward and backward (with the ops
they call; fused: the fusedbn::* ops, plus the BatchNorms convert left),
against the whole step. The target of the issue: the converted step saves at
least half of eager's BatchNorm + activation time. The residual add is not
counted as BatchNorm time although the fused op absorbs it, so the target is
slightly conservative.
"""
import argparse
import copy
import datetime
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import fusedbn
from fusedbn.bench.machine import cpuinfo, git_commit, machine_busy

WARMUP_STEPS = 2
PROFILE_STEPS = 2
# Profiler event names (substrings) of eager BatchNorm and activation work:
# aten::batch_norm, _batch_norm_impl_index, native_batch_norm(_backward),
# _native_batch_norm_legit*, the NativeBatchNormBackward0 autograd node; relu,
# relu_, clamp_min(_) (relu's kernel in some versions), threshold_backward,
# ReluBackward0.
EAGER_BN_ACT = ("batch_norm", "BatchNormBackward", "aten::relu", "clamp_min",
                "threshold_backward", "ReluBackward")
# The converted model's: the fusedbn::* operators and their autograd nodes,
# plus whatever BatchNorm / activation convert left in eager form.
FUSED_BN_ACT = ("fusedbn",) + EAGER_BN_ACT


# ------------------------------------------------------------ the network
class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on conv2)."""

    expansion = 4

    def __init__(self, cin, width, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    # No default arguments: convert leaves such forwards unrewritten.
    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            cout = width * Bottleneck.expansion
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                 nn.BatchNorm2d(cout))
            stage = [Bottleneck(cin, width, stride, down)]
            stage += [Bottleneck(cout, width, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        # torchvision's initialization.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------ one step
class Runner:
    """A model, its optimizer, and the step it is timed on."""

    def __init__(self, model, args):
        self.model = model.eval() if args.eval else model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.eval = args.eval
        self.bf16 = args.dtype == "bfloat16"

    def step(self, x, y):
        if self.eval:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                 enabled=self.bf16):
                self.model(x)
            return
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()


def timed(runner, x, y, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def profiled(runner, x, y, names):
    """(ms per step spent in the ops matching ``names`` and in the ops they
    call, ms per step in all, {op name: self ms per step} of the matching ones)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILE_STEPS):
            # The step's own event takes the time outside any op (Python), so
            # the self times of all events add up to the steps' wall time.
            with record_function("model_step"):
                runner.step(x, y)

    def matches(event):
        return any(n in event.name for n in names)

    # Self times, so that nothing is counted twice: an op's own and that of
    # every op below a matching one (the allocations of native_batch_norm, ...).
    total = inside = 0.0
    by_name = {}
    for event in prof.events():
        total += event.self_cpu_time_total
        e = event
        while e is not None and not matches(e):
            e = e.cpu_parent
        if e is not None:
            inside += event.self_cpu_time_total
            if matches(event):
                by_name[event.name] = by_name.get(event.name, 0.0) + event.self_cpu_time_total
    per_step = 1e-3 / PROFILE_STEPS  # profiler microseconds -> ms per step
    return (inside * per_step, total * per_step,
            {k: v * per_step for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])})


# ------------------------------------------------------------ the report
def isa_line():
    """fusedbn's CPU kernel copy in use, with what may have capped it."""
    _, flags = cpuinfo()
    have = " ".join(f for f in ("avx512f", "avx2") if f in flags) or "neither avx512f nor avx2"
    return (f"{fusedbn.cpu_isa()} (FUSEDBN_CPU_ISA={os.environ.get('FUSEDBN_CPU_ISA', 'unset')}; "
            f"CPU flags: {have})")


def table(args, isa, eager_ms, fused_ms, bn_ms, bn_share, met):
    cols = ["date", "torch", "threads", "fusedbn ISA", "dtype", "layout", "mode",
            "batch x size", "eager ms", "fused ms", "speedup", "eager BN+act ms (share)",
            "target"]
    row = [datetime.date.today().isoformat(), torch.__version__, str(torch.get_num_threads()),
           isa, args.dtype, "channels_last" if args.channels_last else "contiguous",
           "eval" if args.eval else "train", f"{args.batch} x {args.size}x{args.size}",
           f"{eager_ms:.1f}", f"{fused_ms:.1f}", f"{eager_ms / fused_ms:.3f}",
           f"{bn_ms:.1f} ({100 * bn_share:.0f}%)", "met" if met else "missed"]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            "| " + " | ".join(row) + " |"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="image side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: the forward under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--eval", action="store_true",
                        help="time an inference forward (no_grad, eval mode) instead")
    parser.add_argument("--md", metavar="PATH", help="append the markdown report to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    command = "python benchmarks/model_step.py " + " ".join(shlex.quote(a) for a in
                                                              (argv if argv is not None
                                                               else sys.argv[1:]))
    cap = os.environ.get("FUSEDBN_CPU_ISA")
    model_name, _ = cpuinfo()
    isa = fusedbn.cpu_isa()
    head = [f"## fusedbn.convert'ed ResNet-50 step vs eager ({'eval' if args.eval else 'train'})",
            "",
            f"- command: `{'FUSEDBN_CPU_ISA=' + cap + ' ' if cap else ''}{command.rstrip()}`",
            f"- commit: {git_commit()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S UTC}",
            f"- CPU: {model_name}; {os.cpu_count()} logical cores; "
            f"load average at start {os.getloadavg()[0]:.2f}",
            f"- torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"fusedbn {fusedbn.__version__}, CPU ISA: {isa_line()}"]
    print("\n".join(head), flush=True)

    torch.manual_seed(0)
    eager = ResNet50()
    fused, report = fusedbn.convert(copy.deepcopy(eager), report=True)
    left = "".join(f"; {name}: {reason}" for name, reason in report.left[:2])
    print(f"- convert: {report.fused} of {report.total} BatchNorms fused, "
          f"{len(report.left)} left{left}{'; ...' if len(report.left) > 2 else ''}")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch,))
    runners = {name: Runner(m.to(memory_format=memory_format), args)
               for name, m in (("eager", eager), ("fused", fused))}

    for r in runners.values():
        timed(r, x, y, WARMUP_STEPS)
    times = {"eager": [], "fused": []}
    for i in range(args.rounds):
        order = ["eager", "fused"] if i % 2 == 0 else ["fused", "eager"]
        for name in order:
            times[name] += timed(runners[name], x, y, args.steps)
    eager_ms = 1e3 * statistics.median(times["eager"])
    fused_ms = 1e3 * statistics.median(times["fused"])

    bn_ms, eager_total_ms, eager_ops = profiled(runners["eager"], x, y, EAGER_BN_ACT)
    fbn_ms, fused_total_ms, fused_ops = profiled(runners["fused"], x, y, FUSED_BN_ACT)
    share = bn_ms / eager_total_ms
    saved = eager_ms - fused_ms
    met = saved >= 0.5 * bn_ms

    def spread(t):
        return f"{1e3 * min(t):.1f}..{1e3 * max(t):.1f}"

    lines = [
        f"- step (median of {len(times['eager'])}): eager {eager_ms:.2f} ms "
        f"({spread(times['eager'])}), fused {fused_ms:.2f} ms ({spread(times['fused'])}); "
        f"speedup {eager_ms / fused_ms:.3f}",
        f"- profiled ({PROFILE_STEPS} steps each, ms per step, under the profiler): eager "
        f"BatchNorm+activation {bn_ms:.2f} of {eager_total_ms:.2f} ({100 * share:.1f}%); "
        f"fused BatchNorm+activation {fbn_ms:.2f} of {fused_total_ms:.2f}",
        "- eager ops (self ms per step): "
        + ", ".join(f"{k} {v:.2f}" for k, v in list(eager_ops.items())[:8]),
        "- fused ops (self ms per step): "
        + ", ".join(f"{k} {v:.2f}" for k, v in list(fused_ops.items())[:8]),
        f"- target: saved {saved:.2f} ms >= half of eager BatchNorm+activation "
        f"{0.5 * bn_ms:.2f} ms: {'met' if met else 'missed'}",
    ]
    # Another process on the same cores makes every parallel region wait for
    # a time slice: measured 20-45 ms per tiny BatchNorm instead of ~0.05.
    busy = machine_busy(torch.get_num_threads())
    lines += [f"- note: {busy}"] if busy else []
    lines += [""] + table(args, isa, eager_ms, fused_ms, bn_ms, share, met)
    print("\n".join(lines))
    if args.md:
        with open(args.md, "a", encoding="utf-8") as f:
            f.write("\n".join(head + lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
