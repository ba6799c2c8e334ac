"""The benchmark proper: every case checked against eager, then timed."""
import gc
import itertools
import math
import time

import torch

from .check import check_results
from .common import OTHERS, dtype_name, log, shape_str
from .contenders import (build_contenders, make_timed_fn, pool_for, reference_state,
                          run_case_once, set_mode)
from .passes import PASSES, pass_bytes
from .report import fmt_ms
from .timing import measure, summarize


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

