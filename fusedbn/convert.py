"""Model conversion: replace ``BatchNorm -> activation`` pairs by fusedbn modules.

    model = fusedbn.convert(model)                       # in place, returns model
    model, fused = fusedbn.convert(model, report=True)   # + list of Fusion records
    model = fusedbn.unconvert(model)                     # back to plain nn modules

What is converted
-----------------
A *pair* is an ``nn.BatchNorm1d/2d/3d`` (exactly those classes: no subclass,
no ``SyncBatchNorm``, no lazy module, no hooks, no parametrization) whose
output goes to ``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.ELU`` (exact classes, no
hooks), ``F.relu``, ``F.relu_``, ``torch.relu``, ``torch.relu_``,
``F.leaky_relu(x, slope)``, ``F.leaky_relu_``, ``F.elu(x, alpha=...)``,
``F.elu_``, ``x.relu()`` or ``x.relu_()`` (slope/alpha must be constants). It
becomes ``BatchNormAct{1,2,3}d`` with the matching ``activation``,
``negative_slope`` and ``alpha``. The fused module *shares* the BatchNorm's
parameter and buffer tensors (weight, bias, running_mean, running_var,
num_batches_tracked: same objects, so an optimizer built before the
conversion keeps working) and copies eps, momentum, affine,
track_running_stats and the train/eval flag; device and dtype are those of the
shared tensors.

Pairs are found in two ways:

* **nn.Sequential** (or a subclass that keeps ``Sequential.forward``):
  neighbours ``BN, act`` become ``BatchNormAct, nn.Identity()``, so indices
  and state_dict keys of the other layers do not move.
* **forward() of any other module with children**, through ``torch.fx``
  symbolic tracing of that module alone (its children are leaves, each child is
  handled on its own, recursively). The BatchNorm must be a direct child, or
  sit in ModuleList / ModuleDict / plain ``nn.Module`` containers below it. In
  the graph the BatchNorm ``call_module`` keeps its target (the fused module
  is installed under the BN's qualified name) and the activation node is
  deleted. The module keeps its identity, attributes and class: its class is
  swapped for a generated subclass of the original class (same name, same
  module, ``isinstance`` unchanged) whose ``forward`` is the rewritten graph's
  code. If the traced graph depends on ``self.training`` the module is traced in
  both modes and the new forward dispatches on ``self.training``. Activation
  modules are never removed (they may be used elsewhere, e.g. after another
  add). A ``torch.fx.GraphModule`` given to ``convert`` is rewritten in its
  own graph (``recompile()``), not retraced.

Residual form (traced forwards only; a Sequential cannot express the add):
``act(bn(x) + z)`` as in ResNet blocks (``out = self.bn2(...); out += identity;
out = self.relu(out)``) becomes one call of the fused module with
``residual=z``. The add is ``a + b``, ``a += b``, ``torch.add(a, b)``,
``a.add(b)`` or ``a.add_(b)`` with exactly these two operands (no ``alpha``,
no ``out``), either operand the BatchNorm output (for ``+=`` / ``add_``, which
write into their first operand, only the first), the other operand a value
computed in the forward (a constant or scalar operand is not a residual). The
BatchNorm output must go to the add only, and the add's result to the
activation only. When both operands are fusable BatchNorm outputs, the first
one's is fused. In the graph the BN call, the add and the activation become a
node ``_residual_call(self.<bn>, x, z, add, bn_first)`` (this module) at
the add's place (so ``z`` is read when eager reads it; torchvision computes
the downsample shortcut between bn3 and the add). The BN call moves to that
place, which is allowed only when nothing in between can tell: either nothing
lies between, or the BN input is a value used by the BN alone and nothing in
between reads the BN's tensors. Shapes are not known at trace time, so
``_residual_call`` decides per call: when ``z`` is a tensor with ``x``'s
shape, dtype, device (and strided layout) it calls ``fused(x, residual=z)``;
otherwise (a broadcast bias, another dtype, a non-tensor) it computes the
original unfused expression: ``nn.BatchNorm``'s forward on the fused module's
tensors (running stats updated once, as before), the original add with its
operand order (same broadcasting, type promotion and errors), then the
activation. Fusion records of this form have ``kind="residual"``.

A pair is left alone when the BatchNorm's output has another user besides
the activation (or the add, in the residual form; this includes an in-place
activation on a tensor used elsewhere), when the BatchNorm module is shared
(registered at two places, or called from two places, e.g. a Sequential
element that some forward also calls directly), or when the activation slot
of a Sequential is also called from a traced forward.

Modules that torch.fx cannot trace (data-dependent control flow, ...) are left
as they are, with a ``warnings.warn`` naming them and why; their children are
still converted (Sequential children structurally, other children by tracing
them on their own). Such a module's forward is not seen, so a Sequential child
is converted even if that forward called one of its elements directly.

unconvert
---------
``unconvert`` undoes what ``convert`` did, using what convert recorded:
Sequential pairs get the original BatchNorm class (sharing the tensors again)
and the original activation module object back in place of the Identity;
graph-rewritten modules get their original class back (hence their original
forward, which still calls the activation) and the BatchNorm under the same
name; a GraphModule gets the activation node re-inserted after the BatchNorm
call (residual form: the BatchNorm call, the add with its operand order and
the activation replace the ``_residual_call`` node). No state_dict key changes
in either direction: the state_dict of a converted model loads into the
original model and vice versa (strict).
Fused modules that ``convert`` did not create are left in place with a
warning.

Limitations
-----------
* The rewritten forward is the torch.fx graph: Python-level behaviour that fx
  does not record is specialised at conversion time -- branches on non-tensor
  attributes (``if self.downsample is not None``; changing such an attribute
  later is not seen), side effects, context managers, and tests on arguments
  (fx passes every argument as a tensor proxy, so ``if mask is None`` would be
  frozen). Hence a module whose forward assigns attributes while being traced
  is treated as untraceable, and a forward that has parameters with default
  values (or ``**kwargs``), or whose source uses ``no_grad`` /
  ``enable_grad`` / ``set_grad_enabled`` / ``inference_mode`` / ``autocast``,
  is not rewritten (a warning names it when it holds pairs; its children are
  still converted). Use ``trace=False`` (Sequential pairs only) or
  ``exclude=`` when in doubt.
* A pair whose BatchNorm and activation live in different modules' forwards
  (e.g. a Sequential ending in BN followed by ``F.relu`` in the parent) is not
  fused.
* Another method than ``forward`` that calls the BatchNorm directly (and is
  called from outside) would get the fused module.
* ``SyncBatchNorm`` is never converted (the fused kernel does not synchronise
  statistics across processes).
* Pickling a converted model (``torch.save(model)``) works: the generated
  forward travels as source. ``torch.jit.script`` of a graph-rewritten module
  is not supported (``unconvert`` first).
* torch.fx records ``out += z`` on a tensor as ``out + z`` (the traced graph,
  hence the rewritten forward, does not write into ``out``); this holds for
  every rewritten forward, fused or not.
* Residual form: the BN call running at the add's place assumes that the
  nodes in between do not write in place into the BN input through an alias
  (the input itself has no other user in the graph). Forward hooks registered
  on a fused module later are not called on the unfused fallback path.
"""
import copy
import importlib
import inspect
import linecache
import numbers
import operator
import types
import warnings
import weakref
from collections import Counter, defaultdict
from typing import NamedTuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormAct

