"""The model registry: zoo names -> factories, and ``package.module:factory`` user models.

Every factory takes ``num_classes`` and ``input_shape`` (C, H, W) plus its own keyword
options. The registry fills in the model's defaults, checks the options against the
factory's signature, and stamps ``model.default_input_shape`` on what it builds so that
cost analysis can always make an example input.
"""

from __future__ import annotations

import importlib
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import LowbitError

__all__ = [
    "ModelError",
    "available",
    "build",
    "create",
    "default_input_shape",
    "describe",
    "load_factory",
    "register",
]

Shape = tuple[int, int, int]
_SPEC_FORM = "package.module:factory"


class ModelError(LowbitError, ValueError):
    """A model name, factory spec, option or input shape is not usable."""


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    input_shape: Shape
    num_classes: int


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str,
    description: str = "",
    *,
    input_shape: Shape = (3, 32, 32),
    num_classes: int = 10,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a factory to the zoo under ``name``.

    ``input_shape`` and ``num_classes`` are the model's natural defaults, used when the
    caller passes None. The factory must accept ``num_classes`` and ``input_shape``.
    """
    if not name or ":" in name:
        raise ValueError(f"bad model name {name!r}")
    shape = _check_shape(input_shape)

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].factory is not fn:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = _Entry(name, fn, doc, shape, int(num_classes))
        return fn

    return deco


def available() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelError(_unknown_message(name)) from None


def _unknown_message(name: object) -> str:
    return (
        f"unknown model {name!r}; choose one of: {', '.join(available())}, "
        f"or give your own as {_SPEC_FORM}"
    )


def describe(name: str) -> str:
    """One-line description of a zoo model."""
    return _entry(name).description


def default_input_shape(name: str) -> Shape:
    """The (C, H, W) input a zoo model is built for when no ``input_shape`` is given.

    For a ``package.module:factory`` spec, the default of the factory's ``input_shape``
    parameter, when it has one.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name].input_shape
    if isinstance(name, str) and ":" in name:
        fn = load_factory(name)
        try:
            param = inspect.signature(fn).parameters.get("input_shape")
        except (TypeError, ValueError):
            param = None
        if param is not None and param.default not in (inspect.Parameter.empty, None):
            return _check_shape(param.default)
        raise ModelError(f"model factory {name!r} has no default input_shape; pass one")
    raise ModelError(_unknown_message(name))


def default_num_classes(name: str) -> int:
    """The number of classes a zoo model gets when ``num_classes`` is None."""
    return _entry(name).num_classes


# ----------------------------------------------------------------------------- checks


def _check_shape(shape: Any) -> Shape:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ModelError(f"input_shape must be three positive integers (C, H, W), got {shape!r}")
    return dims  # type: ignore[return-value]


def _check_classes(num_classes: Any) -> int:
    try:
        n = operator.index(num_classes)
    except TypeError:
        n = 0
    if isinstance(num_classes, bool) or n < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    return n


