"""The class of a graph-rewritten module: a generated subclass of its own class.

The module keeps its identity, attributes and class: its class is swapped for
a generated subclass of the original class (same name, same module,
``isinstance`` unchanged) whose ``forward`` is the rewritten graph's code
(compiled from the source torch.fx generates). If the traced graph depends on
``self.training`` the forward dispatches on ``self.training`` between the two
graphs. A forward that tests an argument's type (``tracing._type_tests``)
runs the graph only for arguments that pass none of the tests, and the
original forward, with the fused modules acting as plain BatchNorms, for the
others. Pickling a converted model (``torch.save(model)``) works: the
generated forward travels as source (:class:`_Code`). ``torch.jit.script`` of
a graph-rewritten module is not supported (``unconvert`` first).

(A ``torch.fx.GraphModule`` would not do: ``convert`` works in place and the
model keeps its class, ``convert(model) is model``.)
"""
import importlib
import inspect
import linecache
import types
import weakref

from torch.nn.modules.batchnorm import _BatchNorm

from .swap import _OWNED


class _Code:
    """The generated forward(s) of a graph-rewritten module: ((mode, src, globals), ...)
    with mode "any", or "train" and "eval", and the type tests that send a call to
    the original forward ((argument, classes), ...). Immutable; pickles with
    module globals by name."""

    def __init__(self, variants, type_tests=()):
        self.variants = tuple((mode, src, dict(glb)) for mode, src, glb in variants)
        self.type_tests = tuple(type_tests)
        self.key = (tuple((mode, src, tuple(sorted((k, id(v)) for k, v in glb.items())))
                          for mode, src, glb in self.variants),
                    tuple((arg, id(classes)) for arg, classes in self.type_tests))

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        encoded = tuple(
            (mode, src, tuple((k, True, v.__name__) if isinstance(v, types.ModuleType)
                              else (k, False, v) for k, v in glb.items()))
            for mode, src, glb in self.variants)
        return _decode_code, (encoded, self.type_tests)


def _decode_code(encoded, type_tests=()):
    return _Code(((mode, src, {k: importlib.import_module(v) if is_module else v
                               for k, is_module, v in glb})
                  for mode, src, glb in encoded), type_tests)


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


def _make_guarded(graph_fn, original, type_tests):
    """The forward of a module whose traced graph holds only for arguments that
    pass none of ``type_tests``: the others go to the original forward."""
    sig = inspect.signature(original)

    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs).arguments
        if any(isinstance(bound.get(arg), classes) for arg, classes in type_tests):
            return _unfused_call(self, original, args, kwargs)
        return graph_fn(self, *args, **kwargs)
    forward.__wrapped__ = graph_fn
    return forward


def _unfused_call(self, original, args, kwargs):
    """``original(self, ...)`` with the fused modules of this forward computing
    their plain BatchNorm (the original forward applies the activation and the
    add itself). They get an instance ``forward`` for the call: not thread-safe
    against another thread calling the same module at the same time."""
    fused = [self.get_submodule(path) for path in self.__dict__.get(_OWNED, ())]
    for m in fused:
        m.forward = types.MethodType(_BatchNorm.forward, m)
    try:
        return original(self, *args, **kwargs)
    finally:
        for m in fused:
            m.__dict__.pop("forward", None)


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
    if code.type_tests:
        forward = _make_guarded(forward, base.forward, code.type_tests)
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

