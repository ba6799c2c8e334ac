"""The class of a graph-rewritten module: a generated subclass of its own class.

The module keeps its identity, attributes and class: its class is swapped for
a generated subclass of the original class (same name, same module,
``isinstance`` unchanged) whose ``forward`` is the rewritten graph's code
(compiled from the source torch.fx generates). If the traced graph depends on
``self.training`` the forward dispatches on ``self.training`` between the two
graphs. Pickling a converted model (``torch.save(model)``) works: the
generated forward travels as source (:class:`_Code`). ``torch.jit.script`` of
a graph-rewritten module is not supported (``unconvert`` first).

(A ``torch.fx.GraphModule`` would not do: ``convert`` works in place and the
model keeps its class, ``convert(model) is model``.)
"""
import importlib
import linecache
import types
import weakref


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

