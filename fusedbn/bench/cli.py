"""The command line of ``python -m fusedbn.bench``."""
import argparse
import json
import os
import sys
import time

import torch

import fusedbn

from .check import self_check
from .common import ALL_MODES, DEFAULT_MODES, DTYPE_NAMES, LAYOUTS, SHAPE_PRESETS, log
from .contenders import inplace_abn_module
from .machine import cache_bytes, header, load_average, machine_busy
from .memory import memory_report
from .passes import PASSES
from .report import summary, table, write_csv, write_plot
from .run import run_benchmark


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

