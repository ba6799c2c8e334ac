"""Forward-train, forward+backward and eval of single layers through torch,
with and without a residual: fusedbn.batch_norm_act (relu), best of 7x20
calls. The forward and eval run under no_grad; forward+backward clones x
(and z) as leaves requiring grad. Compare two builds by running it
alternately from each:

    PYTHONPATH=/tmp/old python benchmarks/short_layers.py old >> layers.csv
    PYTHONPATH=. python benchmarks/short_layers.py new >> layers.csv

    --shapes 2x2048x2x2,8x512x4x4   other layers (default: late ResNet layers)
    --dtypes float32,bfloat16       (default float32)
    --no-residual                   only the layers without one

CSV lines: tag, shape, dtype, res=0|1, fwd+bwd, us, fwd, us, eval, us.
"""
import argparse
import timeit

import torch

import fusedbn

ap = argparse.ArgumentParser()
ap.add_argument("tag", nargs="?", default="run")
ap.add_argument("--shapes", default="8x1024x7x7,8x256x7x7,8x2048x4x4,8x512x4x4,8x512x14x14")
ap.add_argument("--dtypes", default="float32")
ap.add_argument("--no-residual", action="store_true")
args = ap.parse_args()
torch.set_num_threads(2)


def best_us(f):
    f()
    return min(timeit.repeat(f, number=20, repeat=7)) / 20 * 1e6


for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
    C = shape[1]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for res in (False,) if args.no_residual else (False, True):
            x0 = torch.randn(shape, dtype=dtype)
            z0 = torch.randn(shape, dtype=dtype) if res else None
            w = torch.ones(C, requires_grad=True)
            b = torch.zeros(C, requires_grad=True)
            rm, rv = torch.zeros(C), torch.ones(C)
            g = torch.randn(shape, dtype=dtype)

            def step():
                x = x0.clone().requires_grad_(True)
                z = z0.clone().requires_grad_(True) if res else None
                fusedbn.batch_norm_act(x, rm, rv, w, b, True, residual=z).backward(g)

            def run(training):
                def f():
                    with torch.no_grad():
                        fusedbn.batch_norm_act(x0, rm, rv, w, b, training, residual=z0)
                return f

            tb, tf, te = best_us(step), best_us(run(True)), best_us(run(False))
            print(f"{args.tag},{'x'.join(map(str, shape))},{dtype_name},res={int(res)},"
                  f"fwd+bwd,{tb:.1f},fwd,{tf:.1f},eval,{te:.1f}", flush=True)
