"""``fusedbn.convert``: find the pairs (``patterns.py``) and rewrite them.

Pairs are found in two ways:

* **nn.Sequential** (or a subclass that keeps ``Sequential.forward``):
  neighbours ``BN, act`` become ``BatchNormAct, nn.Identity()``, so indices
  and state_dict keys of the other layers do not move.
* **forward() of any other module with children**, through ``torch.fx``
  symbolic tracing of that module alone (``tracing.py``). The BatchNorm must
  be a direct child, or sit in ModuleList / ModuleDict / plain ``nn.Module``
  containers below it. In the graph the BatchNorm ``call_module`` keeps its
  target (the fused module is installed under the BN's qualified name) and
  the activation node is deleted; the module gets a generated class whose
  forward is that graph (``generated.py``). Activation modules are never
  removed (they may be used elsewhere, e.g. after another add). A
  ``torch.fx.GraphModule`` given to ``convert`` is rewritten in its own graph
  (``recompile()``), not retraced.
"""
import copy
import warnings
from collections import Counter, defaultdict

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _reference
from .generated import _Code, _converted_class, _original_class
from .patterns import (_ADDS, Fusion, _container_path, _graph_candidates, _is_container,
                       _is_plain_act, _is_plain_bn, _is_sequential, _module_act_config, _qual,
                       _set_submodule, _subtree_has_bn)
from .swap import _CONSTANTS, _OWNED, _to_fused
from .tracing import _no_rewrite_reason, _Owner, _trace_variants, _Untraceable


def _residual_call(bn, x, z, add, bn_first):
    """What a residual fusion's graph node calls: ``act(bn(x) + z)`` as one fused
    kernel when ``z`` is a tensor of ``x``'s shape, dtype, device and layout (what
    the kernel supports), else the unfused original: the BatchNorm forward of
    ``nn.BatchNorm`` (same running-stat update, once), the original add with its
    operand order (same broadcasting, type promotion and errors), the activation.
    Shapes are unknown at trace time, so the choice is made here, per call.

    bn: the fused module; add: a name in ``_ADDS``; bn_first: whether the BN
    output was the add's first operand. Forward hooks registered on the fused
    module later are not called on the unfused path.
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
    fn, args, kwargs = _functional_for(bn, s)
    return fn(*args, **kwargs)


def _functional_for(fused, node):
    """``(fn, args, kwargs)``: ``fn(*args, **kwargs)`` is the fused module's activation
    applied to ``node`` (a value, or a graph node to call it on)."""
    fn, rest, kwargs = _reference.functional(fused.activation, **_reference.params_of(fused))
    return fn, (node,) + rest, kwargs


def _warn(msg):
    warnings.warn(msg, UserWarning, stacklevel=4)


def _describe(name, module):
    where = f"submodule {name!r}" if name else "the model"
    return f"{where} ({_original_class(module).__name__})"


def _convert(model, trace, exclude):
    """Find and fuse the pairs below ``model``; returns the Fusion records.

    A pair is left alone when the BatchNorm's output has another user besides
    the activation (or the add, in the residual form; this includes an in-place
    activation on a tensor used elsewhere), when the BatchNorm module is shared
    (registered at two places, or called from two places, e.g. a Sequential
    element that some forward also calls directly), or when the activation slot
    of a Sequential is also called from a traced forward. A BatchNorm called in
    both the train and the eval graph of a forward must have the same
    activation and form in both (one fused module serves both).
    """
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
    """Fuse the ``chosen`` pairs in the owner's graph(s), install the fused
    modules, and give the owner its new forward: a GraphModule recompiles, any
    other module gets a generated class (``generated.py``)."""
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
    """The BN call, the add and the activation become one node
    ``_residual_call(self.<bn>, x, z, add, bn_first)`` at the add's place, so
    that ``z`` is read when eager reads it (torchvision computes the downsample
    shortcut between bn3 and the add); ``patterns._can_move_to`` said the BN
    call may move there."""
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
    ``BatchNormAct{1,2,3}d``. What a pair is: ``fusedbn.convert.patterns``; how
    Sequential pairs and forwards are rewritten: ``fusedbn.convert.rewrite``.

    inplace: convert ``model`` itself (default; parameters are shared, so an
        existing optimizer stays valid), or a deep copy of it when False.
    report: also return the list of :class:`Fusion` records, ``(model, fusions)``.
    trace: False converts Sequential neighbours only, without torch.fx.
    exclude: qualified names of submodules left untouched, with everything below.

    Untraceable modules are left as they are with a ``UserWarning`` (their
    children are still converted). State_dict keys do not change.

    Limitations (``fusedbn.convert.tracing`` says what a traced forward cannot
    keep; use ``trace=False`` (Sequential pairs only) or ``exclude=`` when in
    doubt):

    * a forward with parameters with default values (or ``**kwargs``), or
      whose source uses ``no_grad`` / ``enable_grad`` / ``set_grad_enabled`` /
      ``inference_mode`` / ``autocast``, is not rewritten (a warning names it
      when it holds pairs; its children are still converted);
    * a pair whose BatchNorm and activation live in different modules'
      forwards (e.g. a Sequential ending in BN followed by ``F.relu`` in the
      parent) is not fused;
    * another method than ``forward`` that calls the BatchNorm directly (and
      is called from outside) would get the fused module;
    * ``SyncBatchNorm`` is never converted;
    * a converted model pickles (``torch.save(model)``); ``torch.jit.script``
      of a graph-rewritten module is not supported (``unconvert`` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedbn.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fusions = _convert(model, trace, (exclude,) if isinstance(exclude, str) else tuple(exclude))
    return (model, fusions) if report else model