__all__ = ["convert", "unconvert", "Fusion"]


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
_MARK = "_fusedbn_source"        # on a fused module convert created: how to undo it
_OWNED = "_fusedbn_fused"        # on a graph-rewritten module: relative paths it fused
_CONSTANTS = "_fusedbn_constants"  # on a graph-rewritten module: tensor constants fx added
_GRAD_CONTEXTS = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast")
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


def _residual_call(bn, x, z, add, bn_first):
    """What a residual fusion's graph node calls: ``act(bn(x) + z)`` as one fused
    kernel when ``z`` is a tensor of ``x``'s shape, dtype, device and layout (what
    the kernel supports), else the unfused original: the BatchNorm forward of
    ``nn.BatchNorm`` (same running-stat update, once), the original add with its
    operand order (same broadcasting, type promotion and errors), the activation.
    Shapes are unknown at trace time, so the choice is made here, per call.

    bn: the fused module; add: a name in ``_ADDS``; bn_first: whether the BN
    output was the add's first operand.
    """
    # Under torch.fx tracing (a converted module traced again, by convert or a
    # user) record this call as one node instead of tracing into one branch.
    for a in (x, z):
        if isinstance(a, torch.fx.Proxy):
            return a.tracer.create_proxy("call_function", _residual_call,
                                         (bn, x, z, add, bn_first), {})
    if (isinstance(z, torch.Tensor) and z.shape == x.shape and z.dtype == x.dtype
            and z.device == x.device and z.layout == x.layout == torch.strided):
        return bn(x, residual=z)
    y = _BatchNorm.forward(bn, x)
    a, b = (y, z) if bn_first else (z, y)
    op, target = _ADDS[add]
    s = target(a, b) if op == "call_function" else getattr(a, target)(b)
    fn, args = _functional_for(bn, s)
    return fn(*args)


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


