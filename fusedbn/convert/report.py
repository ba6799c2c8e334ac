"""What ``convert(model, report=True)`` returns beside the model: what it fused,
and every BatchNorm it left, with the reason."""
from typing import NamedTuple


class Left(NamedTuple):
    """A BatchNorm (or BatchNorm-like module) that convert left as it is.

    name:   qualified name of the module
    reason: why, in words (what its output feeds, or why the forward calling it
            was not rewritten)
    """
    name: str
    reason: str


class Report(list):
    """The :class:`Fusion` records of one ``convert`` call (a list, so code that
    expects the list of fusions keeps working), plus:

    left:    a :class:`Left` record per BatchNorm of the model that is not fused
             after the call (fused by an earlier call counts as fused)
    modules: ``(name, reason)`` per module whose forward holds BatchNorms but was
             left as it is (not traceable, optional arguments, ...), one each
    total:   how many BatchNorms the model has (fused or not)
    fused:   how many of them are fused after the call

    ``str(report)`` is the table: one line per fusion, per left BatchNorm and
    per module left as it is.
    """

    def __init__(self, fusions, left=(), modules=(), total=0, fused=0):
        super().__init__(fusions)
        self.left = list(left)
        self.modules = list(modules)
        self.total = total
        self.fused = fused

    def __str__(self):
        lines = [f"fusedbn.convert: {self.fused} of {self.total} BatchNorms fused "
                 f"({len(self)} in this call), {len(self.left)} left"]
        lines += [f"  fused  {f}" for f in self]
        lines += [f"  left   {name}: {reason}" for name, reason in self.left]
        lines += [f"  module {name or '(the model)'}: {reason}" for name, reason in self.modules]
        return "\n".join(lines)
