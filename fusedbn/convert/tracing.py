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
import ast
import builtins
import inspect
import textwrap

import torch
import torch.fx

from .generated import _original_class

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
                # (the first sentence: fx's messages go on with advice over several)
                msg = str(e).strip().splitlines()
                msg = msg[0].split(". ")[0] if msg else ""
                raise _Untraceable(f"{type(e).__name__}: {msg}") from None
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
    fn = inspect.unwrap(_original_class(module).forward)
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
    _, reason = _read_type_tests(module)
    if reason:
        return reason + "; the forward was not rewritten"
    used = [c for c in _GRAD_CONTEXTS if c in src]
    if used:
        return (f"its forward uses {', '.join(used)}, which torch.fx does not record; "
                "the forward was not rewritten")
    return None


def _type_tests(module):
    """[(argument, classes)] for each ``isinstance(arg, classes)`` or
    ``torch.is_tensor(arg)`` on an argument of the forward (its source, read
    with ast). fx traces every argument as a Proxy, which is an instance of
    none of them: the graph holds only for arguments that pass no such test
    (densenet's ``_DenseLayer`` takes a Tensor or a list and was traced as a
    list), and the rewritten forward guards on it (``generated.py``). Classes
    must be plain names or attributes (``Tensor``, ``torch.Tensor``, a tuple
    of them); for anything else ``_no_rewrite_reason`` refuses the rewrite."""
    tests, _ = _read_type_tests(module)
    return tests


def _read_type_tests(module):
    """(tests, reason a test cannot be guarded or None)."""
    fn = inspect.unwrap(_original_class(module).forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        names = list(inspect.signature(fn).parameters)[1:]
    except (OSError, TypeError, ValueError, SyntaxError):
        return [], None
    tests = []
    scope = {**vars(builtins), **fn.__globals__, **inspect.getclosurevars(fn).nonlocals}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name)
                and node.args[0].id in names):
            continue
        arg, func = node.args[0].id, ast.unparse(node.func)
        if func in ("torch.is_tensor", "is_tensor"):
            tests.append((arg, torch.Tensor))
        elif func == "type":
            return [], f"its forward tests type({arg}), which torch.fx traces as a Proxy"
        elif func == "isinstance" and len(node.args) == 2:
            expr = node.args[1]
            plain = all(isinstance(n, (ast.Name, ast.Attribute, ast.Tuple, ast.Load))
                        for n in ast.walk(expr))
            try:
                classes = eval(compile(ast.Expression(expr), "<isinstance>", "eval"), scope) \
                    if plain else None
            except Exception:  # noqa: BLE001 -- any failure: not a guard we can build
                classes = None
            if not (isinstance(classes, type) or (isinstance(classes, tuple) and all(
                    isinstance(c, type) for c in classes))):
                return [], (f"its forward tests isinstance({arg}, {ast.unparse(expr)}), "
                            "which convert cannot evaluate to guard the traced graph")
            tests.append((arg, classes))
    return tests, None


class _Owner:
    """A module whose forward graph(s) we looked at."""

    def __init__(self, name, module, variants, constants, graph_module):
        self.name = name
        self.module = module
        self.variants = variants          # [(mode, Graph)]
        self.constants = constants
        self.graph_module = graph_module  # True: module is a torch.fx.GraphModule
        self.no_rewrite = None            # reason, when the forward must not be rewritten
        self.type_tests = ()              # _type_tests: when to run the original forward


def _graphs_of(gm):
    """Every fx.Graph a GraphModule holds: its graph and any other one among its
    attributes (torchvision's DualGraphModule keeps ``train_graph`` and
    ``eval_graph`` and sets ``self.graph`` to one of them in ``train()``)."""
    graphs = [gm.graph]
    for v in gm.__dict__.values():
        if isinstance(v, torch.fx.Graph) and all(v is not g for g in graphs):
            graphs.append(v)
    return graphs


def _graph_module_variants(gm):
    """([(mode, graph)] to rewrite, None) or ([], why the GraphModule is left as it is).

    Every graph found is rewritten (one fused module serves all). A subclass
    that overrides ``train``, ``forward`` or ``__call__`` but holds no second
    graph where we look may switch to a graph we cannot see: rewriting only
    the current one would give a different model after ``.train()`` /
    ``.eval()``, so it is refused."""
    graphs = _graphs_of(gm)
    if len(graphs) == 1:
        for cls in type(gm).__mro__:
            if cls is torch.fx.GraphModule:
                break
            if "_wrapped_call" in cls.__dict__:
                continue  # the per-instance class where recompile() installs the forward
            own = [k for k in ("train", "forward", "__call__", "_call_impl") if k in cls.__dict__]
            if own:
                return [], (f"a GraphModule subclass ({cls.__name__}) that overrides "
                            f"{', '.join(own)} and holds no second graph convert can see: it "
                            "may switch to a graph convert would not rewrite")
    if len(graphs) == 1:
        return [("any", graphs[0])], None
    names = {id(g): k for k, g in gm.__dict__.items() if k != "_graph" and g in graphs}
    return [(names.get(id(g), "graph"), g) for g in graphs], None

