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
import inspect
import warnings
from collections import Counter, defaultdict

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _reference
from ..modules import _BatchNormAct
from .generated import _Code, _converted_class, _original_class
from .patterns import (_ADDS, _BN_TO_FUSED, Fusion, _bn_at, _container_path, _graph_candidates,
                       _has_hooks, _is_container, _is_plain_act, _is_plain_bn, _is_sequential,
                       _module_act_config, _qual, _set_submodule, _source_pairs,
                       _subtree_has_bn)
from .report import Left, Report
from .swap import _CONSTANTS, _OWNED, _to_fused
from .tracing import (_graph_module_variants, _no_rewrite_reason, _Owner, _trace_variants,
                      _type_tests, _Untraceable)


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
    if bn.activation == "identity":
        return s
    fn, args, kwargs = _functional_for(bn, s)
    return fn(*args, **kwargs)


def _tail_residual_call(seq, x, z, add, bn_first):
    """``_residual_call`` for a BatchNorm at the end of a plain Sequential (``x
    + self.conv(x)``): the Sequential's elements in order, the last one (the
    fused module, or a Sequential ending in it) with the residual. Hooks
    registered on the Sequential after the conversion are not called."""
    for a in (x, z):
        if isinstance(a, torch.fx.Proxy):
            return a.tracer.create_proxy("call_function", _tail_residual_call,
                                         (seq, x, z, add, bn_first), {})
    *head, last = [m for m in seq._modules.values() if m is not None]
    for m in head:
        x = m(x)
    if isinstance(last, nn.Sequential):
        return _tail_residual_call(last, x, z, add, bn_first)
    return _residual_call(last, x, z, add, bn_first)


def _functional_for(fused, node):
    """``(fn, args, kwargs)``: ``fn(*args, **kwargs)`` is the fused module's activation
    applied to ``node`` (a value, or a graph node to call it on)."""
    fn, rest, kwargs = _reference.functional(fused.activation, **_reference.params_of(fused))
    return fn, (node,) + rest, kwargs


def _describe(name, module):
    where = f"submodule {name!r}" if name else "the model"
    return f"{where} ({_original_class(module).__name__})"


def _warn_skipped(skipped):
    """One warning for all the forwards left as they are: a line per class and
    reason (densenet121(memory_efficient=True) has 58 such layers)."""
    groups = {}
    for name, m, reason in skipped:
        groups.setdefault((_original_class(m).__name__, reason), []).append((name, m))
    lines = []
    for (cls, reason), members in groups.items():
        more = (f" (and {len(members) - 1} more {cls} modules, same reason)"
                if len(members) > 1 else "")
        lines.append(f"{_describe(*members[0])}: {reason}{more}")
    warnings.warn("fusedbn.convert: forwards left as they are (their children were converted "
                  "on their own where possible; convert(..., report=True) lists every module "
                  "and BatchNorm left, and why):\n  " + "\n  ".join(lines),
                  UserWarning, stacklevel=4)


def _users(owner, node):
    """What a graph node's value feeds, in words."""
    if not node.users:
        return "nothing"
    out = []
    for u in node.users:
        if u.op == "call_module":
            try:
                cls = type(owner.module.get_submodule(u.target)).__name__
            except AttributeError:
                cls = "?"
            out.append(f"{_qual(owner.name, u.target)} ({cls})")
        elif u.op == "call_function":
            out.append(getattr(u.target, "__name__", str(u.target)))
        elif u.op == "call_method":
            out.append(f"Tensor.{u.target}")
        elif u.op == "output":
            out.append(f"the output of {owner.name or 'the model'}'s forward")
        else:
            out.append(u.op)
    return ", ".join(out)


def _checkpoint_hint(m):
    """Say that an untraceable forward uses activation checkpointing
    (densenet's memory_efficient layers): the usual reason it is not traced."""
    try:
        src = inspect.getsource(_original_class(m))
    except (OSError, TypeError):
        return ""
    if "checkpoint" not in src:
        return ""
    return ("; it runs part of its forward under torch.utils.checkpoint, which convert does "
            "not trace through (only pairs its source calls as self.act(self.bn(x)) can be "
            "fused there)")


def _not_plain_reason(m):
    if type(m) not in _BN_TO_FUSED:
        return (f"a {type(m).__name__}, not exactly nn.BatchNorm1d/2d/3d (a subclass or "
                "SyncBatchNorm may compute something else)")
    if _has_hooks(m):
        return "has hooks, which a fused module would not call with the BatchNorm's output"
    return "has parameters, buffers, submodules or a forward of its own beyond nn.BatchNorm's"


