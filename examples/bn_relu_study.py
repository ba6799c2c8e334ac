"""BN -> ReLU study: dead units and fusedbn vs eager PyTorch on a real data set.

    pip install --no-build-isolation -e ".[study]"   # or: pip install scikit-learn matplotlib
    python examples/bn_relu_study.py [--epochs 15] [--seeds 3] [--out examples/results]

About 2 minutes on 2 idle CPU cores (much longer when they are shared: the
OpenMP threads of every op wait for each other).

Trains a small CNN on scikit-learn's bundled 8x8 digits (1797 images; ships
inside the package, so nothing is downloaded) in five settings:

    bn_relu       BN -> ReLU                     (the usual placement)
    relu_bn       ReLU -> BN                     (order="act_bn")
    bn_leaky      BN -> LeakyReLU(0.01)
    bn_elu        BN -> ELU(1.0)
    bn_relu_b001  BN -> ReLU, beta initialised to 0.01 (bias_init=0.01)

under three optimizer regimes fixed in advance (not tuned on the results):
a conventional SGD one; Adam at lr 0.01 with L2 weight decay, the combination
reported to switch off whole BN->ReLU filters (Mehta et al., "On implicit
filter level sparsity in CNNs", CVPR 2019); and the same at lr 0.1 as a
stress test. Every setting starts from the same conv/linear weights and sees
the same batches; the stress regime, where units do die, is repeated with
further seeds (other initial weights and batch orders), because one run of a
small network is a noisy basis for comparing settings.

Dead units come from fusedbn's in-kernel activity counters
(track_activity=True): a channel counts as dead in an epoch when none of its
activation inputs was positive in any training step of that epoch.

Separately, an eager nn.BatchNorm2d + nn.ReLU copy of the BN -> ReLU model
(same initial state_dict) is trained step by step next to a fusedbn one on the
same batches, to compare loss curves, step time and autograd-saved memory; the
pair is trained once more in float64, where any difference in the math would
stand far above rounding.

Writes <out>/bn_relu_study.png and <out>/bn_relu_study.md.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import fusedbn
except ImportError:
    # Not installed: use the checkout this file lies in (after
    # `python setup.py build_ext --inplace`), as the benchmarks allow.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fusedbn

try:
    import matplotlib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError:  # optional dependency: say how to get it instead of a traceback
    sys.exit("this example needs scikit-learn and matplotlib: "
             "pip install scikit-learn matplotlib (or the package's [study] extra)")

SETTINGS = {
    # name: (label, BatchNormAct2d keyword arguments)
    "bn_relu": ("BN→ReLU", dict(activation="relu")),
    "relu_bn": ("ReLU→BN", dict(activation="relu", order="act_bn")),
    "bn_leaky": ("BN→LeakyReLU", dict(activation="leaky_relu", negative_slope=0.01)),
    "bn_elu": ("BN→ELU", dict(activation="elu", alpha=1.0)),
    "bn_relu_b001": ("BN→ReLU, β₀=0.01", dict(activation="relu", bias_init=0.01)),
}

REGIMES = {
    # name: (label, optimizer factory)
    "sgd": ("SGD lr 0.05, momentum 0.9, wd 5e-4",
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adam": ("Adam lr 0.01, L2 wd 5e-4",
             lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=5e-4)),
    "adam_hi": ("Adam lr 0.1, L2 wd 5e-4",
                lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=5e-4)),
}
NEAR_DEAD = 0.01  # "nearly dead": active in under 1% of the epoch's values

LAYERS = ("block1", "block2", "block3")
BATCH = 64


class Net(nn.Module):
    """conv(1->32) BN-act, conv(32->64) BN-act, 2x2 pool, conv(64->64) BN-act,
    global average pool, linear(64->10). ``kind`` is a SETTINGS name (fusedbn)
    or "eager" (nn.BatchNorm2d + nn.ReLU, the BN->ReLU reference)."""

    def __init__(self, kind, track=False):
        super().__init__()

        def block(cin, cout):
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            if kind == "eager":
                return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            # nn.Identity in the activation's slot keeps the state_dict keys
            # equal to the eager model's, so one state_dict initialises both.
            bn = fusedbn.BatchNormAct2d(cout, track_activity=track, **SETTINGS[kind][1])
            return nn.Sequential(conv, bn, nn.Identity())

        self.block1 = block(1, 32)
        self.block2 = block(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.block3 = block(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(self.block2(self.block1(x)))
        x = self.block3(x)
        return self.fc(x.mean((2, 3)))

    def bns(self):
        return [getattr(self, name)[1] for name in LAYERS]


def load_data(seed):
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), pixel values 0..16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=seed,
                                          stratify=d.target)
    # Standardise with training-set statistics only.
    mean, std = xtr.mean(), xtr.std()

    def norm(a):
        return torch.from_numpy((a - mean) / std)

    return norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte)


def batch_order(n, epochs, seed):
    """The same list of index batches for every run (drop_last keeps every
    step's batch size, and so each step's cost, equal)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        order.append([perm[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)])
    return order