def _options(fn: Callable) -> tuple[list[str], bool] | None:
    """The keyword options of ``fn`` besides num_classes/input_shape, and whether it takes
    **kwargs. None when the signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("num_classes", "input_shape")
    ]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return names, var_kw


def _accepts(fn: Callable, arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True  # cannot tell: pass it and let the call decide
    if arg in params and params[arg].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    ):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params.values())


def _call(label: str, fn: Callable, call_kw: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    sig = _options(fn)
    if sig is not None:
        names, var_kw = sig
        bad = sorted(k for k in options if k not in names)
        if bad and not var_kw:
            valid = ", ".join(names) if names else "none"
            raise ModelError(
                f"model {label} got unknown option(s) {', '.join(bad)}; valid options: {valid}"
            )
    try:
        model = fn(**call_kw, **options)
    except TypeError as e:
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ModelError(f"cannot build model {label} with {opts}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {label} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


# ----------------------------------------------------------------------------- building


def create(
    name: str,
    num_classes: int | None = None,
    input_shape: Shape | None = None,
    **kw: Any,
) -> nn.Module:
    """Build zoo model ``name``. None means the model's default (10 classes, except
    ``mobilenetv2_224``: 1000; the input shape from :func:`default_input_shape`).

    A ``package.module:factory`` spec is handed to :func:`build`.
    """
    if isinstance(name, str) and ":" in name and name not in _REGISTRY:
        return build(name, num_classes, input_shape, **kw)
    entry = _entry(name)
    nc = entry.num_classes if num_classes is None else _check_classes(num_classes)
    shape = entry.input_shape if input_shape is None else _check_shape(input_shape)
    model = _call(repr(name), entry.factory, {"num_classes": nc, "input_shape": shape}, kw)
    model.default_input_shape = shape
    return model


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """``"package.module:factory"`` -> the callable (``factory`` may be dotted, e.g.
    ``Class.method``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ModelError(f"model spec must look like {_SPEC_FORM}, got {spec!r}")
    mod_name, attr = (s.strip() for s in spec.split(":"))
    if not mod_name or not attr:
        raise ModelError(f"model spec must look like {_SPEC_FORM}, got {spec!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import module {mod_name!r} of model spec {spec!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(
                f"module {mod_name!r} has no attribute {attr!r} (model spec {spec!r})"
            ) from None
    if not callable(obj):
        raise ModelError(f"{spec!r} is a {type(obj).__name__}, not a callable model factory")
    return obj


def build(
    spec_or_name: str | Callable[..., nn.Module],
    num_classes: int | None = None,
    input_shape: Shape | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a zoo model by name, or a user model from ``package.module:factory`` (or a
    callable). A user factory gets ``num_classes`` and ``input_shape`` only when they are
    given and its signature accepts them (or takes ``**kwargs``)."""
    if isinstance(spec_or_name, str) and spec_or_name in _REGISTRY:
        return create(spec_or_name, num_classes, input_shape, **kw)
    if callable(spec_or_name):
        fn, label = spec_or_name, getattr(spec_or_name, "__qualname__", repr(spec_or_name))
    elif isinstance(spec_or_name, str) and ":" in spec_or_name:
        fn, label = load_factory(spec_or_name), repr(spec_or_name)
    else:
        raise ModelError(_unknown_message(spec_or_name))
    shape = None if input_shape is None else _check_shape(input_shape)
    call_kw: dict[str, Any] = {}
    if num_classes is not None and _accepts(fn, "num_classes"):
        call_kw["num_classes"] = _check_classes(num_classes)
    if shape is not None and _accepts(fn, "input_shape"):
        call_kw["input_shape"] = shape
    model = _call(label, fn, call_kw, kw)
    if shape is not None:
        model.default_input_shape = shape
    elif getattr(model, "default_input_shape", None) is None:
        try:
            model.default_input_shape = default_input_shape(spec_or_name)  # type: ignore[arg-type]
        except ModelError:
            pass  # unknown: cost analysis will have to be given a shape
    return model


# ----------------------------------------------------------------------------- option parsing
# Options may arrive as strings (``--model-arg width=0.5``); the factories parse them here.


def opt_float(name: str, value: Any, *, positive: bool = True) -> float:
    """``value`` as a float (strings accepted); ModelError naming the option otherwise."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ModelError(f"option {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or x != x or (positive and not x > 0):
        raise ModelError(f"option {name} must be a positive number, got {value!r}")
    return x


def opt_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: True/False, 1/0 or the strings true/false/yes/no/on/off/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
    raise ModelError(f"option {name} must be true or false, got {value!r}")


def opt_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (case-insensitive)."""
    v = str(value).strip()
    for c in choices:
        if v.lower() == c.lower():
            return c
    raise ModelError(f"option {name} must be one of {', '.join(choices)}, got {value!r}")


def scale_channels(channels: int, width: float) -> int:
    """Plain width scaling: ``round(channels * width)``, at least 1."""
    return max(1, int(round(channels * width)))
