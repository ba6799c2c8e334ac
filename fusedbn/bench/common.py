"""Settings shared by the parts of ``fusedbn.bench``, and its inputs."""
import sys

import torch

DEFAULT_MODES = ("forward-train", "forward+backward", "eval")
ALL_MODES = ("forward-train", "forward+backward", "eval", "backward")

SHAPE_PRESETS = {
    # BatchNorm inputs of ResNet-50 at batch 32, plus the second target.
    "resnet50": [(32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28), (32, 512, 28, 28),
                 (32, 256, 14, 14), (32, 1024, 14, 14), (32, 512, 7, 7), (32, 2048, 7, 7),
                 (64, 256, 14, 14)],
    "targets": [(32, 64, 56, 56), (64, 256, 14, 14)],
    "quick": [(8, 64, 56, 56), (16, 256, 14, 14)],
}
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
NEGATIVE_SLOPE = 0.01
ALPHA = 1.0
# "fusedbn+activity": the fused module with track_activity=True (dead-unit
# counting in the kernel, plus the module's few per-channel buffer updates).
CONTENDERS = ("fusedbn", "fusedbn+activity", "eager", "compile", "inplace_abn")
OTHERS = ("eager", "compile", "inplace_abn")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def shape_str(shape):
    return "x".join(str(s) for s in shape)


def log(msg):
    print(msg, file=sys.stderr, flush=True)



def make_input(shape, dtype, device, layout, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.5  # a mean away from 0, std 2
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    return x.requires_grad_(requires_grad)


def make_grad(shape, dtype, device, layout, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(
        memory_format=LAYOUTS[layout])