def initial_state(seed):
    """Conv/linear weights shared by every run: the settings differ only in the
    BN layer (and bias_init, which reset_parameters applies to beta)."""
    torch.manual_seed(seed)
    return Net("eager").state_dict()


def build(kind, init, track=False):
    model = Net(kind, track=track)
    state = dict(init)
    if kind in SETTINGS and SETTINGS[kind][1].get("bias_init"):
        for name in LAYERS:  # keep beta_0 = bias_init rather than the shared zeros
            state.pop(f"{name}.1.bias")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == set(init) - set(state), (missing, unexpected)
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    # Eval forwards would also update the activity counters; keep them to training steps.
    tracking = any(getattr(bn, "track_activity", False) for bn in model.bns())
    fusedbn.diagnostics.track(model, enabled=False)
    acc = (model(x).argmax(1) == y).float().mean().item()
    fusedbn.diagnostics.track(model, enabled=tracking)
    model.train()
    return acc


def train_setting(kind, regime, data, order, init):
    """One fusedbn setting with activity counting; per-epoch records."""
    xtr, ytr, xte, yte = data
    model = build(kind, init, track=True)
    opt = REGIMES[regime][1](model.parameters())
    rec = dict(loss=[], acc=[], dead=[], dead_layer=[], active_layer=[],
               near_dead=[], min_active=[], check_mismatch=0)
    for epoch_batches in order:
        steps = len(epoch_batches)
        active_sum = [torch.zeros(bn.num_features) for bn in model.bns()]
        losses = []
        for idx in epoch_batches:
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            for s, bn in zip(active_sum, model.bns()):
                s += bn.active_fraction
        # Dead = no positive activation input in any step of the epoch. The
        # library's report (inactive_steps >= steps) and our own per-step sum
        # must agree; a mismatch would mean the counters are inconsistent.
        rows = fusedbn.diagnostics.report(model, steps=steps)
        dead = [r.dead_channels for r in rows]
        mine = [int((s == 0).sum()) for s in active_sum]
        rec["check_mismatch"] += sum(abs(a - b) for a, b in zip(dead, mine))
        rec["loss"].append(statistics.fmean(losses))
        rec["acc"].append(accuracy(model, xte, yte))
        rec["dead_layer"].append(dead)
        rec["dead"].append(sum(dead) / sum(bn.num_features for bn in model.bns()))
        rec["active_layer"].append([(s / steps).mean().item() for s in active_sum])
        per_channel = torch.cat(active_sum) / steps
        rec["near_dead"].append((per_channel < NEAR_DEAD).float().mean().item())
        rec["min_active"].append(per_channel.min().item())
    rec["report"] = str(fusedbn.diagnostics.report(model, steps=len(order[-1])))
    rec["counter_check"] = check_counters(model, xtr[order[-1][0]])
    return rec


