"""Issue 16's CPU targets, met or missed, read off a `python -m fusedbn.bench --csv` file.

    python benchmarks/targets.py RESULTS.csv [RERUN.csv ...] [--md] [--table]

A case in a later CSV replaces the same case of an earlier one (a re-run of
cases the host disturbed). Prints one line per target: the range of the
ratios it covers, the cases below it, and how many cases meet it. The
targets (the issue's text):
- bfloat16 at the large shapes (32x64x56x56, 64x256x14x14): forward+backward
  and forward-train >= 2x eager, eval >= 1.5x;
- float32 at the large shapes: forward-train and forward+backward >= 2x in
  both layouts; every mode >= 1.2x at 8x512x7x7;
- never slower than eager; eval faster than torch.compile.
--table prints instead the README's speedup table (a row per shape and
layout, a column per dtype and mode, each cell relu / leaky_relu) and the
geometric means per dtype and mode.
The bench's ratios are medians of interleaved rounds, so a case within a few
per cent of a bound is within this host's noise either way: the table says
where each case fell, not that the difference is real.
"""
import argparse
import csv
import math

LARGE = ("32x64x56x56", "64x256x14x14")


def targets():
    """(label, predicate on a row, column, bound) for each target."""
    big = lambda r: r["shape"] in LARGE  # noqa: E731
    t = []
    for mode, bound in (("forward+backward", 2.0), ("forward-train", 2.0), ("eval", 1.5)):
        t.append((f"bfloat16 {mode} >= {bound:g}x eager (large shapes)",
                  lambda r, m=mode: big(r) and r["dtype"] == "bfloat16" and r["mode"] == m,
                  "speedup_vs_eager", bound))
    for mode in ("forward-train", "forward+backward"):
        for layout in ("contiguous", "channels_last"):
            t.append((f"float32 {mode} >= 2x eager, {layout} (large shapes)",
                      lambda r, m=mode, lo=layout: (big(r) and r["dtype"] == "float32"
                                                    and r["mode"] == m and r["layout"] == lo),
                      "speedup_vs_eager", 2.0))
    t.append(("float32 >= 1.2x eager at 8x512x7x7 (all modes)",
              lambda r: r["shape"] == "8x512x7x7" and r["dtype"] == "float32",
              "speedup_vs_eager", 1.2))
    t.append(("never slower than eager (every case)", lambda r: True, "speedup_vs_eager", 1.0))
    t.append(("eval faster than torch.compile", lambda r: r["mode"] == "eval",
              "speedup_vs_compile", 1.0))
    return t


def case(r):
    return f"{r['shape']} {r['layout']} {r['dtype']} {r['activation']} {r['mode']}"


def speedup_table(rows):
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    modes = ("forward-train", "forward+backward", "eval")
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    at = {(r["shape"], r["layout"], r["dtype"], r["mode"], r["activation"]):
          float(r["speedup_vs_eager"]) for r in rows if r.get("speedup_vs_eager")}
    cols = [(d, m) for d in dtypes for m in modes]
    print("| shape, layout | " + " | ".join(f"{d} {m}" for d, m in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for shape, layout in dict.fromkeys((r["shape"], r["layout"]) for r in rows):
        cells = [" / ".join(f"{at[(shape, layout, d, m, a)]:.2f}" if (shape, layout, d, m, a) in at
                            else "-" for a in acts) for d, m in cols]
        print(f"| {shape}, {layout} | " + " | ".join(cells) + " |")
    print()
    print("| | " + " | ".join(modes) + " |")
    print("|---" * (len(modes) + 1) + "|")
    for d in dtypes:
        means = []
        for m in modes:
            v = [x for (_, _, dd, mm, _), x in at.items() if dd == d and mm == m]
            means.append(f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x" if v else "-")
        print(f"| {d} | " + " | ".join(means) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--md", action="store_true", help="a markdown table")
    p.add_argument("--table", action="store_true", help="the README's speedup table instead")
    args = p.parse_args()
    cases = {}
    for path in args.csv:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["device"] == "cpu":
                    cases[case(r)] = r
    rows = list(cases.values())
    if args.table:
        return speedup_table(rows)
    if args.md:
        print("| target | result | met? |")
        print("|---|---|---|")
    for label, pred, col, bound in targets():
        vals = [(float(r[col]), case(r)) for r in rows if pred(r) and r.get(col)]
        if not vals:
            continue
        below = sorted((v, c) for v, c in vals if v < bound)
        lo, hi = min(v for v, _ in vals), max(v for v, _ in vals)
        met = "yes" if not below else ("no" if len(below) == len(vals)
                                       else f"{len(vals) - len(below)} of {len(vals)}")
        detail = f"{lo:.2f}-{hi:.2f}x"
        if below and len(below) < len(vals):
            detail += " (below: " + "; ".join(f"{c} {v:.2f}x" for v, c in below) + ")"
        if args.md:
            print(f"| {label} | {detail} | {met} |")
        else:
            print(f"{label}: {detail}: {met}")


if __name__ == "__main__":
    main()
