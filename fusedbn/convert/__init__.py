"""Model conversion: replace ``BatchNorm -> activation`` pairs by fusedbn modules.

    model = fusedbn.convert(model)                       # in place, returns model
    model, report = fusedbn.convert(model, report=True)  # + Report: Fusion records, .left
    print(report)                                        # what was fused, what was left and why
    model = fusedbn.unconvert(model)                     # back to plain nn modules

Where to look: ``patterns.py`` (what is recognized), ``tracing.py`` (torch.fx,
and what tracing cannot see), ``rewrite.py`` (``convert``: Sequential pairs,
rewritten forwards, the residual form), ``swap.py`` (BatchNorm <-> fused
module), ``generated.py`` (the class a rewritten module gets, its pickling),
``undo.py`` (``unconvert``), ``report.py`` (what ``report=True`` returns).
The README's "Model conversion" gives the overview.
"""
from .patterns import Fusion
from .report import Left, Report
from .rewrite import convert
from .undo import unconvert

# Pickles of converted models name these here (where they were defined before
# this package was split); keep loading them.
from .generated import _decode_code, _new_converted  # noqa: F401,E402
from .rewrite import _residual_call  # noqa: F401,E402

__all__ = ["convert", "unconvert", "Fusion", "Report", "Left"]
