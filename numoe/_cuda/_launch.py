"""Low-overhead kernel launches.

A numba-cuda launch types every argument, looks the specialisation up and
packs the parameters through several layers of Python: about 100 us for a
kernel with 20 array arguments on the machine we measured (``tools/
gpu_check.py``, "launch overhead"), more than many of our kernels run.
:func:`launch` keeps numba for the first launch of each argument-type
combination (it compiles and launches as usual), then remembers the
``CUfunction`` and how to lay out each argument (numba's kernel ABI: an
array is ``meminfo, parent, nitems, itemsize, data, shape..., strides...``;
scalars are one slot each) and launches through ``cuLaunchKernel`` with a
reused parameter buffer.

The fast path is used on a real GPU only, for C-contiguous numba device
arrays and Python/NumPy scalars; anything else (and the simulator, and
``NUMOE_CUDA_FAST_LAUNCH=0``) goes through the normal numba launch.
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings

import numpy as np
from numba import cuda, int64

from . import _arrays as A

ENABLED = (not A.SIM) and os.environ.get("NUMOE_CUDA_FAST_LAUNCH", "1") != "0"

_ENTRIES: dict = {}          # (id(dispatcher), key) -> _Entry or None (fast path refused)
# The stream launches go to: the legacy default stream, or while a CUDA graph is
# being captured (numoe._cuda.graph) the capturing stream as (CUstream, numba Stream).
_STREAM = [None, 0]
_pack_d = struct.Struct("<d")
_unpack_q = struct.Struct("<q")


def _perf_warning():
    try:
        from numba.cuda.core.errors import NumbaPerformanceWarning
    except ImportError:  # pragma: no cover - older numba-cuda
        from numba.core.errors import NumbaPerformanceWarning
    return NumbaPerformanceWarning


def _numba_launch(kernel, grid, block, shmem, args):
    # Some of our launches are small on purpose (one-block scans, decode-sized
    # problems): numba's low-occupancy warning says nothing useful about them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _perf_warning())
        kernel[grid, block, _STREAM[1], shmem](*args)


def launch(kernel, grid, block, shmem, *args):
    """``kernel[grid, block, 0, shmem](*args)``, through the fast path when possible."""
    if PROFILE is not None:
        _profiled(kernel, grid, block, shmem, args)
        return
    if not ENABLED:
        _numba_launch(kernel, grid, block, shmem, args)
        return
    try:
        key = (id(kernel),) + tuple(_key(a) for a in args)
    except _Unsupported:
        _numba_launch(kernel, grid, block, shmem, args)
        return
    ent = _ENTRIES.get(key, 0)
    if ent == 0:                              # first time: numba compiles and launches
        _numba_launch(kernel, grid, block, shmem, args)
        try:
            ent = _Entry(kernel, args)
        except Exception:  # noqa: BLE001 - any surprise: keep the numba launch
            ent = None
        _ENTRIES[key] = ent
        return
    if ent is None:
        _numba_launch(kernel, grid, block, shmem, args)
        return
    ent.launch(grid, block, shmem, args)


class _Unsupported(Exception):
    pass


def _key(a):
    if isinstance(a, (bool, np.bool_)):
        return "b"
    if isinstance(a, (int, np.integer)):
        return "i"
    if isinstance(a, (float, np.floating)):
        return "f"
    fl = getattr(a, "flags", None)
    if fl is None or not getattr(a, "__cuda_ndarray__", False) or not fl["C_CONTIGUOUS"] \
            or (0 in a.strides and a.size != 0):
        raise _Unsupported
    return (a.dtype.num, a.ndim)


class _Entry:
    """The compiled function of one specialisation and its parameter layout."""

    def __init__(self, kernel, args):
        from cuda.bindings import driver

        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        compiled = kernel.overloads[argtypes]
        cufunc = compiled._codelibrary.get_cufunc()
        self.handle = cufunc.handle
        self.driver = driver
        self.stream = driver.CUstream(0)
        self.kinds = []
        n = 0
        for t, a in zip(argtypes, args):
            k = _key(a)
            if isinstance(k, tuple):
                if str(t.layout) != "C":
                    raise _Unsupported
                self.kinds.append(("a", a.dtype.itemsize))
                n += 5 + 2 * a.ndim
            elif k == "f":
                if str(t) != "float64":
                    raise _Unsupported
                self.kinds.append(("f", 0))
                n += 1
            else:
                if str(t) not in ("int64", "bool", "boolean"):
                    raise _Unsupported
                self.kinds.append(("i", 0))
                n += 1
        self.n = n
        self.vals = np.zeros(n, dtype=np.int64)
        base = self.vals.ctypes.data
        self.ptrs = np.arange(n, dtype=np.uint64) * np.uint64(8) + np.uint64(base)
        self.ptr_addr = int(self.ptrs.ctypes.data)

    def launch(self, grid, block, shmem, args):
        vals = []
        ext = vals.extend
        app = vals.append
        for (kind, isz), a in zip(self.kinds, args):
            if kind == "a":
                p = a.device_ctypes_pointer.value or 0
                ext((0, 0, a.size, isz, p))
                ext(a.shape)
                ext(a.strides)
            elif kind == "f":
                app(_unpack_q.unpack(_pack_d.pack(float(a)))[0])
            else:
                app(int(a))
        self.vals[:] = vals
        gx, gy, gz = _dim3(grid)
        bx, by, bz = _dim3(block)
        err, = self.driver.cuLaunchKernel(self.handle, gx, gy, gz, bx, by, bz, int(shmem),
                                          _STREAM[0] or self.stream, self.ptr_addr, 0)
        if int(err) != 0:
            raise RuntimeError(f"cuLaunchKernel failed: {err}")


# {kernel name: [launches, GPU ms]} while set to a dict (tools/gpu_profile.py):
# every launch is timed between two events and waited for. A one-thread spin
# kernel queued first holds the GPU until the events and the launch are queued
# behind it, so the interval is the kernel's GPU time, not the host's launch time.
PROFILE = None
SPIN_ITERS = 1 << 20


@cuda.jit
def _spin(n, out):
    acc = int64(1)
    for _ in range(n):
        acc = (acc * 1103515245 + 12345) & 0x7FFFFFFF
    out[0] = acc


def _profiled(kernel, grid, block, shmem, args):
    global PROFILE
    prof, PROFILE = PROFILE, None
    try:
        e0, e1 = cuda.event(), cuda.event()
        if "spin" not in prof:
            prof["spin"] = cuda.device_array(1, np.int64)
        _spin[1, 1](SPIN_ITERS, prof["spin"])
        e0.record()
        launch(kernel, grid, block, shmem, *args)
        e1.record()
        e1.synchronize()
        name = getattr(getattr(kernel, "py_func", None), "__qualname__", str(kernel))
        name = name.replace(".<locals>", "")
        ent = prof.setdefault(name, [0, 0.0])
        ent[0] += 1
        ent[1] += e0.elapsed_time(e1)
    finally:
        PROFILE = prof


@contextlib.contextmanager
def on_stream(handle):
    """Send every launch (fast path and numba's) to the CUstream ``handle`` meanwhile."""
    from cuda.bindings import driver

    old = list(_STREAM)
    _STREAM[:] = [driver.CUstream(int(handle)), cuda.external_stream(int(handle))]
    try:
        yield
    finally:
        _STREAM[:] = old


def _dim3(d):
    if isinstance(d, tuple):
        return (tuple(int(v) for v in d) + (1, 1))[:3]
    return int(d), 1, 1


def stats():
    """Number of specialisations on the fast path and refused (for reports)."""
    ok = sum(1 for v in list(_ENTRIES.values()) if v is not None)
    return {"fast": ok, "numba": len(_ENTRIES) - ok}
