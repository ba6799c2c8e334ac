"""Tracing one module's own forward with torch.fx, for ``fusedbn.convert``.

Each module with children (other than a Sequential or a plain container) is
traced on its own (:class:`_ShallowTracer`: its children are leaves, each
child is handled on its own, recursively). Modules that torch.fx cannot trace
(data-dependent control flow, ...) are left as they are, with a
``warnings.warn`` naming them and why; their children are still converted
(Sequential children structurally, other children by tracing them on their
own). Such a module's forward is not seen, so a Sequential child is converted
even if that forward called one of its elements directly.

The rewritten forward is the torch.fx graph: Python-level behaviour that fx
does not record is specialised at conversion time -- branches on non-tensor
attributes (``if self.downsample is not None``; changing such an attribute
later is not seen), side effects, context managers, and tests on arguments
(fx passes every argument as a tensor proxy, so ``if mask is None`` would be
frozen). Hence a module whose forward assigns attributes while being traced
is treated as untraceable (:func:`_trace_variants`), and a forward that has
parameters with default values (or ``**kwargs``), or whose source uses one of
``_GRAD_CONTEXTS``, is not rewritten (:func:`_no_rewrite_reason`). torch.fx
also records ``out += z`` on a tensor as ``out + z`` (the traced graph, hence
the rewritten forward, does not write into ``out``); this holds for every
rewritten forward, fused or not.
"""
import inspect

import torch
import torch.fx

_GRAD_CONTEXTS = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast")


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


class _Owner:
    """A module whose forward graph(s) we looked at."""

    def __init__(self, name, module, variants, constants, graph_module):
        self.name = name
        self.module = module
        self.variants = variants          # [(mode, Graph)]
        self.constants = constants
        self.graph_module = graph_module  # True: module is a torch.fx.GraphModule
        self.no_rewrite = None            # reason, when the forward must not be rewritten

