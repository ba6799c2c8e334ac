"""The benchmark's tables (markdown), CSV and plot."""
import math

from .common import CONTENDERS, OTHERS, shape_str


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

