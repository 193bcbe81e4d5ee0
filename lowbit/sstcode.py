"""The structured sparse ternary (SST) codebook, numpy only (used by the codec, the file
format and the runtime alike).

An SST group is ``N`` consecutive weights of one output unit's flattened incoming weights
(the last group of a row is zero-padded) with at most ``K`` non-zeros, each -1 or +1 (times
the layer's or channel's Delta). Every such group is one *pattern* of the codebook and is
stored as its index, in ``index_bits(n, k) = ceil(log2(codebook_size(n, k)))`` bits.

The codebook order is fixed (the file format depends on it): patterns with fewer
non-zeros first; among those with ``j`` non-zeros, the positions in lexicographic order
(``itertools.combinations``); for each position set, the signs counted in binary, bit
``i`` set meaning the ``i``-th non-zero (in position order) is -1. Index 0 is the all-zero
group, 1 is ``+1`` at position 0, 2 is ``-1`` at position 0, and so on.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

__all__ = [
    "MAX_CODEBOOK",
    "check_nk",
    "codebook",
    "codebook_size",
    "decode_groups",
    "encode_groups",
    "groups_per_row",
    "index_bits",
    "pattern_taps",
]

#: the largest codebook lowbit accepts (the look-up table must stay small)
MAX_CODEBOOK = 1 << 16


def codebook_size(n: int, k: int) -> int:
    """Patterns with at most ``k`` non-zero +-1 among ``n``: ``sum_j C(n, j) 2^j``."""
    return sum(math.comb(n, j) * 2**j for j in range(k + 1))


def check_nk(n, k) -> None:
    """Raise ``ValueError`` unless (n, k) is a usable SST configuration."""
    if isinstance(n, bool) or isinstance(k, bool) or not isinstance(n, int | np.integer):
        raise ValueError(f"SST: n must be an integer, got {n!r}")
    if not isinstance(k, int | np.integer):
        raise ValueError(f"SST: k must be an integer, got {k!r}")
    if not 1 <= n <= 16:
        raise ValueError(f"SST: the group size n must be in 1..16, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"SST: k (non-zeros per group) must be in 1..n={n}, got {k}")
    size = codebook_size(int(n), int(k))
    if size > MAX_CODEBOOK:
        raise ValueError(
            f"SST({n}, {k}) has {size:,} patterns, more than {MAX_CODEBOOK:,} (2^16): use a "
            "smaller n or k"
        )


def index_bits(n: int, k: int) -> int:
    """Bits one group index takes: ``ceil(log2(codebook size))``."""
    return max(1, math.ceil(math.log2(codebook_size(n, k))))


def groups_per_row(fan_in: int, n: int) -> int:
    return -(-fan_in // n)


@lru_cache(maxsize=64)
def _tables(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    check_nk(n, k)
    rows = []
    for j in range(k + 1):
        for pos in itertools.combinations(range(n), j):
            for s in range(2**j):
                p = np.zeros(n, np.int8)
                for i, q in enumerate(pos):
                    p[q] = -1 if (s >> i) & 1 else 1
                rows.append(p)
    book = np.stack(rows)
    book.setflags(write=False)
    keys = _keys(book)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    sorted_keys.setflags(write=False)
    order.setflags(write=False)
    return book, sorted_keys, order


def _keys(groups: np.ndarray) -> np.ndarray:
    """A unique int64 per ternary group: ``sum_j (t_j + 1) 3^j``."""
    n = groups.shape[-1]
    return (groups.astype(np.int64) + 1) @ (3 ** np.arange(n, dtype=np.int64))


def codebook(n: int, k: int) -> np.ndarray:
    """The ``[codebook_size, n]`` int8 table of patterns (read-only), in index order."""
    return _tables(int(n), int(k))[0]


def pattern_taps(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the look-up-table kernel: per pattern, its non-zero positions ``pos [cb, k]``,
    their signs ``sign [cb, k]`` (int8, 0 where unused) and the count ``nnz [cb]``."""
    book = codebook(n, k)
    cb = book.shape[0]
    pos = np.zeros((cb, max(1, k)), np.int32)
    sign = np.zeros((cb, max(1, k)), np.int8)
    nnz = np.zeros(cb, np.int32)
    for i, p in enumerate(book):
        (where,) = np.nonzero(p)
        nnz[i] = where.size
        pos[i, : where.size] = where
        sign[i, : where.size] = p[where]
    return pos, sign, nnz


def encode_groups(codes: np.ndarray, n: int, k: int) -> np.ndarray:
    """Ternary ``codes`` of shape ``[rows, ...]`` (each row one output unit's weights,
    flattened in C order) -> group indices ``[rows, groups_per_row]`` (uint16).

    Raises ``ValueError`` if a code is outside {-1, 0, 1} or a group has more than ``k``
    non-zeros."""
    book, sorted_keys, order = _tables(int(n), int(k))
    c = np.asarray(codes)
    if c.ndim < 1:
        raise ValueError("SST codes need at least one dimension (the output units)")
    rows = c.shape[0]
    flat = c.reshape(rows, -1).astype(np.int64) if rows else np.zeros((0, 0), np.int64)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("SST codes must be in {-1, 0, 1}")
    fan_in = flat.shape[1]
    g = groups_per_row(fan_in, n)
    padded = np.zeros((rows, g * n), np.int64)
    padded[:, :fan_in] = flat
    keys = _keys(padded.reshape(rows * g, n))
    at = np.searchsorted(sorted_keys, keys)
    at_c = np.minimum(at, sorted_keys.size - 1)
    bad = sorted_keys[at_c] != keys
    if bad.any():
        first = int(np.argmax(bad))
        nz = int(np.count_nonzero(padded.reshape(-1, n)[first]))
        raise ValueError(
            f"SST({n}, {k}): group {first % g} of row {first // g} has {nz} non-zeros "
            f"(at most {k} allowed)"
        )
    return order[at_c].astype(np.uint16).reshape(rows, g)


def decode_groups(index: np.ndarray, n: int, k: int, fan_in: int) -> np.ndarray:
    """Group indices ``[rows, groups]`` -> ternary codes ``[rows, fan_in]`` (int8).

    Raises ``ValueError`` on an index outside the codebook or a group count that does not
    match ``fan_in``."""
    book = codebook(n, k)
    idx = np.asarray(index)
    if idx.ndim != 2:
        raise ValueError(f"SST indices must be 2-D [rows, groups], got shape {idx.shape}")
    rows, g = idx.shape
    if g != groups_per_row(fan_in, n):
        raise ValueError(f"{g} SST groups per row do not hold {fan_in} weights in groups of {n}")
    if idx.size and (idx.min() < 0 or idx.max() >= book.shape[0]):
        raise ValueError(f"SST index out of range (codebook of {book.shape[0]} patterns)")
    return book[idx.astype(np.int64)].reshape(rows, g * n)[:, :fan_in]
