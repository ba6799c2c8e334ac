"""Per-call cost of one layer through torch: BatchNorm2d + ReLU, eager
against fusedbn.BatchNormReLU2d, in the three modes (forward-train,
forward+backward, eval under no_grad). Small shapes (2x16x1x1) show the
fixed cost of a call: Python, dispatch, autograd, allocation.

Each case keeps the best of 25 timeit repeats (the fixed cost is a floor;
this host's noise only adds). To compare two builds, run this script
alternately from each (PYTHONPATH pointing at each build's package), several
times, appending to one CSV, then summarize:

    for r in 1 2 3; do
      PYTHONPATH=/tmp/old python benchmarks/layer_calls.py --tag old >> calls.csv
      PYTHONPATH=. python benchmarks/layer_calls.py --tag new >> calls.csv
    done
    python benchmarks/layer_calls.py --summary calls.csv   # best of each, markdown
"""
import argparse
import collections
import timeit

import torch

MODES = ("forward-train", "forward+backward", "eval")


def run(tag, shapes, threads):
    import fusedbn

    torch.set_num_threads(threads)
    for shape_s in shapes.split(","):
        shape = tuple(int(v) for v in shape_s.split("x"))
        number = 200 if shape[0] * shape[1] < 1000 else 20
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(*shape, dtype=dt)
            C = shape[1]
            mods = {"eager": torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.ReLU()).to(dt),
                    "fused": fusedbn.BatchNormReLU2d(C).to(dt)}
            xg = x.clone().requires_grad_()
            g = torch.randn_like(x)

            def best_us(stmt, **glob):
                times = timeit.repeat(stmt, globals=glob, number=number, repeat=25)
                return min(times) / number * 1e6

            for name, mod in mods.items():
                mod.train()
                tr = best_us("m(x)", m=mod, x=x)
                fb = best_us("m(x).backward(g)", m=mod, x=xg, g=g)
                mod.eval()
                with torch.no_grad():
                    ev = best_us("m(x)", m=mod, x=x)
                print(f"{tag},{shape_s},{str(dt)[6:]},{name},{tr:.1f},{fb:.1f},{ev:.1f}", flush=True)


def summary(path):
    best = collections.defaultdict(list)
    tags = []
    for line in open(path):
        tag, shape, dt, name, *times = line.strip().split(",")
        best[tag, shape, dt, name].append([float(t) for t in times])
        if tag not in tags:
            tags.append(tag)
    if len(tags) != 2:
        raise SystemExit(f"expected two tags (old, new) in {path}, got {tags}")
    old, new = tags
    shapes = sorted({k[1] for k in best}, key=lambda s: [int(v) for v in s.split("x")])
    print(f"| shape | dtype | mode | eager ({old} run) us | fusedbn {old} us | eager ({new} run) us "
          f"| fusedbn {new} us | fusedbn {old}/{new} | vs eager, {old} | vs eager, {new} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for dt in ("float32", "bfloat16"):
            for i, mode in enumerate(MODES):
                v = {(t, n): min(r[i] for r in best[t, shape, dt, n])
                     for t in (old, new) for n in ("eager", "fused")}
                print(f"| {shape} | {dt} | {mode} | {v[old, 'eager']:.1f} | {v[old, 'fused']:.1f} "
                      f"| {v[new, 'eager']:.1f} | {v[new, 'fused']:.1f} "
                      f"| {v[old, 'fused'] / v[new, 'fused']:.2f}x "
                      f"| {v[old, 'eager'] / v[old, 'fused']:.2f}x "
                      f"| {v[new, 'eager'] / v[new, 'fused']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="run", help="the build's label in the CSV lines")
    ap.add_argument("--shapes", default="2x16x1x1,8x512x7x7,32x64x56x56")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summary", metavar="CSV", help="summarize a CSV of two tags instead")
    a = ap.parse_args()
    if a.summary:
        summary(a.summary)
    else:
        run(a.tag, a.shapes, a.threads)


if __name__ == "__main__":
    main()
