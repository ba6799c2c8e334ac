"""What ``fusedbn.convert`` recognizes: the pairs it fuses and the graph shapes it matches.

A *pair* is an ``nn.BatchNorm1d/2d/3d`` (exactly those classes: no subclass,
no ``SyncBatchNorm`` -- the fused kernel does not synchronise statistics across
processes --, no lazy module, no hooks, no parametrization; see
:func:`_is_plain_bn`) whose output goes to an activation: a module of
``_MODULES`` (``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.ReLU6``,
``nn.Hardtanh``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.Hardsigmoid``,
``nn.GELU``, ``nn.Mish``; exact classes, no hooks), a function of
``_FUNCTIONS`` (their ``F.`` forms and in-place variants, ``torch.relu``,
``torch.relu_``) or a method of ``_METHODS`` (``x.relu()``, ``x.relu_()``);
parameters (negative_slope, alpha, min_val, max_val, approximate) must be
constants. It becomes ``BatchNormAct{1,2,3}d`` with the matching activation
and parameters (``swap.py``).

In a traced forward a pair is either direct, ``act(bn(x))``, or the residual
form ``act(bn(x) + z)`` (:func:`_match_residual`), or ``bn(x) + z`` with no
activation after the add (MobileNetV2's projection + skip), fused as the
residual form with ``identity``. The BatchNorm may also be the last element of
a plain Sequential called there (torchvision's ``x + self.conv(x)``, with
``conv`` ending in its projection BN; :func:`_bn_at`). A Sequential pair is
two neighbouring elements (``rewrite._convert``).
"""
import ast
import inspect
import numbers
import operator
import textwrap
from collections import Counter
from typing import NamedTuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import _reference
from ..modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d


class Fusion(NamedTuple):
    """One BatchNorm + activation pair that ``convert`` fused (or ``unconvert`` split).

    name:  qualified name of the BatchNorm, which is also the fused module's
    activation, negative_slope, alpha, min_val, max_val, approximate: the fused
           activation and its parameters (the defaults where it reads none;
           ``params`` gives only those it reads)
    act:   the activation: qualified module name, or the function / method
           (``"torch.nn.functional.relu"``, ``"Tensor.relu_"``) called in forward;
           ``""`` for an add with no activation after it (``identity``)
    owner: qualified name of the Sequential or of the module whose forward changed
           (``""`` is the model itself)
    kind:  ``"sequential"``, ``"graph"`` (direct pair in a traced forward),
           ``"residual"`` (``act(bn(x) + z)`` in a traced forward; ``act`` is the
           activation after the add) or ``"swap"`` (``self.act(self.bn(x))`` in
           the source of a forward that is not rewritten: the modules were
           swapped, as in a Sequential; see ``_source_pairs``)
    """
    name: str
    activation: str
    negative_slope: float
    alpha: float
    act: str
    owner: str
    kind: str
    # (after the original seven fields: records built positionally keep working)
    min_val: float = _reference.PARAMS["min_val"]
    max_val: float = _reference.PARAMS["max_val"]
    approximate: str = _reference.PARAMS["approximate"]

    @classmethod
    def of(cls, name, activation, params, act, owner, kind):
        p = {**_reference.PARAMS, **params}
        return cls(name, activation, p["negative_slope"], p["alpha"], act, owner, kind,
                   p["min_val"], p["max_val"], p["approximate"])

    @property
    def params(self):
        """The parameters the activation reads, by name."""
        return _reference.used_params(
            self.activation, **{k: getattr(self, k) for k in _reference.PARAMS})

    def __str__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        act = f"{self.activation}({params})" if params else self.activation
        via = f" after {self.act}" if self.act else ""
        return f"{self.name}: {act}, {self.kind}{via}"


_BN_TO_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
                nn.BatchNorm3d: BatchNormAct3d}
_FUSED_TO_BN = ((BatchNormAct1d, nn.BatchNorm1d), (BatchNormAct2d, nn.BatchNorm2d),
                (BatchNormAct3d, nn.BatchNorm3d))
_BN_PARAMS = ("weight", "bias")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------- activations
# Every spelling of an activation that convert recognizes, one table each.
# Modules (exact classes): their parameters are read from the module's attributes.
_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.ReLU6: "relu6",
            nn.Hardtanh: "hardtanh", nn.SiLU: "silu", nn.Hardswish: "hardswish",
            nn.Hardsigmoid: "hardsigmoid", nn.GELU: "gelu", nn.Mish: "mish"}
_ACT_MODULES = tuple(_MODULES)