# ------------------------------------------------------ BN <-> fused modules
def _share_state(dst, src):
    for name in _BN_PARAMS:
        dst._parameters[name] = src._parameters[name]
    for name in _BN_BUFFERS:
        dst._buffers[name] = src._buffers[name]
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.train(src.training)


# Attributes beyond these are the user's (a qconfig, a tag, ...) and move along;
# a torch.compile'd call (Module.compile) does not.
_NOT_CARRIED = {"_compiled_call_impl"}
_BN_ATTRS = frozenset(nn.BatchNorm2d(1, device="meta").__dict__) | _NOT_CARRIED
_FUSED_ATTRS = frozenset(BatchNormAct2d(1, device="meta").__dict__) | {_MARK} | _NOT_CARRIED


def _to_fused(bn, activation, negative_slope, alpha, mark):
    cls = _BN_TO_FUSED[type(bn)]
    fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                activation=activation, negative_slope=negative_slope, alpha=alpha,
                device="meta", bias=bn.bias is not None or not bn.affine)
    _share_state(fused, bn)
    for k, v in bn.__dict__.items():
        if k not in _BN_ATTRS:
            fused.__dict__[k] = v
    fused.__dict__[_MARK] = mark
    return fused


def _to_bn(fused):
    cls = next(bn for f, bn in _FUSED_TO_BN if isinstance(fused, f))
    bn = cls(fused.num_features, fused.eps, fused.momentum, fused.affine,
             fused.track_running_stats, device="meta",
             bias=fused.bias is not None or not fused.affine)
    _share_state(bn, fused)
    for k, v in fused.__dict__.items():
        if k not in _FUSED_ATTRS:
            bn.__dict__[k] = v
    return bn


# ------------------------------------------------------ generated subclasses
class _Code:
    """The generated forward(s) of a graph-rewritten module: ((mode, src, globals), ...)
    with mode "any", or "train" and "eval". Immutable; pickles with module globals
    by name."""

    def __init__(self, variants):
        self.variants = tuple((mode, src, dict(glb)) for mode, src, glb in variants)
        self.key = tuple((mode, src, tuple(sorted((k, id(v)) for k, v in glb.items())))
                         for mode, src, glb in self.variants)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        encoded = tuple(
            (mode, src, tuple((k, True, v.__name__) if isinstance(v, types.ModuleType)
                              else (k, False, v) for k, v in glb.items()))
            for mode, src, glb in self.variants)
        return _decode_code, (encoded,)


def _decode_code(encoded):
    return _Code((mode, src, {k: importlib.import_module(v) if is_module else v
                              for k, is_module, v in glb})
                 for mode, src, glb in encoded)


_CLASSES = weakref.WeakValueDictionary()
_SERIAL = [0]


def _compile_forward(src, glb, label):
    _SERIAL[0] += 1
    filename = f"<fusedbn.convert {label} #{_SERIAL[0]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(glb)
    exec(compile(src, filename, "exec"), namespace)
    return namespace["forward"]


def _make_dispatch(train_fn, eval_fn):
    def forward(self, *args, **kwargs):
        if self.training:
            return train_fn(self, *args, **kwargs)
        return eval_fn(self, *args, **kwargs)
    # Both variants have the forward's signature; torch.fx (tracing a converted
    # module again) and inspect.signature read it through __wrapped__.
    forward.__wrapped__ = train_fn
    return forward


