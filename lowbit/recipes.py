"""Recipes: which codec goes on which layer, plus the method's training hooks.

A recipe is a list of rules applied in order; for each layer the *last* matching rule
wins. A rule selects layers by kind, in execution order on an example input:

- ``all``: every Conv2d and Linear;
- ``first`` / ``last``: the first / last Conv2d or Linear executed;
- ``pointwise``: 1x1 convolutions with groups = 1;
- ``depthwise``: convolutions with groups = in_channels (> 1);
- ``conv``: every other convolution;
- ``linear``: Linear layers;

or several kinds joined by ``+`` (``first+conv``: the first layer, if it is a convolution),
or by name, with ``name = "glob"`` (``fnmatch`` on the module's qualified name).

TOML (or YAML) form::

    method = "prom"
    [[rules]]
    select = "all"
    weights = "int8"
    activations = "int8"
    [[rules]]
    select = "pointwise"
    weights = "ternary"
    activations = "int8"

``lowbit.compress_(model, recipe)`` swaps the selected layers for ``QuantConv2d`` /
``QuantLinear`` in place.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .codecs import ActCodec, WeightCodec, act_codec, codec_from_dict, weight_codec
from .layers import QuantConv2d, QuantLinear

__all__ = ["Rule", "Recipe", "compress_", "recipe", "register_method", "layer_kinds", "METHODS"]

SELECTORS = ("all", "first", "last", "pointwise", "depthwise", "conv", "linear")
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """Put ``weights``/``activations`` codecs on the layers ``select`` (or ``name``) picks."""

    weights: WeightCodec
    activations: ActCodec
    select: str | None = None
    name: str | None = None
    # True: matching no layer is a warning, not an error; "silent": not even a warning
    optional: bool | str = False

    def __post_init__(self):
        if (self.select is None) == (self.name is None):
            raise ValueError("a recipe rule needs exactly one of 'select' or 'name'")
        if self.select is not None and not set(self.select.split("+")) <= set(SELECTORS):
            raise ValueError(
                f"unknown selector {self.select!r} in a recipe rule; valid: {', '.join(SELECTORS)}"
                " (join kinds with '+' for layers of all of them, e.g. 'first+conv')"
            )
        object.__setattr__(self, "weights", weight_codec(self.weights))
        object.__setattr__(self, "activations", act_codec(self.activations))

    def describe(self) -> str:
        return f"select={self.select!r}" if self.select else f"name={self.name!r}"

    def matches(self, name: str, kinds: set[str]) -> bool:
        if self.name is not None:
            return fnmatch.fnmatchcase(name, self.name)
        return self.select == "all" or set(self.select.split("+")) <= kinds

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"select": self.select} if self.select else {"name": self.name}
        d["weights"] = self.weights.to_dict()
        d["activations"] = self.activations.to_dict()
        if self.optional:
            d["optional"] = self.optional
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> Rule:
        unknown = sorted(set(d) - {"select", "name", "weights", "activations", "optional"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown} in a rule; valid: select, name, weights, "
                "activations, optional"
            )
        for key in ("weights", "activations"):
            if key not in d:
                raise ValueError(f"{where}: a rule lacks {key!r}")
        return cls(
            weights=_codec(d["weights"], weight_codec),
            activations=_codec(d["activations"], act_codec),
            select=d.get("select"),
            name=d.get("name"),
            optional="silent" if d.get("optional") == "silent" else bool(d.get("optional")),
        )


def _codec(spec, parse):
    if isinstance(spec, dict) and "_type" not in spec and "type" in spec:
        spec = {"_type": spec["type"], "_data": {k: v for k, v in spec.items() if k != "type"}}
    return parse(spec) if not isinstance(spec, dict) else parse(codec_from_dict(spec))


@dataclass
class Recipe:
    """A method's layer-to-codec rules, its options, and its training hooks."""

    method: str
    rules: list[Rule]
    options: dict[str, Any] = field(default_factory=dict)
    # callables that build the method's TrainHooks for a compressed model (not serialized)
    hook_factories: list[Callable[[nn.Module], Any]] = field(default_factory=list, repr=False)
    # model edits ``compress_`` makes before swapping layers, ``fn(model, example_input)``
    # (e.g. SST adds BatchNorm after layers without one); rebuilt from the method's
    # options like the hooks, so a checkpoint's model is rebuilt the same way
    prepare: list[Callable[[nn.Module, Any], None]] = field(default_factory=list, repr=False)

    def hooks(self, model: nn.Module) -> list:
        return [f(model) for f in self.hook_factories]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECIPE_VERSION,
            "method": self.method,
            "options": dict(self.options),
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> Recipe:
        _load_methods()  # methods may define codecs the rules name
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a recipe is a table/mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"version", "method", "options", "rules"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; valid: method, options, rules, version"
            )
        if int(d.get("version", 1)) > RECIPE_VERSION:
            raise ValueError(f"{where}: recipe version {d['version']} is newer than this lowbit")
        method = d.get("method", "custom")
        rules_in = d.get("rules")
        if not rules_in:
            raise ValueError(f"{where}: no rules (add [[rules]] entries)")
        rules = [Rule.from_dict(r, f"{where}, rule {i + 1}") for i, r in enumerate(rules_in)]
        options = dict(d.get("options", {}))
        _load_methods()
        if method in METHODS:  # the method's own hooks and validated options
            base = METHODS[method](**options)
            return cls(method, rules, base.options, base.hook_factories, base.prepare)
        return cls(method, rules, options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a recipe from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                d = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            elif path.suffix == ".json":
                import json

                d = json.loads(text)
            else:
                raise ValueError(f"{path}: recipe files end in .toml, .yaml, .yml or .json")
        except (tomllib.TOMLDecodeError, ValueError) as e:
            raise ValueError(f"cannot parse recipe {path}: {e}") from None
        except Exception as e:  # yaml errors
            raise ValueError(f"cannot parse recipe {path}: {e}") from None
        return cls.from_dict(d, where=str(path))

    def assign(
        self, model: nn.Module, example_input: torch.Tensor | None = None
    ) -> dict[str, Rule]:
        """Which rule decides each layer (qualified name -> rule). Raises on a rule that
        matches no layer."""
        kinds = layer_kinds(model, example_input)
        chosen: dict[str, Rule] = {}
        used = [False] * len(self.rules)
        for name, ks in kinds.items():
            for i, rule in enumerate(self.rules):
                if rule.matches(name, ks):
                    chosen[name] = rule
                    used[i] = True
        for i, rule in enumerate(self.rules):
            if not used[i]:
                names = list(kinds)
                shown = ", ".join(names[:12]) + (
                    f", ... ({len(names)} in all)" if len(names) > 12 else ""
                )
                msg = (
                    f"recipe rule {i + 1} ({rule.describe()}) matches no layer of "
                    f"{type(model).__name__}; layers: {shown or 'none'}"
                )
                if not rule.optional:
                    raise ValueError(msg)
                if rule.optional != "silent":
                    warnings.warn(msg, stacklevel=3)
        return chosen


def _example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    shape = getattr(model, "default_input_shape", None)
    if shape is None:
        raise ValueError(
            f"{type(model).__name__} has no default_input_shape: pass example_input (a batch "
            "the model accepts) so that lowbit can find the first and last layers"
        )
    p = next(model.parameters(), None)
    return torch.zeros(1, *shape, device=p.device if p is not None else "cpu")


def layer_kinds(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, set[str]]:
    """Conv2d/Linear layers in execution order, each with its kinds (see module docstring)."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}

    def hook(mod, inp, out):
        if mod in names and names[mod] not in order:
            order.append(names[mod])

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, example_input))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    by_name = dict(model.named_modules())
    kinds: dict[str, set[str]] = {}
    for n in order:
        m = by_name[n]
        if isinstance(m, nn.Linear):
            ks = {"linear"}
        elif m.groups > 1 and m.groups == m.in_channels:
            ks = {"depthwise"}
        elif m.kernel_size == (1, 1) and m.groups == 1:
            ks = {"pointwise"}
        else:
            ks = {"conv"}
        kinds[n] = ks
    if order:
        kinds[order[0]].add("first")
        kinds[order[-1]].add("last")
    return kinds


def compress_(
    model: nn.Module,
    recipe: Recipe | str,
    example_input: torch.Tensor | None = None,
    **options,
) -> nn.Module:
    """Swap the layers ``recipe`` selects for quantized ones, in place; returns ``model``.

    ``recipe`` is a ``Recipe`` or a method name (then ``options`` build it, as in
    ``lowbit.recipe(name, **options)``). Layers no rule selects stay as they are.

    >>> model = lowbit.models.create("mobilenetv2")
    >>> lowbit.compress_(model, "prom")              # doctest: +SKIP
    """
    if isinstance(recipe, str):
        recipe = make_recipe(recipe, **options)
    elif options:
        raise ValueError("options go with a method name, not with a Recipe object")
    for fn in recipe.prepare:
        fn(model, example_input)
    chosen = recipe.assign(model, example_input)
    for name, rule in chosen.items():
        parent, attr = _parent(model, name)
        old = getattr(parent, attr)
        if isinstance(old, QuantConv2d | QuantLinear):
            raise ValueError(f"layer {name} is already quantized; compress_ a float model")
        cls = QuantConv2d if isinstance(old, nn.Conv2d) else QuantLinear
        setattr(parent, attr, cls.from_float(old, rule.weights, rule.activations))
    model.lowbit_recipe = recipe
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    parent_name, attr = name.rsplit(".", 1)
    return model.get_submodule(parent_name), attr


# ----------------------------------------------------------------------------- methods

#: method name -> factory(**options) -> Recipe
METHODS: dict[str, Callable[..., Recipe]] = {}


def register_method(name: str):
    """Decorator: register a function ``(**options) -> Recipe`` as a method's recipe."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


def make_recipe(method: str, **options) -> Recipe:
    """``lowbit.recipe("prom", ternary_per_channel=False)`` -> the method's ``Recipe``."""
    _load_methods()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[method](**options)
    except TypeError as e:
        raise ValueError(f"bad option for method {method!r}: {e}") from None


def _load_methods() -> None:
    """Import the built-in methods (each registers its recipe and any codecs of its own)."""
    from .methods import bayes, burn, prom, sbnn, sst  # noqa: F401


recipe = make_recipe


@register_method("fp32")
def _fp32_recipe() -> Recipe:
    """No quantization: every layer stays float (a reference point)."""
    return Recipe("fp32", [Rule(select="all", weights="float", activations="float")])