# Functions: stable name -> (function, activation, the parameters after the input).
# Parameter names are those of _reference.PARAMS (defaults from there) plus
# ``inplace``; after "*" they are keyword-only (F.gelu's approximate). torch.*
# and Tensor methods exist for relu only (torch 2.13).
_FUNCTIONS = {
    "torch.nn.functional.relu": (F.relu, "relu", "inplace"),
    "torch.relu": (torch.relu, "relu", ""),
    "torch.relu_": (torch.relu_, "relu", ""),  # also F.relu_
    "torch.nn.functional.leaky_relu": (F.leaky_relu, "leaky_relu", "negative_slope inplace"),
    "torch.nn.functional.leaky_relu_": (F.leaky_relu_, "leaky_relu", "negative_slope"),
    "torch.nn.functional.elu": (F.elu, "elu", "alpha inplace"),
    "torch.nn.functional.elu_": (F.elu_, "elu", "alpha"),
    "torch.nn.functional.relu6": (F.relu6, "relu6", "inplace"),
    "torch.nn.functional.hardtanh": (F.hardtanh, "hardtanh", "min_val max_val inplace"),
    "torch.nn.functional.hardtanh_": (F.hardtanh_, "hardtanh", "min_val max_val"),
    "torch.nn.functional.silu": (F.silu, "silu", "inplace"),
    "torch.nn.functional.hardswish": (F.hardswish, "hardswish", "inplace"),
    "torch.nn.functional.hardsigmoid": (F.hardsigmoid, "hardsigmoid", "inplace"),
    "torch.nn.functional.gelu": (F.gelu, "gelu", "* approximate"),
    "torch.nn.functional.mish": (F.mish, "mish", "inplace"),
}
# Tensor methods: name -> activation (no parameters).
_METHODS = {"relu": "relu", "relu_": "relu"}


def _signature(params):
    """The inspect.Signature ``(input, <params>)`` of a _FUNCTIONS row."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    out = [inspect.Parameter("input", kind)]
    for name in params.split():
        if name == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        default = False if name == "inplace" else _reference.PARAMS[name]
        out.append(inspect.Parameter(name, kind, default=default))
    return inspect.Signature(out)


_SIGNATURES = {name: _signature(params) for name, (_, _, params) in _FUNCTIONS.items()}
_SIGNATURES.update({f"Tensor.{m}": _signature("") for m in _METHODS})
_FUNCTION_NAMES = {}
for _name, (_fn, _, _) in _FUNCTIONS.items():
    _FUNCTION_NAMES.setdefault(_fn, _name)


def _valid_params(params):
    """Whether the parameter values are what the fused module takes (constants
    of the right type; a graph value or anything else is not fused)."""
    for k, v in params.items():
        if k == "approximate":
            if v not in _reference.GELU_APPROXIMATIONS:
                return False
        elif not _is_number(v):
            return False
    return True


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
    """(activation, the parameters it reads) of an activation module of _MODULES."""
    name = _MODULES[type(m)]
    return name, _reference.used_params(name, **_reference.params_of(m))


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


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
    """(activation, params, act description, act spec, input node) or None."""
    if node.op == "call_module":
        try:
            m = owner.module.get_submodule(node.target)
        except AttributeError:
            return None
        if not _is_plain_act(m) or len(node.args) != 1 or node.kwargs:
            return None
        act, params = _module_act_config(m)
        if not _valid_params(params):
            return None
        return (act, params, _qual(owner.name, node.target),
                ("call_module", node.target, (), {}), node.args[0])
    if node.op == "call_function":
        fname = _FUNCTION_NAMES.get(node.target) if _hashable(node.target) else None
        if fname is None:
            return None
        act = _FUNCTIONS[fname][1]
        spec = ("call_function", fname, tuple(node.args[1:]), dict(node.kwargs))
    elif node.op == "call_method":
        act = _METHODS.get(node.target)
        if act is None:
            return None
        fname = f"Tensor.{node.target}"
        spec = ("call_method", node.target, tuple(node.args[1:]), dict(node.kwargs))
    else:
        return None
    try:
        bound = _SIGNATURES[fname].bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    inp = arguments.pop("input")
    if not isinstance(arguments.pop("inplace", False), bool):
        return None
    params = _reference.used_params(act, **arguments)
    if not _valid_params(params):
        return None
    return act, params, fname, spec, inp


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
    one graph; config is (activation, ((param, value), ...)); add is None for a
    direct pair, (add node, add name, bn_first) for the residual form
    act(bn(x) + z). An add with no recognized activation after it is the
    residual form with identity (act node, desc and spec None). A bn node calls
    a plain BatchNorm or a Sequential ending in one (:func:`_bn_at`)."""
    out = {}
    adds = set()
    for node in graph.nodes:
        match = _match_activation(node, owner)
        if match is None:
            continue
        act, params, desc, spec, inp = match
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if not isinstance(inp, torch.fx.Node) or any(isinstance(a, torch.fx.Node) for a in rest):
            continue
        add = None
        if inp.op != "call_module":
            residual = _match_residual(owner, inp)
            if residual is None:
                continue
            inp, add = residual
            adds.add(add[0])
        if len(inp.users) != 1 or len(inp.args) != 1 or inp.kwargs:
            continue  # the BN output has other users (or an unusual call)
        out[inp] = (node, (act, tuple(sorted(params.items()))), desc, spec, add)
    for node in graph.nodes:
        if node in adds:
            continue
        residual = _match_residual(owner, node, to_activation=False)
        if residual is not None and residual[0] not in out:
            out[residual[0]] = (None, ("identity", ()), None, None, residual[1])
    return out