def _reduce_converted(self, protocol):
    cls = type(self)
    return _new_converted, (cls._fusedbn_base, cls._fusedbn_code), self.__getstate__()


def _new_converted(base, code):
    cls = _converted_class(base, code)
    return cls.__new__(cls)


def _converted_class(base, code):
    key = (base, code.key)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    fns = {mode: _compile_forward(src, glb, f"{base.__qualname__}.forward[{mode}]")
           for mode, src, glb in code.variants}
    forward = fns["any"] if "any" in fns else _make_dispatch(fns["train"], fns["eval"])
    forward.__name__ = "forward"
    forward.__qualname__ = f"{base.__qualname__}.forward"
    cls = type(base)(base.__name__, (base,), {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "forward": forward,
        "__reduce_ex__": _reduce_converted,
        "_fusedbn_base": base,
        "_fusedbn_code": code,
    })
    _CLASSES[key] = cls
    return cls


def _original_class(m):
    return type(m).__dict__.get("_fusedbn_base", type(m))


# -------------------------------------------------------------------- tracing
class _Untraceable(Exception):
    pass


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


def _snapshot(m):
    return (dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))


def _restore(m, snap):
    """Undo what tracing did to ``m``; return (tensor constants fx added, other changes)."""
    d, params, buffers, modules = snap
    constants, changed = {}, []
    for k, v in m.__dict__.items():
        if k == "training":
            continue
        if k not in d:
            if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor):
                constants[k] = v
            else:
                changed.append(k)
        elif d[k] is not v:
            changed.append(k)
    changed += [k for k in d if k not in m.__dict__]
    for now, before in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
        if now.keys() != before.keys() or any(now[k] is not before[k] for k in now):
            changed.append("submodules/parameters/buffers")
    m.__dict__.clear()
    m.__dict__.update(d)
    for now, before in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
        now.clear()
        now.update(before)
    return constants, changed


def _trace_variants(module):
    """[(mode, graph)] and the tensor constants to install; raises _Untraceable."""
    if "forward" in module.__dict__:
        raise _Untraceable("the instance has its own `forward` attribute")
    flags = [(m, m.training) for m in module.modules()]
    snap = _snapshot(module)
    traced = []
    try:
        for mode in (True, False):
            for m, _ in flags:
                m.training = mode
            try:
                graph = _ShallowTracer().trace(module)
            except Exception as e:  # noqa: BLE001 -- any failure means "not traceable"
                msg = str(e).strip().splitlines()
                raise _Untraceable(f"{type(e).__name__}: {msg[0] if msg else ''}") from None
            finally:
                constants, changed = _restore(module, snap)
            if changed:
                raise _Untraceable("its forward changes the module's attributes "
                                   f"({', '.join(sorted(set(changed)))})")
            traced.append((graph, constants))
    finally:
        for m, t in flags:
            m.training = t
    (g_train, c_train), (g_eval, c_eval) = traced
    same = (g_train.python_code("self").src == g_eval.python_code("self").src
            and c_train.keys() == c_eval.keys()
            and all(c_train[k] is c_eval[k] for k in c_train))
    if same:
        return [("any", g_train)], c_train
    # Different graphs per mode: the new forward dispatches on self.training.
    constants = dict(c_train)
    for k, v in c_eval.items():
        if k in constants and constants[k] is not v:
            raise _Untraceable("its tensor constants differ between train and eval")
        constants[k] = v
    return [("train", g_train), ("eval", g_eval)], constants


def _no_rewrite_reason(module):
    """Why the traced graph must not replace this module's forward, or None."""
    fn = inspect.unwrap(type(module).forward)
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    optional = [str(p) for p in params if p.default is not inspect.Parameter.empty
                or p.kind is inspect.Parameter.VAR_KEYWORD]
    if optional:
        return (f"its forward has optional parameters ({', '.join(optional)}), which torch.fx "
                "traces as tensors (a test like `if arg is None` would be frozen); the forward "
                "was not rewritten")
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    used = [c for c in _GRAD_CONTEXTS if c in src]
    if used:
        return (f"its forward uses {', '.join(used)}, which torch.fx does not record; "
                "the forward was not rewritten")
    return None


