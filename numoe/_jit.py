"""The one place where Numba options are set.

Every CPU kernel in :mod:`numoe._cpu` is decorated with one of the helpers
below, never with ``numba.njit`` directly, so that caching, fastmath and
threading choices live in a single file.

* ``kernel``  -- a small serial kernel (``cache=True``), inlined into drivers.
* ``driver``  -- a thin ``parallel=True`` driver around ``prange`` loops
  (also cached: compiling the layer's drivers costs seconds, and the cache
  keeps warm start-up under two seconds).

``FASTMATH`` is the only fastmath flag set allowed: it leaves out ``nnan``
and ``ninf`` so that ``-inf`` masking and NaN checks keep working.
"""
from __future__ import annotations

import contextlib

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})


def kernel(fn=None, *, fastmath=False):
    """Compile a serial kernel (cached, nogil)."""
    opts = dict(cache=True, nogil=True, fastmath=set(FASTMATH) if fastmath else False)
    if fn is None:
        return lambda f: numba.njit(**opts)(f)
    return numba.njit(**opts)(fn)


def driver(fn=None, *, fastmath=False):
    """Compile a parallel driver (``prange`` loops; cached, nogil)."""
    opts = dict(parallel=True, cache=True, nogil=True,
                fastmath=set(FASTMATH) if fastmath else False)
    if fn is None:
        return lambda f: numba.njit(**opts)(f)
    return numba.njit(**opts)(fn)


@contextlib.contextmanager
def threads(n):
    """Run a block with ``n`` Numba threads (``None``: leave as is)."""
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(int(n))
    try:
        yield
    finally:
        numba.set_num_threads(old)
