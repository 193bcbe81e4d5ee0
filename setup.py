"""Build of lowbit's optional C extension (the AVX-512 runtime kernels).

Everything else is declared in pyproject.toml. The extension is optional: where it cannot
be compiled (no C compiler, another architecture) lowbit installs without it and the
runtime uses its numba kernels, which give the same results.
"""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fvisibility=hidden"]

setup(
    ext_modules=[
        Extension(
            "lowbit.runtime._lbk",
            sources=["lowbit/runtime/_lbk.c"],
            extra_compile_args=args,
            optional=True,
        )
    ]
)
