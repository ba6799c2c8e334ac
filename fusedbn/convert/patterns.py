"""What ``fusedbn.convert`` recognizes: the pairs it fuses and the graph shapes it matches.

A *pair* is an ``nn.BatchNorm1d/2d/3d`` (exactly those classes: no subclass,
no ``SyncBatchNorm`` -- the fused kernel does not synchronise statistics across
processes --, no lazy module, no hooks, no parametrization; see
:func:`_is_plain_bn`) whose output goes to ``nn.ReLU`` / ``nn.LeakyReLU`` /
``nn.ELU`` (exact classes, no hooks), ``F.relu``, ``F.relu_``, ``torch.relu``,
``torch.relu_``, ``F.leaky_relu(x, slope)``, ``F.leaky_relu_``,
``F.elu(x, alpha=...)``, ``F.elu_``, ``x.relu()`` or ``x.relu_()`` (slope/alpha
must be constants). It becomes ``BatchNormAct{1,2,3}d`` with the matching
``activation``, ``negative_slope`` and ``alpha`` (``swap.py``).

In a traced forward a pair is either direct, ``act(bn(x))``, or the residual
form ``act(bn(x) + z)`` (:func:`_match_residual`). A Sequential pair is two
neighbouring elements (``rewrite._convert``).
"""
import inspect
import numbers
import operator
from typing import NamedTuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d


class Fusion(NamedTuple):
    """One BatchNorm + activation pair that ``convert`` fused (or ``unconvert`` split).

    name:  qualified name of the BatchNorm, which is also the fused module's
    activation / negative_slope / alpha: the fused activation and its parameters
    act:   the activation: qualified module name, or the function / method
           (``"torch.nn.functional.relu"``, ``"Tensor.relu_"``) called in forward
    owner: qualified name of the Sequential or of the module whose forward changed
           (``""`` is the model itself)
    kind:  ``"sequential"``, ``"graph"`` (direct pair in a traced forward) or
           ``"residual"`` (``act(bn(x) + z)`` in a traced forward; ``act`` is the
           activation after the add)
    """
    name: str
    activation: str
    negative_slope: float
    alpha: float
    act: str
    owner: str
    kind: str


_BN_TO_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
                nn.BatchNorm3d: BatchNormAct3d}
_FUSED_TO_BN = ((BatchNormAct1d, nn.BatchNorm1d), (BatchNormAct2d, nn.BatchNorm2d),
                (BatchNormAct3d, nn.BatchNorm3d))
_BN_PARAMS = ("weight", "bias")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_DEFAULT_SLOPE = 0.01
_DEFAULT_ALPHA = 1.0


# ---------------------------------------------------------------- activations
def _sig_relu(input, inplace=False):
    pass


def _sig_plain(input):
    pass


def _sig_leaky(input, negative_slope=0.01, inplace=False):
    pass


def _sig_leaky_(input, negative_slope=0.01):
    pass


def _sig_elu(input, alpha=1.0, inplace=False):
    pass


def _sig_elu_(input, alpha=1.0):
    pass


# stable name -> (function, activation, signature stub)
_FUNCTIONS = {
    "torch.nn.functional.relu": (F.relu, "relu", _sig_relu),
    "torch.relu": (torch.relu, "relu", _sig_plain),
    "torch.relu_": (torch.relu_, "relu", _sig_plain),  # also F.relu_
    "torch.nn.functional.leaky_relu": (F.leaky_relu, "leaky_relu", _sig_leaky),
    "torch.nn.functional.leaky_relu_": (F.leaky_relu_, "leaky_relu", _sig_leaky_),
    "torch.nn.functional.elu": (F.elu, "elu", _sig_elu),
    "torch.nn.functional.elu_": (F.elu_, "elu", _sig_elu_),
}
_FUNCTION_NAMES = {}
for _name, (_fn, _, _) in _FUNCTIONS.items():
    _FUNCTION_NAMES.setdefault(_fn, _name)
_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU)

# The adds of the residual form ``act(bn(x) + z)``: stable name -> (graph op, target).
# Only two-operand calls without kwargs match (no ``alpha``, no ``out``).
_ADDS = {
    "operator.add": ("call_function", operator.add),
    "operator.iadd": ("call_function", operator.iadd),
    "torch.add": ("call_function", torch.add),
    "Tensor.add": ("call_method", "add"),
    "Tensor.add_": ("call_method", "add_"),
}
_ADD_NAMES = {(op, t): name for name, (op, t) in _ADDS.items()}
# These write into their first operand: fused only when that is the BN output
# (a fresh tensor nobody else sees), never when it is the residual.
_IN_PLACE_ADDS = ("operator.iadd", "Tensor.add_")


def _has_hooks(m):
    return any(isinstance(v, dict) and v for k, v in m.__dict__.items() if "hook" in k)


def _is_plain_bn(m):
    return (type(m) in _BN_TO_FUSED and not m._modules and not _has_hooks(m)
            and "forward" not in m.__dict__
            and tuple(m._parameters) == _BN_PARAMS and tuple(m._buffers) == _BN_BUFFERS)


def _is_plain_act(m):
    return (type(m) in _ACT_MODULES and not m._modules and not m._parameters
            and not m._buffers and not _has_hooks(m) and "forward" not in m.__dict__)


def _module_act_config(m):
    if type(m) is nn.ReLU:
        return "relu", _DEFAULT_SLOPE, _DEFAULT_ALPHA
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope), _DEFAULT_ALPHA
    return "elu", _DEFAULT_SLOPE, float(m.alpha)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_SIGNATURES = {}


def _bind(stub, args, kwargs):
    sig = _SIGNATURES.get(stub)
    if sig is None:
        sig = _SIGNATURES[stub] = inspect.signature(stub)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _is_sequential(m):
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_container(m):
    """A module without a forward of its own (ModuleList, ModuleDict, plain nn.Module)."""
    return type(m).forward is nn.Module.forward


