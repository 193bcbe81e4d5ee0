"""The C kernels of ``_lbk.c`` and the switch between them and numba.

``available()`` is True when the extension was built (``pip install`` compiles it where a C
compiler exists), this CPU runs AVX-512 (F/BW/DQ/VL/VPOPCNTDQ/VNNI), and the environment
variable ``LOWBIT_NO_CEXT`` is unset or 0. Otherwise every kernel runs in numba (the
portable path; both give bit-identical results). Where the CPU also has AMX-INT8 (Intel
Sapphire Rapids and later) the int8 GEMM runs on the tile unit (:func:`amx`;
``LOWBIT_NO_AMX=1`` turns that off), again with the same results. The AMX binary conv
(``LOWBIT_AMX_BCONV=1``, opt-in) unpacks the packed signs to +-1 bytes and multiplies them by
the +-1 (or {0, 1}) weights with ``tdpbssd`` (16,384 MACs per instruction against 512 for
XOR + popcount); measured faster only for layers of at most 128 channels, hence opt-in.
Multi-threading: the C functions take a row range and
release the GIL; :func:`parallel_rows` splits the rows over a thread pool, using the thread
count of :func:`lowbit.runtime.kernels.set_threads`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_mod = None
_reason = ""
_amx = False
_amx_reason = ""


def _load():
    global _mod, _reason
    if os.environ.get("LOWBIT_NO_CEXT", "") not in ("", "0"):
        _reason = "disabled by LOWBIT_NO_CEXT"
        return
    try:
        from . import _lbk
    except ImportError as e:
        _reason = f"extension not built ({e})"
        return
    if not _lbk.cpu_ok():
        _reason = "this CPU lacks AVX-512 (F/BW/DQ/VL/VPOPCNTDQ/VNNI)"
        return
    if not hasattr(_lbk, "gemm_u8s8"):  # pragma: no cover - a stale build
        _reason = f"stale build of {_lbk.__file__}: reinstall lowbit"
        return
    _mod = _lbk
    global _amx, _amx_reason
    if os.environ.get("LOWBIT_NO_AMX", "") not in ("", "0"):
        _amx_reason = "disabled by LOWBIT_NO_AMX"
    elif not hasattr(_lbk, "gemm_amx"):
        _amx_reason = "built without AMX support (needs GCC 11 / clang 12 on Linux)"
    elif not _lbk.amx_ok():
        _amx_reason = "this CPU (or its OS) does not run AMX-INT8"
    else:
        _amx = True


_load()


def available() -> bool:
    """True when the C kernels run (see the module docstring)."""
    return _mod is not None


def why_not() -> str:
    """Why the C kernels do not run ("" when they do)."""
    return _reason


def amx() -> bool:
    """True when the AMX tile kernels run (Intel Sapphire Rapids and later, Linux): the
    int8 GEMM uses them instead of the AVX-512 VNNI one (same integers, so the same
    results). ``LOWBIT_NO_AMX=1`` turns them off."""
    return _mod is not None and _amx


def why_not_amx() -> str:
    """Why the AMX kernels do not run ("" when they do)."""
    return _reason if _mod is None else _amx_reason


def lib():
    """The extension module (``lowbit.runtime._lbk``), or None."""
    return _mod


_pool: ThreadPoolExecutor | None = None
_pool_n = 0


# Below this estimated single-thread time a call runs on the calling thread alone: handing
# rows to the pool and waiting costs tens of microseconds (measured on the 2-core Intel
# machine: a 256 -> 256 pointwise layer, about 50 us on one thread, took 160-180 us on two;
# PROM MobileNetV2 2.4 ms on one, 3.7-4.0 ms on two).
PARALLEL_MIN_NS = 300_000


def parallel_rows(fn, rows: int, threads: int, align: int = 1, est_ns: float | None = None) -> None:
    """Run ``fn(r0, r1)`` over ``[0, rows)`` split in ``threads`` contiguous chunks (chunk
    bounds multiples of ``align`` where that leaves every thread work). ``est_ns``: the
    caller's estimate of the single-thread time; under ``PARALLEL_MIN_NS`` one thread runs
    it all."""
    global _pool, _pool_n
    if est_ns is not None and est_ns < PARALLEL_MIN_NS:
        threads = 1
    threads = max(1, min(threads, rows))
    if threads == 1:
        fn(0, rows)
        return
    if _pool is None or _pool_n != threads:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _pool_n = ThreadPoolExecutor(threads, thread_name_prefix="lowbit"), threads
    if rows >= align * threads:
        bounds = [rows * i // threads // align * align for i in range(threads)] + [rows]
    else:
        bounds = [rows * i // threads for i in range(threads + 1)]
    futs = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(threads)]
    for f in futs:
        f.result()


class _Override:
    """Sets one of this module's switches for the ``with`` block, then restores it."""

    def __init__(self, name: str, value):
        self._name, self._value = name, value

    def __enter__(self):
        g = globals()
        self._saved, g[self._name] = g[self._name], self._value
        return self

    def __exit__(self, *exc):
        globals()[self._name] = self._saved
        return False


def disabled() -> _Override:
    """``with disabled():`` runs the numba kernels even where the C ones are available
    (tests compare the two paths; not thread-safe)."""
    return _Override("_mod", None)


def no_amx() -> _Override:
    """``with no_amx():`` runs the AVX-512 C kernels even where the AMX ones are available
    (tests compare the two; not thread-safe)."""
    return _Override("_amx", False)
