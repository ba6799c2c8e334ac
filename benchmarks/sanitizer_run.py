"""A small representative CUDA run for compute-sanitizer (memcheck,
racecheck): every kernel family once -- forward train/eval, backward,
residual, in place -- both layouts, float32 and bfloat16, shapes that take
the packed and the single-element paths and several partials per channel."""
import torch

import fusedbn

assert torch.cuda.is_available(), "needs a CUDA device"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((4, 8, 6, 6), (3, 5, 7, 3), (16, 32, 33, 17)):
        for cl in (False, True):
            C = shape[1]
            x = torch.randn(shape, device="cuda").to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            z = torch.randn_like(x)
            w = torch.rand(C, device="cuda", requires_grad=True)
            b = torch.randn(C, device="cuda", requires_grad=True)
            rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
            for training in (True, False):
                for residual, inplace, act in ((None, False, "relu"), (z, False, "elu"),
                                               (None, True, "leaky_relu")):
                    xi = x.clone().requires_grad_()
                    y = fusedbn.batch_norm_act(xi * 1 if inplace else xi, rm, rv, w, b,
                                               training, 0.1, 1e-5, act, residual=residual,
                                               inplace=inplace)
                    y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("sanitizer_run: done")
