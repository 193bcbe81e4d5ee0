"""lowbit: compress CNNs to binary, ternary and low-bit codes, and run them fast on CPUs.

The package root stays light: heavy modules (torch models, the trainer) are imported
lazily on first use, so that ``lowbit.runtime`` runs with numpy + numba alone.

    import lowbit
    net = lowbit.models.create("mobilenetv2")
    lowbit.compress_(net, "prom")          # swap layers for quantized ones, in place
    ...                                    # train (lowbit.train.Trainer)
    frozen = lowbit.freeze(net)            # integer codes + scales, reference executor
    lowbit.save(frozen, "model.lowbit")    # the packed file
    engine = lowbit.runtime.load("model.lowbit")
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import FormatError

__version__ = "0.1.0"

# public name -> (module, attribute); imported on first access
_LAZY = {
    "compress_": ("recipes", "compress_"),
    "recipe": ("recipes", "make_recipe"),
    "Recipe": ("recipes", "Recipe"),
    "Rule": ("recipes", "Rule"),
    "freeze": ("freeze", "freeze"),
    "FrozenModel": ("freeze", "FrozenModel"),
    "analyze": ("cost", "analyze"),
    "save": ("packfile", "save"),
    "load_frozen": ("packfile", "load_frozen"),
}
_SUBMODULES = {"codecs", "cost", "data", "freeze", "layers", "models", "recipes", "runtime",
               "train", "transforms", "fileformat", "packfile", "methods"}  # fmt: skip

__all__ = ["FormatError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