@torch.no_grad()
def check_counters(model, x):
    """Recompute the kernel's active fraction in plain PyTorch for one eval
    batch: max |kernel - reference| over channels, per layer."""
    model.eval()
    inputs = {}
    hooks = [bn.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, bn in zip(LAYERS, model.bns())]
    model(x)
    for h in hooks:
        h.remove()
    model.train()
    worst = []
    for name, bn in zip(LAYERS, model.bns()):
        z = inputs[name]
        if bn.order == "bn_act":  # activation input = BN output (running statistics in eval)
            shape = (1, -1, 1, 1)
            z = ((z - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt()
                 * bn.weight.view(shape) + bn.bias.view(shape))
        ref = (z > 0).float().mean((0, 2, 3))
        worst.append((bn.active_fraction - ref).abs().max().item())
    return worst


def saved_bytes(model, x, y):
    """Bytes autograd keeps for the backward of one training step (unique
    storages seen by saved_tensors_hooks). This is the activation memory that
    fusion changes; it excludes parameters, gradients, optimizer state and the
    allocator's transient peaks, which a CPU run cannot attribute reliably."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


def train_pair(regime, data, order, init, dtype=torch.float32):
    """Eager BN->ReLU and fusedbn BN->ReLU (activity counting off, so both do
    the same work) from one state_dict, stepped alternately on the same
    batches so that machine load affects both alike. Returns the models,
    per-step losses and per-step times."""
    xtr, ytr = data[0].to(dtype), data[1]
    models = {"eager": build("eager", init).to(dtype),
              "fusedbn": build("bn_relu", init).to(dtype)}
    opts = {k: REGIMES[regime][1](m.parameters()) for k, m in models.items()}
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    for epoch_batches in order:
        for i, idx in enumerate(epoch_batches):
            # Alternate which goes first, so neither always runs on a warmer cache.
            for k in (("eager", "fusedbn") if i % 2 == 0 else ("fusedbn", "eager")):
                t0 = time.perf_counter()
                loss = F.cross_entropy(models[k](xtr[idx]), ytr[idx])
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                times[k].append(time.perf_counter() - t0)
                losses[k].append(loss.item())
    return models, {k: np.array(v) for k, v in losses.items()}, times


def compare_eager(regime, data, order, init):
    xtr, ytr, xte, yte = data
    models, losses, times = train_pair(regime, data, order, init)
    # float64 runs: eager float32 vs float64 is the rounding noise floor of
    # this training itself (a ReLU mask flip on a value within an ulp of 0
    # changes a gradient by a whole element, and training amplifies it);
    # eager vs fusedbn in float64 shows whether the math is the same.
    _, losses64, _ = train_pair(regime, data, order, init, torch.float64)
    diff = np.abs(losses["eager"] - losses["fusedbn"])
    first_epoch = len(order[0])
    x0, y0 = xtr[order[0][0]], ytr[order[0][0]]
    return dict(
        losses=losses, diff=diff, first_epoch=first_epoch,
        max_diff=float(diff.max()), max_diff_epoch1=float(diff[:first_epoch].max()),
        diff64=float(np.abs(losses64["eager"] - losses64["fusedbn"]).max()),
        drift_eager=np.abs(losses["eager"] - losses64["eager"]),
        drift_fused=np.abs(losses["fusedbn"] - losses64["eager"]),
        acc={k: accuracy(m, xte, yte) for k, m in models.items()},
        # Skip the first epoch (warm-up: allocator, OpenMP pool, first-call dispatch).
        step_ms={k: 1e3 * statistics.median(v[first_epoch:]) for k, v in times.items()},
        saved={k: saved_bytes(m, x0, y0) for k, m in models.items()},
    )


def first_above(diff, level=1e-5):
    """1-based step at which |loss difference| first exceeds level (None: never)."""
    hits = np.nonzero(diff > level)[0]
    return int(hits[0]) + 1 if len(hits) else None


def plot(results, cmp, regimes, epochs, path):
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    colors = dict(zip(SETTINGS, ("C0", "C1", "C2", "C3", "C4")))
    ep = np.arange(1, epochs + 1)
    fig, axes = plt.subplots(len(regimes) + 1, 4, figsize=(19, 4.0 * (len(regimes) + 1)),
                             squeeze=False)
    for row, regime in zip(axes, regimes):
        tag = REGIMES[regime][0]
        for kind, (label, _) in SETTINGS.items():
            r = results[regime][kind]
            row[0].plot(ep, r["loss"], color=colors[kind], label=label)
            row[1].plot(ep, 100 * np.array(r["acc"]), color=colors[kind], label=label)
            row[2].plot(ep, 100 * np.array(r["dead"]), color=colors[kind], marker=".",
                        label=f"{label}: dead")
            row[2].plot(ep, 100 * np.array(r["near_dead"]), color=colors[kind], ls=":",
                        label=f"{label}: <{NEAR_DEAD:.0%} active")
        row[0].set(title=f"{tag}\ntrain loss (epoch mean)", xlabel="epoch", yscale="log")
        low = min(min(results[regime][k]["acc"]) for k in SETTINGS)
        row[1].set(title=f"{tag}\ntest accuracy %", xlabel="epoch",
                   ylim=(min(50, 100 * low - 5), 100.5))
        row[2].set(title=f"{tag}\n% of 160 channels dead (—) / nearly dead (⋯) in the epoch",
                   xlabel="epoch", ylim=(-1, max(5, 105 * max(
                       max(results[regime][k]["near_dead"]) for k in SETTINGS))))
        row[0].legend(fontsize=8)
        # Last-epoch mean active fraction per layer, grouped by setting.
        w = 0.8 / len(LAYERS)
        for j, layer in enumerate(LAYERS):
            vals = [results[regime][k]["active_layer"][-1][j] for k in SETTINGS]
            row[3].bar(np.arange(len(SETTINGS)) + (j - 1) * w, vals, w, label=layer)
        row[3].axhline(0.5, color="gray", lw=0.5)
        row[3].set_xticks(np.arange(len(SETTINGS)), [v[0] for v in SETTINGS.values()],
                          rotation=15, fontsize=8)
        row[3].set(title=f"{tag}\nactive fraction per layer, last epoch", ylim=(0, 1))
        row[3].legend(fontsize=8)

    last = axes[-1]
    tag = REGIMES[cmp["regime"]][0]
    steps = np.arange(1, len(cmp["diff"]) + 1)
    last[0].plot(steps, cmp["losses"]["eager"], label="eager nn.BatchNorm2d + nn.ReLU", lw=2)
    last[0].plot(steps, cmp["losses"]["fusedbn"], label="fusedbn BatchNormAct2d", lw=1, ls="--")
    last[0].set(title=f"BN→ReLU eager vs fusedbn, {tag.split(',')[0]}\ntraining loss per step",
                xlabel="step", yscale="log")
    last[0].legend(fontsize=8)
    floor = 1e-9  # log axis: show exact agreement at the bottom
    last[1].semilogy(steps, np.maximum(cmp["diff"], floor), label="eager32 vs fusedbn32")
    last[1].semilogy(steps, np.maximum(cmp["drift_eager"], floor), label="eager32 vs eager64",
                     alpha=0.7)
    last[1].semilogy(steps, np.maximum(cmp["drift_fused"], floor), label="fusedbn32 vs eager64",
                     alpha=0.7)
    last[1].set(title=f"|Δ loss| per step (float64 eager vs fusedbn: max {cmp['diff64']:.0e})",
                xlabel="step")
    last[1].legend(fontsize=8)
    last[2].bar(["eager", "fusedbn"], [cmp["step_ms"]["eager"], cmp["step_ms"]["fusedbn"]])
    last[2].set(title="median training step time (ms), interleaved", ylabel="ms")
    last[3].bar(["eager", "fusedbn"], [cmp["saved"]["eager"] / 2**20,
                                       cmp["saved"]["fusedbn"] / 2**20])
    last[3].set(title=f"autograd-saved MiB, one step (batch {BATCH})", ylabel="MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def markdown(args, results, repeats, cmp, regimes, runtime, load):
    L = []
    add = L.append
    add("# BN→ReLU study (fusedbn)\n")
    add(f"Command: `{' '.join(['python', 'examples/bn_relu_study.py'] + sys.argv[1:])}`  ")
    add(f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ")
    add(f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}  ")
    add(f"Runtime: {runtime:.0f} s (1-min load average {load[0]:.1f} at start, "
        f"{load[1]:.1f} at end)\n")
    add(f"Data: scikit-learn digits, 8x8, {args.n_train} train / {args.n_test} test "
        f"(stratified split, seed {args.seed}); batch {BATCH}, {args.epochs} epochs × "
        f"{args.steps} steps. Model: conv(1→32)-BN-act, conv(32→64)-BN-act, maxpool, "
        f"conv(64→64)-BN-act, global average pool, linear; 160 BN channels in all. Every run "
        f"starts from the same conv/linear weights and sees the same batches.\n")
    add("A channel is *dead* in an epoch when the fused kernel counted no positive "
        "activation input for it in any training step of that epoch "
        "(`fusedbn.diagnostics.report(model, steps=steps_per_epoch)`); *nearly dead* when "
        f"under {NEAR_DEAD:.0%} of its activation inputs in the epoch were positive. For "
        "ReLU→BN the activation input is the conv output; for LeakyReLU/ELU \"dead\" would "
        "mean stuck in the negative branch (which still passes gradient). Active fraction = "
        "fraction of positive activation inputs, averaged over the epoch's steps (and over "
        "the layer's channels in the per-layer columns).\n")
    for regime in regimes:
        add(f"## {REGIMES[regime][0]}\n")
        add("| setting | final train loss | final test acc | best test acc | dead (final) "
            "| dead, max over epochs | nearly dead, max over epochs | least active channel "
            "(final) | active fraction per layer (final) |")
        add("|---|---|---|---|---|---|---|---|---|")
        for kind, (label, _) in SETTINGS.items():
            r = results[regime][kind]
            add(f"| {label} | {r['loss'][-1]:.4f} | {100 * r['acc'][-1]:.1f}% | "
                f"{100 * max(r['acc']):.1f}% | {100 * r['dead'][-1]:.1f}% | "
                f"{100 * max(r['dead']):.1f}% | {100 * max(r['near_dead']):.1f}% | "
                f"{r['min_active'][-1]:.3f} | "
                f"{' / '.join(f'{a:.2f}' for a in r['active_layer'][-1])} |")
        add("")
        add("Dead-unit % per epoch:\n")
        add("| setting | " + " | ".join(str(e + 1) for e in range(args.epochs)) + " |")
        add("|---|" + "---|" * args.epochs)
        for kind, (label, _) in SETTINGS.items():
            add(f"| {label} | " + " | ".join(f"{100 * d:.1f}" for d in
                                            results[regime][kind]["dead"]) + " |")
        add("")
    if repeats:
        n = len(next(iter(repeats.values())))
        add(f"## {REGIMES['adam_hi'][0]}: {n} seeds\n")
        add("Seed 0 is the run above; seeds 1.. change the initial weights and the batch "
            "order (same data split). Per seed, final epoch.\n")
        add("| setting | dead units % | nearly dead % | test acc % | mean dead % | "
            "mean test acc % |")
        add("|---|---|---|---|---|---|")
        for kind, (label, _) in SETTINGS.items():
            rs = repeats[kind]
            dead = [100 * r["dead"][-1] for r in rs]
            near = [100 * r["near_dead"][-1] for r in rs]
            acc = [100 * r["acc"][-1] for r in rs]
            add(f"| {label} | {' / '.join(f'{v:.1f}' for v in dead)} | "
                f"{' / '.join(f'{v:.1f}' for v in near)} | "
                f"{' / '.join(f'{v:.1f}' for v in acc)} | {statistics.fmean(dead):.1f} | "
                f"{statistics.fmean(acc):.1f} |")
        add("")
    add(f"## Eager PyTorch vs fusedbn, BN→ReLU ({REGIMES[cmp['regime']][0]})\n")
    add("Eager = `nn.BatchNorm2d` + `nn.ReLU(inplace=True)`; fusedbn = `BatchNormAct2d` "
        "(activity counting off). Same initial state_dict, same batches, trained step by "
        "step alternately in one process; repeated in float64 (untimed).\n")
    add("| | eager | fusedbn |")
    add("|---|---|---|")
    add(f"| final train loss (last step) | {cmp['losses']['eager'][-1]:.5f} | "
        f"{cmp['losses']['fusedbn'][-1]:.5f} |")
    add(f"| test accuracy | {100 * cmp['acc']['eager']:.2f}% | "
        f"{100 * cmp['acc']['fusedbn']:.2f}% |")
    add(f"| median step time (fwd+bwd+optimizer, batch {BATCH}) | "
        f"{cmp['step_ms']['eager']:.2f} ms | {cmp['step_ms']['fusedbn']:.2f} ms |")
    add(f"| autograd-saved bytes, one step | {cmp['saved']['eager'] / 2**20:.2f} MiB | "
        f"{cmp['saved']['fusedbn'] / 2**20:.2f} MiB |")
    add(f"| float32 loss vs float64 eager: max over run | {cmp['drift_eager'].max():.1e} | "
        f"{cmp['drift_fused'].max():.1e} |")
    add(f"| float32 loss vs float64 eager: first step above 1e-5 | "
        f"{first_above(cmp['drift_eager'])} | {first_above(cmp['drift_fused'])} |")
    add("")
    ok = "within" if cmp["diff64"] <= args.tol else "NOT within"
    never = len(cmp["diff"]) + 1
    when = ("earlier" if (first_above(cmp["drift_fused"]) or never)
            < (first_above(cmp["drift_eager"]) or never) else "no earlier")
    add(f"- Loss curves, float64: max |Δloss| eager vs fusedbn over all {len(cmp['diff'])} "
        f"steps = {cmp['diff64']:.1e} ({ok} the tolerance {args.tol:g}).")
    add(f"- Loss curves, float32: max |Δloss| = {cmp['max_diff']:.1e} over the run, "
        f"{cmp['max_diff_epoch1']:.1e} in the first epoch; first step above 1e-5: "
        f"{first_above(cmp['diff'])}. float32 training is itself sensitive to rounding: a "
        "pre-activation within an ulp of 0 can land on either side of the ReLU, which moves "
        "a whole gradient element, and later steps amplify it. The eager float32 run drifts "
        f"from the float64 one too; in this run fusedbn's float32 curve leaves it {when} "
        "than eager's (table above).")
    add(f"- Step time: median over steps after the first epoch; eager/fusedbn = "
        f"{cmp['step_ms']['eager'] / cmp['step_ms']['fusedbn']:.2f}x for the whole training "
        "step (convolutions, pooling, loss and optimizer included, which fusion does not "
        "touch; the BN layers here are tiny). Shared 2-core VM: timings are noisy; the "
        "interleaving makes the ratio fairer than the absolute values.")
    add("- Memory: bytes autograd saves for the backward (unique storages via "
        "`saved_tensors_hooks`), i.e. activation memory; not a process peak (a CPU run has "
        "no allocator peak counter like `torch.cuda.max_memory_allocated`). fusedbn keeps "
        "the BN input and not the activation output, but here the output of blocks 1 and 2 "
        "is kept anyway by the conv / max-pool that consumes it, so only block 3's output "
        "(consumed by the average pool, which keeps nothing) is saved.")
    add("")
    add("## Library checks\n")
    add("Per run: (a) channels counted dead by `diagnostics.report` (inactive_steps) vs by "
        "summing `active_fraction` over the epoch's steps — mismatches summed over epochs "
        "and layers; (b) kernel `active_fraction` vs a plain-PyTorch recomputation on one "
        "eval batch, max |Δ| per layer.\n")
    add("| regime | setting | (a) mismatches | (b) max abs diff per layer |")
    add("|---|---|---|---|")
    for regime in regimes:
        for kind, (label, _) in SETTINGS.items():
            r = results[regime][kind]
            add(f"| {REGIMES[regime][0]} | {label} | {r['check_mismatch']} | "
                f"{' / '.join(f'{v:.1e}' for v in r['counter_check'])} |")
    add("")
    add("## Final `fusedbn.diagnostics.report` per run\n")
    for regime in regimes:
        for kind, (label, _) in SETTINGS.items():
            add(f"{REGIMES[regime][0]}, {label}:\n")
            add(results[regime][kind]["report"] + "\n")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds for the repeat of the stress regime (adam_hi), seed 0 included")
    ap.add_argument("--tol", type=float, default=1e-9,
                    help="max |loss eager - loss fusedbn| accepted in the float64 run")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    data = load_data(args.seed)
    args.n_train, args.n_test = len(data[0]), len(data[2])
    order = batch_order(args.n_train, args.epochs, args.seed)
    args.steps = len(order[0])
    init = initial_state(args.seed)

    results = {}
    for regime in args.regimes:
        results[regime] = {}
        for kind, (label, _) in SETTINGS.items():
            t0 = time.perf_counter()
            r = results[regime][kind] = train_setting(kind, regime, data, order, init)
            print(f"[{regime}] {label:18s} loss {r['loss'][-1]:.4f}  "
                  f"acc {100 * r['acc'][-1]:5.1f}%  "
                  f"dead {100 * r['dead'][-1]:5.1f}% (max {100 * max(r['dead']):.1f}%, "
                  f"nearly {100 * max(r['near_dead']):.1f}%)  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    repeats = {}
    if "adam_hi" in args.regimes and args.seeds > 1:
        for seed in range(1, args.seeds):
            s_order = batch_order(args.n_train, args.epochs, seed)
            s_init = initial_state(seed)
            for kind in SETTINGS:
                r = train_setting(kind, "adam_hi", data, s_order, s_init)
                repeats.setdefault(kind, [results["adam_hi"][kind]]).append(r)
            print(f"[adam_hi] seed {seed} done", flush=True)
    cmp = compare_eager(args.regimes[0], data, order, init)
    cmp["regime"] = args.regimes[0]
    print(f"eager vs fusedbn: max |dloss| {cmp['max_diff']:.2e} (float64 {cmp['diff64']:.1e}), "
          f"acc {cmp['acc']}, "
          f"step ms {cmp['step_ms']}, saved MiB "
          f"{ {k: round(v / 2**20, 2) for k, v in cmp['saved'].items()} }", flush=True)

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "bn_relu_study.png")
    plot(results, cmp, args.regimes, args.epochs, png)
    md = os.path.join(args.out, "bn_relu_study.md")
    runtime = time.perf_counter() - t_start
    with open(md, "w") as f:
        f.write(markdown(args, results, repeats, cmp, args.regimes, runtime,
                         (load_start, os.getloadavg()[0])) + "\n")
    print(f"wrote {png}, {md} ({runtime:.0f} s)")


if __name__ == "__main__":
    main()