# ------------------------------------------------------------------- analysis
class _Owner:
    """A module whose forward graph(s) we looked at."""

    def __init__(self, name, module, variants, constants, graph_module):
        self.name = name
        self.module = module
        self.variants = variants          # [(mode, Graph)]
        self.constants = constants
        self.graph_module = graph_module  # True: module is a torch.fx.GraphModule
        self.no_rewrite = None            # reason, when the forward must not be rewritten


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
    one's BatchNorm is fused."""
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
    between may read the BN's tensors (get_attr).
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


def _warn(msg):
    warnings.warn(msg, UserWarning, stacklevel=4)


def _describe(name, module):
    where = f"submodule {name!r}" if name else "the model"
    return f"{where} ({_original_class(module).__name__})"


def _convert(model, trace, exclude):
    excluded = set()
    for name in exclude:
        excluded.update(id(m) for m in model.get_submodule(name).modules())
    in_tree = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    sites = defaultdict(list)   # id(module) -> ["seq" | (owner, variant index, node)]
    seq_pairs = []              # (seq name, seq, bn slot, act slot, bn, act)
    owners = []
    for name, m in model.named_modules():
        if id(m) in excluded or not m._modules:
            continue
        if _is_sequential(m):
            slots = [(k, c) for k, c in m._modules.items() if c is not None]
            for _, c in slots:
                sites[id(c)].append("seq")
            for (kb, b), (ka, a) in zip(slots, slots[1:]):
                if _is_plain_bn(b) and _is_plain_act(a):
                    seq_pairs.append((name, m, kb, ka, b, a))
            continue
        if _is_container(m) or not trace or not _subtree_has_bn(m):
            continue
        if isinstance(m, torch.fx.GraphModule):
            owner = _Owner(name, m, [("any", m.graph)], {}, True)
        else:
            try:
                variants, constants = _trace_variants(m)
            except _Untraceable as e:
                _warn(f"fusedbn.convert: {_describe(name, m)} left as is: torch.fx could not "
                      f"trace its forward ({e}); its children were converted on their own "
                      "where possible")
                continue
            owner = _Owner(name, m, variants, constants, False)
            owner.no_rewrite = _no_rewrite_reason(m)
        owners.append(owner)
        for index, (_, graph) in enumerate(owner.variants):
            for node in graph.nodes:
                if node.op == "call_module":
                    try:
                        callee = m.get_submodule(node.target)
                    except AttributeError:
                        continue
                    sites[id(callee)].append((owner, index, node))

    fusions = []
    # Sequential neighbours.
    for seq_name, seq, kb, ka, bn, act in seq_pairs:
        if (id(bn) in excluded or id(act) in excluded or in_tree[id(bn)] != 1
                or sites[id(bn)] != ["seq"] or any(s != "seq" for s in sites[id(act)])):
            continue
        activation, slope, alpha = _module_act_config(act)
        fused = _to_fused(bn, activation, slope, alpha, {"kind": "sequential", "act": act})
        setattr(seq, kb, fused)
        identity = nn.Identity()
        identity.train(act.training)
        setattr(seq, ka, identity)
        fusions.append(Fusion(_qual(seq_name, kb), activation, slope, alpha,
                              _qual(seq_name, ka), seq_name, "sequential"))

    # Graph pairs.
    for owner in owners:
        candidates = [_graph_candidates(owner, g) for _, g in owner.variants]
        chosen = {}  # bn target -> [(variant index, bn node, act node, config, desc, spec)]
        for target in {n.target for c in candidates for n in c}:
            bn = owner.module.get_submodule(target)
            if (not _is_plain_bn(bn) or id(bn) in excluded or in_tree[id(bn)] != 1
                    or not _container_path(owner.module, target)):
                continue
            bn_sites = sites[id(bn)]
            if any(s == "seq" or s[0] is not owner for s in bn_sites):
                continue
            per_variant = Counter(s[1] for s in bn_sites)
            if any(v != 1 for v in per_variant.values()):
                continue
            found = []
            for _, index, node in bn_sites:
                if node not in candidates[index]:
                    break
                found.append((index, node) + candidates[index][node])
            else:
                # One fused module for all variants: same activation and form in each.
                configs = {(f[3], f[6] and f[6][1:]) for f in found}
                if len(configs) == 1:
                    chosen[target] = found
        if not chosen:
            continue
        if owner.no_rewrite:
            _warn(f"fusedbn.convert: {_describe(owner.name, owner.module)}: "
                  f"{owner.no_rewrite} (pairs not fused: {', '.join(sorted(chosen))})")
            continue
        _rewrite(owner, chosen, fusions)
    return fusions


