"""Dead-unit diagnostics from the activity counters of ``track_activity=True``.

    model = fusedbn.convert(model)            # or build it with fusedbn modules
    fusedbn.diagnostics.track(model)          # switch counting on everywhere
    ... train ...
    print(fusedbn.diagnostics.report(model, steps=100))

The counting itself happens inside the fused kernel (see ``batch_norm_act``'s
``activity`` argument); this module only reads the buffers.
"""
from typing import List, NamedTuple

import torch

from .modules import _BatchNormAct


class LayerActivity(NamedTuple):
    layer: str              # qualified module name
    activation: str
    order: str              # "bn_act" or "act_bn"
    channels: int
    active_fraction: float  # mean over channels, last batch
    active_fraction_avg: float  # mean over channels of the running average
    dead_channels: int      # channels with no active value in the last `steps` forwards


class Report(list):
    """A list of ``LayerActivity`` rows; ``str()`` gives a markdown table."""

    def __init__(self, rows, steps):
        super().__init__(rows)
        self.steps = steps

    def __str__(self):
        head = ("| layer | activation | order | channels | active (last batch) | active (avg) "
                f"| dead (no activity in {self.steps} steps) |")
        lines = [head, "|" + "---|" * 7]
        for r in self:
            lines.append(f"| {r.layer or '(model)'} | {r.activation} | {r.order} | {r.channels} | "
                         f"{r.active_fraction:.3f} | {r.active_fraction_avg:.3f} | "
                         f"{r.dead_channels} |")
        return "\n".join(lines)


def track(model, enabled=True, activity_momentum=None):
    """Turn activity counting on (or off) in every fusedbn module of ``model``;
    returns the model. Buffers are created on the module's device."""
    for m in model.modules():
        if not isinstance(m, _BatchNormAct):
            continue
        if activity_momentum is not None:
            m.activity_momentum = activity_momentum
        if enabled and getattr(m, "activity", None) is None:
            ref = m.running_mean if m.running_mean is not None else m.weight
            m._register_activity_buffers(None if ref is None else ref.device)
        m.track_activity = enabled
    return model


def report(model, steps=1) -> Report:
    """One row per fusedbn module with activity counting on (in
    ``model.named_modules()`` order). ``dead_channels`` counts the channels
    that had no active value in each of the last ``steps`` forwards."""
    if steps < 1:
        raise ValueError(f"fusedbn: steps must be >= 1, got {steps}")
    rows: List[LayerActivity] = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNormAct) or not getattr(m, "track_activity", False):
            continue
        rows.append(LayerActivity(
            layer=name, activation=m.activation, order=m.order, channels=m.num_features,
            active_fraction=m.active_fraction.float().mean().item(),
            active_fraction_avg=m.active_fraction_avg.float().mean().item(),
            dead_channels=int((m.inactive_steps >= steps).sum().item())))
    return Report(rows, steps)
