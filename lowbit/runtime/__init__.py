"""lowbit's CPU runtime: ``load(path) -> Engine`` runs a packed ``.lowbit`` file with the
integer, ternary and binary kernels of ``lowbit.runtime.kernels`` (numpy + numba, no torch).

Imports are lazy: ``import lowbit.runtime`` stays cheap, and numba compiles the kernels
only when ``load`` (or ``lowbit.runtime.kernels``) is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "load"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "load"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'lowbit.runtime' has no attribute {name!r}")