def _rewrite(owner, chosen, fusions):
    m = owner.module
    for target, found in sorted(chosen.items()):
        bn = m.get_submodule(target)
        (activation, slope, alpha), desc, spec, add = found[0][3:]
        for index, bn_node, act_node, *_, add_info in found:
            graph = owner.variants[index][1]
            if add_info is None:
                act_node.replace_all_uses_with(bn_node)
                graph.erase_node(act_node)
            else:
                _fuse_residual(graph, target, bn_node, act_node, *add_info)
        mark = {"kind": "graph", "act": spec}
        if add is not None:
            mark = {"kind": "residual", "act": spec, "add": add[1:]}
        fused = _to_fused(bn, activation, slope, alpha, mark)
        _set_submodule(m, target, fused)
        fusions.append(Fusion(_qual(owner.name, target), activation, slope, alpha, desc,
                              owner.name, mark["kind"]))
    for _, graph in owner.variants:
        graph.lint()
    if owner.graph_module:
        m.recompile()
        return
    code = _Code((mode, pc.src, pc.globals) for mode, pc in
                 ((mode, g.python_code("self")) for mode, g in owner.variants))
    for k, v in owner.constants.items():
        m.__dict__[k] = v
    owned = list(m.__dict__.get(_OWNED, ())) + sorted(chosen)
    constants = list(m.__dict__.get(_CONSTANTS, ())) + sorted(owner.constants)
    m.__class__ = _converted_class(_original_class(m), code)
    m.__dict__[_OWNED] = owned
    m.__dict__[_CONSTANTS] = constants


def _fuse_residual(graph, target, bn_node, act_node, add_node, add, bn_first):
    # Operands are read now, not at analysis time: rewriting another pair may
    # have replaced one of them (e.g. the residual was that pair's activation).
    x = bn_node.args[0]
    z = add_node.args[1 if bn_first else 0]
    with graph.inserting_before(add_node):
        module = graph.get_attr(target)
        new = graph.call_function(_residual_call, (module, x, z, add, bn_first))
    act_node.replace_all_uses_with(new)
    for node in (act_node, add_node, bn_node):
        graph.erase_node(node)


# ---------------------------------------------------------------- public API
def convert(model, inplace=True, *, report=False, trace=True, exclude=()):
    """Replace every BatchNorm -> ReLU/LeakyReLU/ELU pair in ``model`` by a fused
    ``BatchNormAct{1,2,3}d`` (see the module docstring for the rules).

    inplace: convert ``model`` itself (default; parameters are shared, so an
        existing optimizer stays valid), or a deep copy of it when False.
    report: also return the list of :class:`Fusion` records, ``(model, fusions)``.
    trace: False converts Sequential neighbours only, without torch.fx.
    exclude: qualified names of submodules left untouched, with everything below.

    Untraceable modules are left as they are with a ``UserWarning`` (their
    children are still converted). State_dict keys do not change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedbn.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fusions = _convert(model, trace, (exclude,) if isinstance(exclude, str) else tuple(exclude))
    return (model, fusions) if report else model


def unconvert(model, inplace=True, *, report=False):
    """Undo :func:`convert`: fused modules it created become the original
    ``nn.BatchNormNd`` again (same tensors, same names), Sequential activation
    slots get the original activation module back, graph-rewritten modules their
    original class (a GraphModule gets its activation nodes back). State_dict
    keys do not change. Returns the model, or ``(model, [Fusion, ...])`` with
    ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedbn.unconvert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    undone = []
    handled = set()
    for name, m in list(model.named_modules()):
        if "_fusedbn_base" in type(m).__dict__:
            for target in m.__dict__.pop(_OWNED, ()):
                fused = m.get_submodule(target)
                if isinstance(fused, _BatchNormAct) and _MARK in fused.__dict__:
                    undone.append(_undo_record(fused, _qual(name, target), name,
                                               fused.__dict__[_MARK]["kind"]))
                    _set_submodule(m, target, _to_bn(fused))
                    handled.add(id(fused))
            for k in m.__dict__.pop(_CONSTANTS, ()):
                m.__dict__.pop(k, None)
            m.__class__ = type(m)._fusedbn_base
        elif isinstance(m, torch.fx.GraphModule):
            _unconvert_graph_module(name, m, undone, handled)
    for name, m in list(model.named_modules()):
        if not _is_sequential(m):
            continue
        slots = [(k, c) for k, c in m._modules.items() if c is not None]
        for (kb, b), (ka, a) in zip(slots, slots[1:]):
            mark = b.__dict__.get(_MARK) if isinstance(b, _BatchNormAct) else None
            if mark and mark["kind"] == "sequential" and type(a) is nn.Identity:
                undone.append(_undo_record(b, _qual(name, kb), name, "sequential",
                                           _qual(name, ka)))
                setattr(m, kb, _to_bn(b))
                setattr(m, ka, mark["act"])
                handled.add(id(b))
    left = [n for n, m in model.named_modules()
            if isinstance(m, _BatchNormAct) and id(m) not in handled]
    if left:
        warnings.warn("fusedbn.unconvert: left fused modules that fusedbn.convert did not "
                      f"create (or that were moved since): {', '.join(left)}", UserWarning,
                      stacklevel=2)
    return (model, undone) if report else model