def _qual(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _set_submodule(root, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _match_activation(node, owner):
    """(activation, negative_slope, alpha, act description, act spec, input node) or None."""
    if node.op == "call_module":
        try:
            m = owner.module.get_submodule(node.target)
        except AttributeError:
            return None
        if not _is_plain_act(m) or len(node.args) != 1 or node.kwargs:
            return None
        act, slope, alpha = _module_act_config(m)
        return (act, slope, alpha, _qual(owner.name, node.target),
                ("call_module", node.target, (), {}), node.args[0])
    if node.op == "call_function":
        fname = _FUNCTION_NAMES.get(node.target) if _hashable(node.target) else None
        if fname is None:
            return None
        _, act, stub = _FUNCTIONS[fname]
        spec = ("call_function", fname, tuple(node.args[1:]), dict(node.kwargs))
    elif node.op == "call_method":
        act = _METHODS.get(node.target)
        if act is None:
            return None
        stub, fname = _sig_plain, f"Tensor.{node.target}"
        spec = ("call_method", node.target, tuple(node.args[1:]), dict(node.kwargs))
    else:
        return None
    arguments = _bind(stub, node.args, node.kwargs)
    if arguments is None:
        return None
    inp = arguments.pop("input")
    slope = arguments.get("negative_slope", _DEFAULT_SLOPE)
    alpha = arguments.get("alpha", _DEFAULT_ALPHA)
    inplace = arguments.get("inplace", False)
    if not (isinstance(inplace, bool) and _is_number(slope) and _is_number(alpha)):
        return None
    return act, float(slope), float(alpha), fname, spec, inp



def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _container_path(root, target):
    """True if every module strictly between root and target has no forward of its own."""
    parts = target.split(".")
    m = root
    for p in parts[:-1]:
        m = getattr(m, p)
        if not _is_container(m):
            return False
    return True


def _graph_candidates(owner, graph):
    """{bn node: (act node, config, desc, spec, add)} for the fusable-looking pairs in
    one graph; add is None for a direct pair, (add node, add name, bn_first) for
    the residual form act(bn(x) + z)."""
    out = {}
    for node in graph.nodes:
        match = _match_activation(node, owner)
        if match is None:
            continue
        act, slope, alpha, desc, spec, inp = match
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if not isinstance(inp, torch.fx.Node) or any(isinstance(a, torch.fx.Node) for a in rest):
            continue
        add = None
        if inp.op != "call_module":
            residual = _match_residual(owner, inp)
            if residual is None:
                continue
            inp, add = residual
        if len(inp.users) != 1 or len(inp.args) != 1 or inp.kwargs:
            continue  # the BN output has other users (or an unusual call)
        out[inp] = (node, (act, slope, alpha), desc, spec, add)
    return out


def _match_residual(owner, add):
    """(bn node, (add, add name, bn_first)) when ``add`` is ``bn(x) + z`` whose result
    goes only to the activation, else None. When both operands qualify, the first
    one's BatchNorm is fused.

    The residual form ``act(bn(x) + z)``, as in ResNet blocks (``out =
    self.bn2(...); out += identity; out = self.relu(out)``): the add is ``a + b``,
    ``a += b``, ``torch.add(a, b)``, ``a.add(b)`` or ``a.add_(b)`` with exactly
    these two operands (no ``alpha``, no ``out``), either operand the BatchNorm
    output (for ``+=`` / ``add_``, which write into their first operand, only
    the first), the other operand a value computed in the forward (a constant
    or scalar operand is not a residual). The BatchNorm output must go to the
    add only. Traced forwards only: a Sequential cannot express the add.
    """
    key = (add.op, add.target) if add.op in ("call_function", "call_method") else None
    name = _ADD_NAMES.get(key) if key is not None and _hashable(add.target) else None
    if name is None or len(add.args) != 2 or add.kwargs or len(add.users) != 1:
        return None
    for i in ((0,) if name in _IN_PLACE_ADDS else (0, 1)):
        bn, z = add.args[i], add.args[1 - i]
        # z must be a value of the graph (a constant or scalar operand is a bias,
        # not a residual); the runtime guard in _residual_call checks its shape.
        if (isinstance(bn, torch.fx.Node) and isinstance(z, torch.fx.Node) and z is not bn
                and _is_bn_call(owner, bn) and _can_move_to(bn, add)):
            return bn, (add, name, i == 0)
    return None


def _is_bn_call(owner, node):
    if node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
        return False
    try:
        return _is_plain_bn(owner.module.get_submodule(node.target))
    except AttributeError:
        return False


def _can_move_to(bn, add):
    """Whether the BN call may run at the add's place instead of its own.

    The fused call stands where the add was, so that the residual is read when
    eager reads it (e.g. torchvision's Bottleneck computes the downsample
    shortcut between bn3 and the add). The BN then reads its input and updates
    its running stats later; that is only safe when nothing in between can see
    either: the input must be a fresh value used by the BN alone, and nothing in
    between may read the BN's tensors (get_attr). This assumes that the nodes in
    between do not write in place into the BN input through an alias.
    """
    between = []
    node = bn.next
    while node is not add:
        between.append(node)
        node = node.next
    if not between:
        return True
    x = bn.args[0]
    if not (isinstance(x, torch.fx.Node) and x.op in ("call_module", "call_function", "call_method")
            and len(x.users) == 1):
        return False
    prefix = bn.target + "."
    return not any(n.op == "get_attr" and (n.target == bn.target or n.target.startswith(prefix))
                   for n in between)


def _subtree_has_bn(m):
    return any(_is_plain_bn(x) for x in m.modules() if x is not m)
