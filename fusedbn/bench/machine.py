"""The machine a ``fusedbn.bench`` run describes in its header (and notes)."""
import datetime
import os
import platform
import re
import shlex
import subprocess

import torch

import fusedbn


def git_commit():
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

