"""Autograd-saved memory of a conv -> BN -> activation stack: eager PyTorch,
fusedbn, and fusedbn with inplace=True (issue: in-place activated BatchNorm).

    python benchmarks/inplace_memory.py [--blocks 6] [--shape 8x32x28x28]

Counts what autograd keeps for the backward with saved_tensors_hooks (unique
storages, and how many of them are full-size activations), which does not
depend on machine load, then times one training step of each (median of
interleaved rounds; ratios only, the machine may be shared).
"""
import argparse
import datetime
import platform
import statistics
import subprocess
import time

import torch
import torch.nn as nn

import fusedbn


def stack(kind, blocks, channels):
    layers = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if kind == "eager":
            layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.01)]
        else:
            # Identity keeps the indices, and so the state_dict keys, of eager's stack.
            layers += [fusedbn.BatchNormAct2d(channels, activation="leaky_relu",
                                              inplace=(kind == "fusedbn-inplace")), nn.Identity()]
    return nn.Sequential(*layers)


def saved(model, x):
    storages, full = {}, 0
    numel = x.numel()

    def pack(t):
        nonlocal full
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            storages[key] = t.untyped_storage().nbytes()
            if t.numel() == numel:
                full += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values()), full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--shape", default="8x32x28x28")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, c, h, w = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    kinds = ["eager", "fusedbn", "fusedbn-inplace"]
    models = {k: stack(k, args.blocks, c) for k in kinds}
    for k in kinds[1:]:
        models[k].load_state_dict(models["eager"].state_dict())
    x = torch.randn(n, c, h, w)
    outs, rows = {}, {}
    for k in kinds:
        out, nbytes, full = saved(models[k], x)
        outs[k] = out
        rows[k] = (nbytes, full)
    for k in kinds[1:]:
        torch.testing.assert_close(outs[k], outs["eager"], atol=1e-4, rtol=1e-4)

    def step(k):
        models[k].zero_grad(set_to_none=True)
        models[k](x).sum().backward()

    times = {k: [] for k in kinds}
    for k in kinds:
        step(k)
    for _ in range(args.rounds):
        for k in kinds:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    act_bytes = x.numel() * x.element_size()
    print(f"command: python benchmarks/inplace_memory.py --blocks {args.blocks} --shape {args.shape}")
    print(f"commit: {commit}; date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.blocks} blocks of conv3x3 -> BN -> LeakyReLU on {args.shape} float32 "
          f"(one activation = {act_bytes / 2**20:.2f} MiB)\n")
    print("| variant | autograd-saved MiB | full-size tensors saved | per block | step time vs eager |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["eager"])
    for k in kinds:
        nbytes, full = rows[k]
        print(f"| {k} | {nbytes / 2**20:.2f} | {full} | {full / args.blocks:.1f} | "
              f"{statistics.median(times[k]) / base:.2f}x |")


if __name__ == "__main__":
    main()
