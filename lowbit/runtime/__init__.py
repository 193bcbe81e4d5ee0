"""lowbit's CPU runtime: integer, ternary and binary kernels (numba) and, later, the Engine.

Nothing is imported here on purpose: ``import lowbit.runtime`` stays cheap, and numba
compiles the kernels only when ``lowbit.runtime.kernels`` is imported and first used.
"""
