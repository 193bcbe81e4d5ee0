"""lowbit: compress CNNs to binary, ternary and low-bit codes, and run them fast on CPUs.

The package root stays light: heavy modules (torch models, the trainer) are imported
lazily so that ``lowbit.runtime`` can later run with numpy + numba alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