def _match_residual(owner, add, to_activation=True):
    """(bn node, (add, add name, bn_first)) when ``add`` is ``bn(x) + z`` (whose result
    goes only to the activation, if ``to_activation``), else None. When both
    operands qualify, the first one's BatchNorm is fused.

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
    if name is None or len(add.args) != 2 or add.kwargs:
        return None
    if to_activation and len(add.users) != 1:
        return None
    # A BatchNorm called directly before one ending a Sequential (ResNet's
    # ``identity + out`` keeps fusing bn2, not the downsample's BN).
    matches = []
    for i in ((0,) if name in _IN_PLACE_ADDS else (0, 1)):
        bn, z = add.args[i], add.args[1 - i]
        # z must be a value of the graph (a constant or scalar operand is a bias,
        # not a residual); the runtime guard in _residual_call checks its shape.
        if (isinstance(bn, torch.fx.Node) and isinstance(z, torch.fx.Node) and z is not bn
                and _is_bn_call(owner, bn) and _can_move_to(bn, add)):
            tail = _bn_at(owner.module.get_submodule(bn.target))[1]
            matches.append((bool(tail), i, bn))
    if not matches:
        return None
    _, i, bn = min(matches, key=lambda m: m[:2])
    return bn, (add, name, i == 0)


def _is_bn_call(owner, node):
    if node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
        return False
    try:
        module = owner.module.get_submodule(node.target)
    except AttributeError:
        return False
    return _bn_at(module, owner.graph_module) is not None


def _bn_at(module, graph_module=False):
    """(the plain BatchNorm, its path relative to ``module``, [the Sequentials
    from ``module`` down to it]) when ``module`` is a plain BatchNorm or a plain
    Sequential whose last element is one (recursively: torchvision's
    Conv2dNormActivation(activation_layer=None) inside a block's Sequential),
    else None. The Sequential's output is then the BatchNorm's. Not looked for
    in a GraphModule (fx traces through Sequentials: its graph is flat)."""
    path, seqs = [], []
    while not _is_plain_bn(module):
        if graph_module or not _is_sequential(module) or _has_hooks(module):
            return None
        tail = [(k, m) for k, m in module._modules.items() if m is not None]
        if not tail:
            return None
        seqs.append(module)
        path.append(tail[-1][0])
        module = tail[-1][1]
    return module, ".".join(path), seqs


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


def _source_pairs(cls):
    """[(bn attribute, act attribute)] for each ``self.<act>(self.<bn>(...))`` in the
    source of ``cls`` (and its bases up to nn.Module) where both attribute names
    occur nowhere else in that source: the BatchNorm's output then goes to that
    activation and nowhere else, whatever the forward does around it (control
    flow on tensors, torch.utils.checkpoint: densenet's memory_efficient
    ``self.conv1(self.relu1(self.norm1(x)))``), so the pair can be fused by
    swapping modules (``rewrite._convert``), without tracing. Empty when some
    source cannot be read."""
    trees = []
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            break
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError):
            return []
    uses = Counter()   # every mention of a name: attribute loads and string constants
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                uses[node.attr] += 1
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                uses[node.value] += 1
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("add_module", "register_module") and node.args
                  and isinstance(node.args[0], ast.Constant)):
                uses[node.args[0].value] -= 1   # registering it is not a use

    def self_call(node):
        return (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
                and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self")

    pairs = []
    for tree in trees:
        for node in ast.walk(tree):
            if self_call(node) and self_call(node.args[0]):
                act, bn = node.func.attr, node.args[0].func.attr
                if act != bn and uses[act] == 1 and uses[bn] == 1:
                    pairs.append((bn, act))
    return pairs
