"""Forward-train and forward+backward of single layers through torch, with and
without a residual: fusedbn.batch_norm_act (relu, float32), best of 7x20 calls.
The forward runs under no_grad; forward+backward clones x (and z) as leaves
requiring grad. Compare two builds by running it alternately from each:

    PYTHONPATH=/tmp/old python benchmarks/short_layers.py old >> layers.csv
    PYTHONPATH=. python benchmarks/short_layers.py new >> layers.csv

CSV lines: tag, shape, res=0|1, fwd+bwd, us, fwd, us.
"""
import sys, torch, timeit, fusedbn
torch.set_num_threads(2)
tag = sys.argv[1] if len(sys.argv) > 1 else "run"
for shape in [(8,1024,7,7),(8,256,7,7),(8,2048,4,4),(8,512,4,4),(8,512,14,14)]:
    C = shape[1]
    for res in (False, True):
        x0 = torch.randn(shape); z0 = torch.randn(shape) if res else None
        w = torch.ones(C, requires_grad=True); b = torch.zeros(C, requires_grad=True)
        rm, rv = torch.zeros(C), torch.ones(C)
        g = torch.randn(shape)
        def step():
            x = x0.clone().requires_grad_(True)
            z = z0.clone().requires_grad_(True) if res else None
            y = fusedbn.batch_norm_act(x, rm, rv, w, b, True, residual=z)
            y.backward(g)
        def fwd():
            with torch.no_grad():
                fusedbn.batch_norm_act(x0, rm, rv, w, b, True, residual=z0)
        step(); fwd()
        tb = min(timeit.repeat(step, number=20, repeat=7)) / 20 * 1e6
        tf = min(timeit.repeat(fwd, number=20, repeat=7)) / 20 * 1e6
        print(f"{tag},{'x'.join(map(str,shape))},res={int(res)},fwd+bwd,{tb:.1f},fwd,{tf:.1f}", flush=True)
