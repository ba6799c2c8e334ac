"""``fusedbn.unconvert``: undo what ``convert`` did, from what it recorded."""
import copy
import warnings

import torch
import torch.fx
import torch.nn as nn

from .. import _reference
from ..modules import _BatchNormAct
from .patterns import (_ADDS, _FUNCTIONS, Fusion, _is_plain_act, _is_sequential, _qual,
                       _set_submodule)
from .rewrite import _functional_for, _residual_call
from .swap import _CONSTANTS, _MARK, _OWNED, _to_bn
from .tracing import _graphs_of


def unconvert(model, inplace=True, *, report=False):
    """Undo :func:`convert`: fused modules it created become the original
    ``nn.BatchNormNd`` again (same tensors, same names), Sequential activation
    slots get the original activation module object back in place of the
    Identity, graph-rewritten modules their original class (hence their
    original forward, which still calls the activation). A GraphModule gets
    its activation nodes back after the BatchNorm call (residual form: the
    BatchNorm call, the add with its operand order and the activation replace
    the ``_residual_call`` node). State_dict keys do not change in either
    direction: the state_dict of a converted model loads into the original
    model and vice versa (strict). Fused modules that ``convert`` did not
    create are left in place with a warning. Returns the model, or
    ``(model, [Fusion, ...])`` with ``report=True``.
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
        if isinstance(m, _BatchNormAct) and m.__dict__.get(_MARK, {}).get("kind") == "swap":
            # a pair fused by swapping modules (rewrite._swap_source_pairs)
            parent_name, _, bn_attr = name.rpartition(".")
            parent, mark = model.get_submodule(parent_name), m.__dict__[_MARK]
            if type(parent._modules.get(mark["slot"])) is nn.Identity:
                undone.append(_undo_record(m, name, parent_name, "swap",
                                           _qual(parent_name, mark["slot"])))
                setattr(parent, bn_attr, _to_bn(m))
                setattr(parent, mark["slot"], mark["act"])
                handled.add(id(m))
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
    params = _reference.used_params(fused.activation, **_reference.params_of(fused))
    return Fusion.of(name, fused.activation, params, act, owner, kind)


def _unconvert_graph_module(name, gm, undone, handled):
    """Every graph of ``gm`` (``tracing._graphs_of``) gets its BN calls, adds
    and activations back; each fused module is recorded and swapped once."""
    changed = {}
    for graph in _graphs_of(gm):
        changed.update(_unconvert_graph(gm, graph, handled))
    for target, fused in changed.items():
        undone.append(_undo_record(fused, _qual(name, target), name, fused.__dict__[_MARK]["kind"]))
        _set_submodule(gm, target, _to_bn(fused))
        handled.add(id(fused))
    if changed:
        gm.recompile()


def _unconvert_graph(gm, graph, handled):
    """{target: fused module} of the fusions undone in one graph."""
    changed = {}
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
        changed[target] = fused
    if changed:
        graph.lint()
    return changed


def _act_node(gm, graph, fused, spec, inp):
    """The activation node that ``convert`` removed, re-created on ``inp``."""
    if spec is None:     # the residual form with no activation after the add
        return inp
    op, target, rest, kwargs = spec
    if op == "call_module" and _has_plain_act(gm, target):
        return graph.call_module(target, (inp,))
    if op == "call_method":
        return graph.call_method(target, (inp,) + tuple(rest), dict(kwargs))
    if op == "call_function":
        return graph.call_function(_FUNCTIONS[target][0], (inp,) + tuple(rest), dict(kwargs))
    # the activation module was deleted from the GraphModule since
    fn, args, kwargs = _functional_for(fused, inp)
    return graph.call_function(fn, args, kwargs)


def _has_plain_act(gm, target):
    try:
        return _is_plain_act(gm.get_submodule(target))
    except AttributeError:
        return False