def _convert(model, trace, exclude):
    """Find and fuse the pairs below ``model``; returns the :class:`Report`.

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
    skipped = []                # (name, module, reason): forwards holding BNs left as they are
    reasons = {}                # id(BN) -> why it is left
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
                else:
                    reasons.setdefault(id(b), f"followed by {type(a).__name__} in the "
                                              f"Sequential {name or '(the model)'}")
            if slots:
                reasons.setdefault(id(slots[-1][1]), "the last element of the Sequential "
                                                     f"{name or '(the model)'}")
            continue
        if _is_container(m) or not trace or not _subtree_has_bn(m):
            continue
        if isinstance(m, torch.fx.GraphModule):
            variants, refusal = _graph_module_variants(m)
            if refusal:
                skipped.append((name, m, refusal))
                continue
            owner = _Owner(name, m, variants, {}, True)
        else:
            try:
                variants, constants = _trace_variants(m)
            except _Untraceable as e:
                skipped.append((name, m, f"torch.fx could not trace its forward ({e})"
                                          f"{_checkpoint_hint(m)}"))
                continue
            owner = _Owner(name, m, variants, constants, False)
            owner.no_rewrite = _no_rewrite_reason(m)
            owner.type_tests = _type_tests(m)
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
        if id(bn) in excluded or id(act) in excluded:
            continue
        if in_tree[id(bn)] != 1 or sites[id(bn)] != ["seq"]:
            reasons[id(bn)] = "the BatchNorm is registered or called at more than one place"
            continue
        if any(s != "seq" for s in sites[id(act)]):
            reasons[id(bn)] = f"its activation {_qual(seq_name, ka)} is also called elsewhere"
            continue
        activation, params = _module_act_config(act)
        fused = _to_fused(bn, activation, params, {"kind": "sequential", "act": act})
        setattr(seq, kb, fused)
        identity = nn.Identity()
        identity.train(act.training)
        setattr(seq, ka, identity)
        fusions.append(Fusion.of(_qual(seq_name, kb), activation, params, _qual(seq_name, ka),
                                 seq_name, "sequential"))

    # Graph pairs.
    for owner in owners:
        chosen = _choose(owner, sites, in_tree, excluded, reasons)
        if not chosen:
            continue
        if owner.no_rewrite:
            pairs = ", ".join(sorted(bn_path for bn_path, _ in chosen.values()))
            skipped.append((owner.name, owner.module,
                            f"{owner.no_rewrite} (pairs not fused: {pairs})"))
            continue
        _rewrite(owner, chosen, fusions)

    # Forwards left as they are: the pairs their source shows to be direct are
    # fused by swapping modules; what else they call directly is reported.
    for i, (name, m, reason) in enumerate(skipped):
        swapped = _swap_source_pairs(name, m, sites, in_tree, excluded, fusions)
        if swapped:
            skipped[i] = (name, m, f"{reason}; fused without tracing, as its source calls "
                                   f"them: {', '.join(swapped)}")
        for child_name, child in m.named_children():
            bn = _bn_at(child)
            if bn is not None:
                reasons[id(bn[0])] = (f"called from the forward of {_describe(name, m)}, "
                                      "which was left as it is (see its line)")
    # Warn only where BatchNorms stay unfused below such a forward (the report
    # lists all of them).
    unfused = [(name, m, reason) for name, m, reason in skipped if _subtree_has_bn(m)]
    if unfused:
        _warn_skipped(unfused)

    left, total, fused = [], 0, 0
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        total += 1
        if isinstance(m, _BatchNormAct):
            fused += 1
        elif id(m) in excluded:
            left.append(Left(name, "excluded"))
        elif not _is_plain_bn(m):
            left.append(Left(name, _not_plain_reason(m)))
        else:
            left.append(Left(name, reasons.get(id(m), "no activation or add after it was found "
                                                      "where it is called")))
    modules = [(name, f"{_original_class(m).__name__}: {reason}") for name, m, reason in skipped]
    return Report(fusions, left, modules, total, fused)


def _swap_source_pairs(name, m, sites, in_tree, excluded, fusions):
    """Fuse the pairs ``self.<act>(self.<bn>(...))`` of ``patterns._source_pairs`` in
    a module whose forward is not rewritten: the BatchNorm becomes the fused
    module and the activation slot an ``nn.Identity`` (as in a Sequential).
    Both must be plain, registered once, and called by no traced forward but
    this module's own. Returns the BatchNorms' names."""
    def only_here(x):
        return (in_tree[id(x)] == 1 and id(x) not in excluded
                and all(s != "seq" and s[0].module is m for s in sites[id(x)]))

    if isinstance(m, torch.fx.GraphModule):
        return []   # its forward is generated code: its class's source says nothing of it
    done = []
    for bn_attr, act_attr in _source_pairs(_original_class(m)):
        bn, act = m._modules.get(bn_attr), m._modules.get(act_attr)
        if not (_is_plain_bn(bn) and _is_plain_act(act) and only_here(bn) and only_here(act)):
            continue
        activation, params = _module_act_config(act)
        fused = _to_fused(bn, activation, params, {"kind": "swap", "act": act, "slot": act_attr})
        identity = nn.Identity()
        identity.train(act.training)
        setattr(m, bn_attr, fused)
        setattr(m, act_attr, identity)
        fusions.append(Fusion.of(_qual(name, bn_attr), activation, params,
                                 _qual(name, act_attr), name, "swap"))
        done.append(bn_attr)
    return done


def _choose(owner, sites, in_tree, excluded, reasons):
    """{target of the call: (BN path, [(variant index, bn node, act node, config,
    desc, spec, add)])}: the pairs of one owner's graph(s) to fuse. Records in
    ``reasons`` why the others are not."""
    candidates = [_graph_candidates(owner, g) for _, g in owner.variants]
    m = owner.module
    multi = len(owner.variants) > 1
    chosen = {}
    for index, (mode, graph) in enumerate(owner.variants):
        for node in graph.nodes:
            if node.op != "call_module" or node in candidates[index]:
                continue
            try:
                bn = _bn_at(m.get_submodule(node.target), owner.graph_module)
            except AttributeError:
                continue
            if bn is not None:
                where = f" (in the {mode} graph)" if multi else ""
                reasons[id(bn[0])] = f"its output feeds {_users(owner, node)}{where}"
    for target in {n.target for c in candidates for n in c}:
        found_bn = _bn_at(m.get_submodule(target), owner.graph_module)
        if found_bn is None:
            continue
        bn, tail, seqs = found_bn
        if id(bn) in excluded or any(id(s) in excluded for s in seqs):
            continue
        why = None
        if in_tree[id(bn)] != 1 or any(in_tree[id(s)] != 1 for s in seqs):
            why = "registered at more than one place in the model"
        elif not _container_path(m, target):
            why = f"called through {target!r}, which has a forward of its own"
        elif seqs and (sites[id(bn)] != ["seq"] or any(sites[id(s)] != ["seq"] for s in seqs[1:])):
            why = "also called elsewhere than at the end of its Sequential"
        call_sites = sites[id(seqs[0] if seqs else bn)]
        if why is None and any(s == "seq" or s[0] is not owner for s in call_sites):
            why = "also called elsewhere (another forward, or as a Sequential element)"
        if why is None and any(v != 1 for v in Counter(s[1] for s in call_sites).values()):
            why = "called more than once in one forward"
        found = []
        if why is None:
            for _, index, node in call_sites:
                if node not in candidates[index]:
                    why = (f"its output feeds {_users(owner, node)} in the "
                           f"{owner.variants[index][0]} graph")
                    break
                found.append((index, node) + candidates[index][node])
        # One fused module for all variants: same activation and form in each.
        if why is None and len({(f[3], f[6] and f[6][1:]) for f in found}) != 1:
            why = "its activation or form differs between the train and eval graphs"
        if why is not None:
            reasons[id(bn)] = why
            continue
        chosen[target] = (_qual(target, tail) if tail else target, found)
    return chosen


def _rewrite(owner, chosen, fusions):
    """Fuse the ``chosen`` pairs in the owner's graph(s), install the fused
    modules, and give the owner its new forward: a GraphModule recompiles, any
    other module gets a generated class (``generated.py``)."""
    m = owner.module
    for target, (bn_path, found) in sorted(chosen.items()):
        bn = m.get_submodule(bn_path)
        (activation, params), desc, spec, add = found[0][3:]
        params = dict(params)
        for index, bn_node, act_node, *_, add_info in found:
            graph = owner.variants[index][1]
            if add_info is None:
                act_node.replace_all_uses_with(bn_node)
                graph.erase_node(act_node)
            else:
                _fuse_residual(graph, target, bn_path != target, bn_node, act_node, *add_info)
        mark = {"kind": "graph", "act": spec}
        if add is not None:
            mark = {"kind": "residual", "act": spec, "add": add[1:]}
        fused = _to_fused(bn, activation, params, mark)
        _set_submodule(m, bn_path, fused)
        fusions.append(Fusion.of(_qual(owner.name, bn_path), activation, params, desc or "",
                                 owner.name, mark["kind"]))
    for _, graph in owner.variants:
        graph.lint()
    if owner.graph_module:
        m.recompile()
        return
    code = _Code(((mode, pc.src, pc.globals) for mode, pc in
                  ((mode, g.python_code("self")) for mode, g in owner.variants)),
                 owner.type_tests)
    for k, v in owner.constants.items():
        m.__dict__[k] = v
    owned = list(m.__dict__.get(_OWNED, ())) + sorted(p for p, _ in chosen.values())
    constants = list(m.__dict__.get(_CONSTANTS, ())) + sorted(owner.constants)
    m.__class__ = _converted_class(_original_class(m), code)
    m.__dict__[_OWNED] = owned
    m.__dict__[_CONSTANTS] = constants


def _fuse_residual(graph, target, tail, bn_node, act_node, add_node, add, bn_first):
    """The BN call, the add and the activation (if any) become one node
    ``_residual_call(self.<bn>, x, z, add, bn_first)`` at the add's place (or
    ``_tail_residual_call(self.<seq>, ...)`` when the BN ends the Sequential
    called there), so that ``z`` is read when eager reads it (torchvision
    computes the downsample shortcut between bn3 and the add);
    ``patterns._can_move_to`` said the BN call may move there."""
    # Operands are read now, not at analysis time: rewriting another pair may
    # have replaced one of them (e.g. the residual was that pair's activation).
    x = bn_node.args[0]
    z = add_node.args[1 if bn_first else 0]
    with graph.inserting_before(add_node):
        module = graph.get_attr(target)
        new = graph.call_function(_tail_residual_call if tail else _residual_call,
                                  (module, x, z, add, bn_first))
    last = add_node if act_node is None else act_node
    last.replace_all_uses_with(new)
    for node in (act_node, add_node, bn_node):
        if node is not None:
            graph.erase_node(node)


# ---------------------------------------------------------------- public API
def convert(model, inplace=True, *, report=False, trace=True, exclude=()):
    """Replace every BatchNorm -> activation pair in ``model`` by a fused
    ``BatchNormAct{1,2,3}d``, and every BatchNorm -> add (ResNet's bn3 +
    shortcut, MobileNetV2's projection + skip) by the fused residual form. What
    a pair is: ``fusedbn.convert.patterns``; how Sequential pairs and forwards
    are rewritten: ``fusedbn.convert.rewrite``.

    inplace: convert ``model`` itself (default; parameters are shared, so an
        existing optimizer stays valid), or a deep copy of it when False.
    report: also return a :class:`Report`, ``(model, report)``: the list of
        :class:`Fusion` records of this call, with ``.left`` (every BatchNorm
        not fused, and why), ``.modules`` (forwards left as they are) and
        ``str(report)`` as a table.
    trace: False converts Sequential neighbours only, without torch.fx.
    exclude: qualified names of submodules left untouched, with everything below.

    Forwards that are left as they are (untraceable, ...) with BatchNorms still
    unfused below them give one ``UserWarning`` per call, a line per class and
    reason (their children are still converted). State_dict keys do not change.

    Limitations (``fusedbn.convert.tracing`` says what a traced forward cannot
    keep; use ``trace=False`` (Sequential pairs only) or ``exclude=`` when in
    doubt):

    * a forward with parameters with default values (or ``**kwargs``), or
      whose source uses ``no_grad`` / ``enable_grad`` / ``set_grad_enabled`` /
      ``inference_mode`` / ``autocast``, is not rewritten (its children are
      still converted);
    * a forward that tests an argument's type (``isinstance(input, Tensor)``,
      as densenet's ``_DenseLayer`` does) runs the rewritten graph only for
      arguments of the type tracing assumed (none of those tested) and its
      original forward, unfused, for the others;
    * a pair whose BatchNorm and activation live in different modules'
      forwards is fused only when the BatchNorm ends a plain Sequential called
      from the forward that applies the activation or the add;
    * another method than ``forward`` that calls the BatchNorm directly (and
      is called from outside) would get the fused module;
    * a forward that is not rewritten (untraceable, e.g. under
      ``torch.utils.checkpoint`` as densenet's ``memory_efficient`` layers,
      or with optional arguments) still gets the pairs its class's source
      calls as ``self.act(self.bn(x))``, each name used nowhere else there,
      fused by swapping the two modules (``patterns._source_pairs``); an
      attribute reached from outside that source (``getattr(self, name)``, a
      parent's ``self.block.bn``) is not seen;
    * a GraphModule is rewritten in every graph it holds (torchvision's
      ``DualGraphModule`` keeps one per mode); a GraphModule subclass that
      overrides ``train`` or ``forward`` and holds no second graph is left
      as it is;
    * ``SyncBatchNorm`` is never converted;
    * a converted model pickles (``torch.save(model)``); ``torch.jit.script``
      of a graph-rewritten module is not supported (``unconvert`` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedbn.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    result = _convert(model, trace, (exclude,) if isinstance(exclude, str) else tuple(exclude))
    return (model, result) if report else model