def _undo_record(fused, name, owner, kind, act=None):
    if act is None:
        spec = fused.__dict__[_MARK].get("act")
        act = (_qual(owner, spec[1]) if isinstance(spec, tuple) and spec[0] == "call_module"
               else spec[1] if isinstance(spec, tuple) and spec[0] == "call_function"
               else f"Tensor.{spec[1]}" if isinstance(spec, tuple) else "")
    return Fusion(name, fused.activation, fused.negative_slope, fused.alpha, act, owner, kind)


def _unconvert_graph_module(name, gm, undone, handled):
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_module":
            target = node.target
        elif (node.op == "call_function" and node.target is _residual_call
              and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr"):
            target = node.args[0].target
        else:
            continue
        try:
            fused = gm.get_submodule(target)
        except AttributeError:
            continue
        mark = fused.__dict__.get(_MARK) if isinstance(fused, _BatchNormAct) else None
        if not mark or id(fused) in handled:
            continue
        if node.op == "call_module" and mark["kind"] == "graph":
            with graph.inserting_after(node):
                new = _act_node(gm, graph, fused, mark["act"], node)
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        elif node.op == "call_function" and mark["kind"] == "residual":
            # Back to bn(x), the original add (operand order kept), the activation.
            module, x, z, add, bn_first = node.args
            with graph.inserting_before(node):
                bn_node = graph.call_module(target, (x,))
                op, add_target = _ADDS[add]
                add_node = graph.create_node(op, add_target,
                                             (bn_node, z) if bn_first else (z, bn_node))
                new = _act_node(gm, graph, fused, mark["act"], add_node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if not module.users:
                graph.erase_node(module)
        else:
            continue
        undone.append(_undo_record(fused, _qual(name, target), name, mark["kind"]))
        _set_submodule(gm, target, _to_bn(fused))
        handled.add(id(fused))
        changed = True
    if changed:
        graph.lint()
        gm.recompile()


def _act_node(gm, graph, fused, spec, inp):
    """The activation node that ``convert`` removed, re-created on ``inp``."""
    op, target, rest, kwargs = spec
    if op == "call_module" and _has_plain_act(gm, target):
        return graph.call_module(target, (inp,))
    if op == "call_method":
        return graph.call_method(target, (inp,) + tuple(rest), dict(kwargs))
    if op == "call_function":
        return graph.call_function(_FUNCTIONS[target][0], (inp,) + tuple(rest), dict(kwargs))
    # the activation module was deleted from the GraphModule since
    return graph.call_function(*_functional_for(fused, inp))


def _has_plain_act(gm, target):
    try:
        return _is_plain_act(gm.get_submodule(target))
    except AttributeError:
        return False


def _functional_for(fused, node):
    if fused.activation == "leaky_relu":
        return F.leaky_relu, (node, fused.negative_slope)
    if fused.activation == "elu":
        return F.elu, (node, fused.alpha)
    return F.relu, (node,)
