"""Memory report of ``fusedbn.bench``: one training step of a small ResNet-like
stack (conv3x3 -> BN -> ReLU blocks), fusedbn vs eager -- tensors autograd
saves and peak memory.

On CPU the peak is the peak RSS of a child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (malloc reads it at start, so every tensor is
mmapped and freed memory leaves the RSS): ``python -c`` calling
:func:`child_main` of this module with the case as JSON.
"""
import gc
import json
import os
import re
import subprocess
import sys

import torch
import torch.nn as nn

import fusedbn

from .common import DTYPE_NAMES, LAYOUTS, dtype_name, make_grad, make_input


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


def child_main(spec):
    """The peak-RSS child: both variants of the case ``spec`` (JSON), printed
    as a ``MEMORY-JSON`` line."""
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
                    [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
                    + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
                try:
                    # (fusedbn imports torch first: the extension needs torch's libraries.)
                    child = "import sys; from fusedbn.bench.memory import child_main; " \
                            "child_main(sys.argv[1])"
                    p = subprocess.run([sys.executable, "-c", child, spec],
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

