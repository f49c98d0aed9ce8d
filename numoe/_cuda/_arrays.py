"""Device-array plumbing shared by the CUDA modules (no numoe maths here).

* coercion: numba device arrays pass through, anything exposing
  ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors) is wrapped
  zero-copy with :func:`numba.cuda.as_cuda_array`; the CUDA simulator's
  arrays (``NUMBA_ENABLE_CUDASIM=1``) are accepted as they are;
* checks of dtype/ndim/shape read the array attributes only (no copies);
* canonicalisation on the device: a C-contiguous copy of a strided view,
  a dtype conversion, a fill -- each one small grid-stride kernel;
* launch geometry: grid sizes bounded by the multiprocessor count (every
  kernel loops grid-stride), small blocks and grids under the simulator.
"""
from __future__ import annotations

import functools
import math
import os

import numba
import numpy as np
from numba import cuda, float64

SIM = bool(numba.config.ENABLE_CUDASIM)
if SIM:  # pragma: no cover - simulator only
    import sys

    # The simulator runs one Python thread per CUDA thread and its block manager
    # polls them for syncthreads(); with the default 5 ms GIL switch interval every
    # barrier costs milliseconds. A short interval makes simulated kernels ~5x faster.
    if sys.getswitchinterval() > 1e-4:
        sys.setswitchinterval(1e-5)
from . import _narrow  # noqa: E402
from .._dtypes import BFLOAT16, FLOAT32, NARROW  # noqa: E402
from .._dtypes import FLOATS  # noqa: E402  (float16, bfloat16, float32, float64)

INT32_MAX = int(np.iinfo(np.int32).max)


# ------------------------------------------------------------------ kinds
def is_device_array(a) -> bool:
    """True for a numba device array (real or simulated)."""
    if SIM:
        return type(a).__module__.startswith("numba.cuda.simulator")
    return bool(getattr(a, "__cuda_ndarray__", False))


def as_device(name, a):
    """``a`` as a numba device array (zero-copy); TypeError for host data."""
    if a is None:
        raise TypeError(f"{name} must be a device array, got None")
    if is_device_array(a):
        return a
    if isinstance(a, np.ndarray) or not (hasattr(a, "__cuda_array_interface__")
                                         or _narrow_dtype(a) is not None):
        raise TypeError(
            f"{name} must be a device array (numba, CuPy or PyTorch CUDA) like the other "
            f"arguments, got {type(a).__name__}: cannot mix host and device arrays")
    narrow = _narrow_dtype(a)
    try:
        if narrow is None:
            return cuda.as_cuda_array(a)
        # 16-bit floats: PyTorch refuses the interface for bfloat16 and other
        # libraries describe it as raw 2-byte items; view the bits as 16-bit
        # integers there and give the numba view back its float dtype.
        return cuda.as_cuda_array(_int16_view(a)).view(narrow)
    except Exception as exc:  # noqa: BLE001 - e.g. a tensor that requires grad
        raise TypeError(f"{name} could not be viewed as a CUDA array ({exc})") from exc


def _narrow_dtype(a):
    """``BFLOAT16``/``FLOAT16`` when ``a`` (CuPy, PyTorch, ...) holds 16-bit floats, else None."""
    dt = getattr(a, "dtype", None)
    if dt is None:
        return None
    if type(a).__module__.split(".")[0] == "torch":
        name = str(dt)
        return {"torch.bfloat16": BFLOAT16, "torch.float16": NARROW[0]}.get(name)
    try:
        d = np.dtype(dt)
    except TypeError:
        return None
    return d if d in NARROW else None


def _int16_view(a):
    """The same memory seen as 16-bit integers (PyTorch or NumPy-like ``view``)."""
    if type(a).__module__.split(".")[0] == "torch":
        import sys

        return a.view(sys.modules["torch"].int16)
    return a.view(np.uint16)


def to_device(a):
    """A host array copied to a new device array. 16-bit floats travel as their bits:
    numba's own copy refuses bfloat16 (NumPy exposes no buffer format for it)."""
    a = np.ascontiguousarray(a)
    if a.dtype in NARROW:
        return cuda.to_device(a.view(np.uint16)).view(a.dtype)
    return cuda.to_device(a)


def to_host(a):
    """A device array copied to a new host array (16-bit floats as their bits, viewed back)."""
    if a.dtype in NARROW:
        return a.view(np.uint16).copy_to_host().view(a.dtype)
    return a.copy_to_host()


def bits(a):
    """A 16-bit float device array as its ``uint16`` view (what kernels take); others as is."""
    if a.dtype not in NARROW:
        return a
    if SIM:
        return a.view(np.uint16)
    return _array(tuple(a.shape), tuple(a.strides), _U16, a.gpu_data)


_U16 = np.dtype(np.uint16)
_DNA = None


def _array(shape, strides, dtype, gpu_data):
    """A numba device array over ``gpu_data`` (real GPU only). Views and reshapes are
    built here directly: numba's own ``view``/``reshape`` cost several microseconds
    more per call, and a forward pass makes dozens of them."""
    global _DNA
    if _DNA is None:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        _DNA = DeviceNDArray
    return _DNA(shape, strides, dtype, gpu_data=gpu_data)


def compute_dtype(dtype):
    """float32 for 16-bit storage, else ``dtype`` itself."""
    dtype = np.dtype(dtype)
    return FLOAT32 if dtype in NARROW else dtype


def compute(a):
    """``a`` in its compute dtype: 16-bit arrays widened to a float32 copy, others as is."""
    return astype(a, compute_dtype(a.dtype))


def device_name() -> str:
    """Name of the current device ("simulator" under NUMBA_ENABLE_CUDASIM)."""
    if SIM:
        return "CUDA simulator"
    dev = cuda.get_current_device()
    return dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Multiprocessors of the current device (2 under the simulator)."""
    if SIM:
        return 2
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def grid(n_items, block, per_sm=16):
    """Blocks for ``n_items`` work items of ``block`` threads, capped (grid-stride loops)."""
    need = max(1, math.ceil(n_items / block))
    cap = 1 if SIM else per_sm * sm_count()
    return int(min(need, cap))


SIM_BLOCK = 8     # the simulator runs one Python thread per CUDA thread: keep blocks tiny


def block(threads):
    """Block size to use: ``threads`` on a GPU, at most ``SIM_BLOCK`` in the simulator."""
    return int(min(threads, SIM_BLOCK)) if SIM else int(threads)


# ------------------------------------------------------------- allocation
# numba allocates every device array with cuMemAlloc and frees in batches with
# cuMemFree (which synchronises the device): for a forward pass made of many
# small kernels that costs more than the kernels. When CuPy is installed, device
# arrays are carved from CuPy's caching memory pool instead (the numba array
# holds the CuPy array as its owner); NUMOE_CUDA_ALLOC=numba turns this off.
_ALLOC = os.environ.get("NUMOE_CUDA_ALLOC", "cupy")
_cupy = None


def _cupy_module():
    global _cupy, _ALLOC
    if _cupy is None:
        try:
            import cupy
            _cupy = cupy
        except ImportError:
            _ALLOC = "numba"
    return _cupy


def empty(shape, dtype):
    """An uninitialised C-contiguous device array."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if KEEP is None:
        return _alloc(shape, dtype)
    if ARENA is not None:
        out = ARENA.take(shape, dtype)
        if out is not None:
            return out
    # a CUDA graph is being captured (numoe._cuda.graph): the graph keeps this memory,
    # and a new block may need cudaMalloc, which the capture's global mode refuses
    # unless this thread switches to the relaxed mode for the call (as PyTorch does)
    from cuda.bindings import driver

    _err, mode = driver.cuThreadExchangeStreamCaptureMode(
        driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
    try:
        out = _alloc(shape, dtype)
    finally:
        driver.cuThreadExchangeStreamCaptureMode(mode)
    KEEP.append(out)
    return out


# While numoe._cuda.graph captures a forward, every array allocated by empty() is
# carved from its shared arena (ARENA) or, past the arena's end, appended to this
# list, which the graph keeps: its replays write that memory.
KEEP = None
ARENA = None


def _alloc(shape, dtype):
    if SIM or _ALLOC == "numba" or 0 in shape or _cupy_module() is None:
        if dtype in NARROW and not SIM:  # numba cannot allocate dtypes it does not know
            return cuda.device_array(shape, dtype=np.uint16).view(dtype)
        return cuda.device_array(shape, dtype=dtype)
    # a block of CuPy's pool wrapped directly: from_cuda_array_interface would build
    # the interface dict, look the context up and wrap CuPy's stream on every call
    # (18-21 vs 9-10 us per array on an H200 host; OLMoE T=64 eager forward 1.43 vs
    # 0.97 ms, 2026-12-02)
    mem = _cupy.cuda.alloc(dtype.itemsize * math.prod(shape))
    ctx = _CONTEXTS.get(mem.device_id)
    if ctx is None:
        ctx = _CONTEXTS[mem.device_id] = cuda.current_context()
    return wrap(ctx, mem.ptr, shape, dtype, mem)


_CONTEXTS: dict = {}         # CuPy device id -> numba's context of that device


def wrap(ctx, ptr, shape, dtype, owner):
    """A C-contiguous numba array over the device memory at ``ptr`` (kept alive by
    ``owner``) in context ``ctx``."""
    from numba.cuda.cudadrv import driver

    nbytes = dtype.itemsize * math.prod(shape)
    data = driver.MemoryPointer(ctx, driver.binding.CUdeviceptr(ptr), size=nbytes,
                                owner=owner)
    return _array(shape, _c_strides(shape, dtype.itemsize), dtype, data)


_DUMMIES: dict = {}


def dummy(dtype, ndim=1):
    """A cached one-element array standing in for an absent optional argument
    (kernels never read it when its flag is off, and never write it)."""
    dtype = np.dtype(dtype)
    key = (np.uint16 if dtype in NARROW else dtype, ndim)
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda.device_array((1,) * ndim, dtype=key[0])
    return _DUMMIES[key]


def full(shape, dtype, value):
    """A device array filled with ``value``."""
    out = empty(shape, dtype)
    if out.size:
        flat = out.reshape(out.size)
        bs = block(256)
        _launch_kernel(_fill, grid(out.size, bs), bs, 0, flat, value)
    return out


def zeros(shape, dtype):
    return full(shape, dtype, 0)


def scalar_from(a):
    """Copy a small device array to the host (one synchronising copy)."""
    return a.copy_to_host()


# ------------------------------------------------------------- canonical forms
def contiguous(a):
    """``a`` if C-contiguous, else a C-contiguous device copy (same dtype)."""
    if a.is_c_contiguous():
        return a
    if not SIM and a.size and _c_memory(a):      # only size-1 dims have odd strides
        return _array(tuple(a.shape), _c_strides(tuple(a.shape), a.dtype.itemsize), a.dtype,
                      a.gpu_data)
    if a.size == 0:
        return empty(a.shape, a.dtype)
    return _copy_strided(a, a.dtype)


def astype(a, dtype):
    """``a`` converted to ``dtype`` on the device (no copy if already so and contiguous).

    Conversions to and from 16-bit floats go through the widening helper
    (:mod:`numoe._cuda._narrow`): exact widening, round-to-nearest-even
    narrowing (from float64 via float32).
    """
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return contiguous(a)
    return _copy_strided(a, dtype)


def _copy_strided(a, dtype):
    out = empty(a.shape, dtype)
    if a.size == 0:
        return out
    if a.dtype in NARROW or out.dtype in NARROW:
        if a.dtype == out.dtype:                 # a plain copy of the bits
            _copy_strided_into(a.view(np.uint16) if a.is_c_contiguous() else _bits_view(a),
                               out.view(np.uint16))
            return out
        from ._narrow import kind_of

        return _convert_narrow(a, out, kind_of(a.dtype), kind_of(out.dtype))
    return _copy_strided_into(a, out)


def _bits_view(a):
    """A strided 16-bit array as a strided ``uint16`` view (same memory)."""
    if SIM:
        return a.view(np.uint16)
    return _array(tuple(a.shape), tuple(a.strides), _U16, a.gpu_data)


def _convert_narrow(a, out, ks, kd):
    src = (a.view(np.uint16) if a.is_c_contiguous() else _bits_view(a)) if ks else a
    dst = out.view(np.uint16) if kd else out
    nd = max(1, a.ndim)
    if nd > 4:
        if not a.is_c_contiguous():
            raise ValueError(f"strided device arrays with more than 4 dims are not "
                             f"supported (shape {a.shape}); pass a contiguous array")
        src = src.reshape(src.size)
        dst = dst.reshape(dst.size)
        nd = 1
    if src.ndim == 0:
        src = src.reshape(1)
        dst = dst.reshape(1)
    shp = (1,) * (4 - nd) + tuple(src.shape)
    bs = block(256)
    _launch_kernel(_convert_kinds, grid(a.size, bs), bs, 0, _view4(src, shp),
                   dst.reshape(*shp), ks, kd)
    return out


def _copy_strided_into(a, out):
    nd = a.ndim
    if nd == 0:
        a = a.reshape(1)
        out = out.reshape(1)
        nd = 1
    if nd > 4:
        if not a.is_c_contiguous():
            raise ValueError(f"strided device arrays with more than 4 dims are not "
                             f"supported (shape {a.shape}); pass a contiguous array")
        flat_in = a.reshape(a.size)
        flat_out = out.reshape(out.size)
        bs = block(256)
        _launch_kernel(_convert_1d, grid(a.size, bs), bs, 0, flat_in, flat_out)
        return out
    shp = (1,) * (4 - nd) + tuple(a.shape)
    a4 = _view4(a, shp)
    o4 = out.reshape(shp)
    bs = block(256)
    _launch_kernel(_convert_4d, grid(a.size, bs), bs, 0, a4, o4)
    return out


def _view4(a, shp):
    """A 4-D view of ``a`` with leading unit dims (strided arrays allowed)."""
    if a.ndim == 4:
        return a
    if a.is_c_contiguous():
        return a.reshape(*shp)
    if SIM:
        return a.reshape(shp) if a.is_c_contiguous() else _sim_view(a, shp)
    strides = (0,) * (4 - a.ndim) + tuple(a.strides)
    return _array(shp, strides, a.dtype, a.gpu_data)


def _sim_view(a, shp):
    from numpy.lib.stride_tricks import as_strided
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    host = a._ary
    strides = (0,) * (4 - host.ndim) + tuple(host.strides)
    return FakeCUDAArray(as_strided(host, shp, strides))


# ------------------------------------------------------------------ checks
def check_float(name, a, *, ndim=None, min_ndim=None):
    """TypeError unless a float dtype (float16, bfloat16, float32, float64);
    ValueError on a wrong number of dims."""
    if a.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, "
                        f"got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(a.shape)}")


def check_int(name, a, *, ndim=None):
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")


def check_shape(name, a, expected):
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


def float_arg(name, a, *, ndim=None, dtype=None):
    """Validated C-contiguous float device array (converted to ``dtype`` if given)."""
    d = as_device(name, a)
    check_float(name, d, ndim=ndim)
    return astype(d, dtype) if dtype is not None else contiguous(d)


def tokens_2d(name, a, *, min_ndim=2):
    """``[..., X] -> [T, X]`` contiguous float device array, and the leading shape."""
    d = as_device(name, a)
    check_float(name, d)
    if d.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims ([..., X]), "
                         f"got shape {tuple(d.shape)}")
    d = contiguous(d)
    shp = tuple(d.shape)
    lead = shp[:-1]
    rows = int(np.prod(lead)) if lead else 1
    return reshape(d, (rows, shp[-1])), lead


def int_arg(name, a, *, ndim=None):
    """Integer device array, C-contiguous, int32 or int64 (other widths converted)."""
    d = as_device(name, a)
    check_int(name, d, ndim=ndim)
    if d.dtype == np.int32 or d.dtype == np.int64:
        return contiguous(d)
    return astype(d, np.int64)


def reshape(a, shape):
    """Reshape a contiguous device array (handles empty arrays and size-1 dims with
    odd strides, e.g. ``numpy_array[None]`` moved to the device)."""
    shape = tuple(int(s) for s in shape)
    if a.size == 0:
        return empty(shape, a.dtype)
    if not SIM and math.prod(shape) == a.size and a.is_c_contiguous():
        return _array(shape, _c_strides(shape, a.dtype.itemsize), a.dtype, a.gpu_data)
    try:
        return a.reshape(*shape) if len(shape) != 1 else a.reshape(shape[0])
    except NotImplementedError:
        if SIM or not _c_memory(a):
            raise
        return _array(shape, _c_strides(shape, a.dtype.itemsize), a.dtype, a.gpu_data)


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _c_memory(a):
    """C-contiguous memory, ignoring the strides of size-1 dims (``x[None]`` has 0 there)."""
    acc = a.dtype.itemsize
    for n, st in zip(reversed(tuple(a.shape)), reversed(tuple(a.strides))):
        if n != 1 and st != acc:
            return False
        acc *= n
    return True


def _launch_kernel(kernel, grid_, block_, shmem, *args):
    from ._launch import launch

    launch(kernel, grid_, block_, shmem, *args)


# ------------------------------------------------------------------ kernels
@cuda.jit
def _fill(out, value):
    i0 = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(i0, out.shape[0], stride):
        out[i] = value


@cuda.jit
def _convert_1d(src, dst):
    i0 = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(i0, src.shape[0], stride):
        dst[i] = src[i]


@cuda.jit
def _convert_kinds(src, dst, ks, kd):
    """``dst = src`` converted between kinds (see :mod:`numoe._cuda._narrow`), 4-D strided."""
    n0, n1, n2, n3 = src.shape
    total = n0 * n1 * n2 * n3
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        c3 = i % n3
        r = i // n3
        c2 = r % n2
        r = r // n2
        c1 = r % n1
        c0 = r // n1
        v = src[c0, c1, c2, c3]
        if ks != 0:
            f = float64(_narrow.widen(v, ks))
        else:
            f = float64(v)
        if kd != 0:
            dst[c0, c1, c2, c3] = _narrow.narrow(f, kd)
        else:
            dst[c0, c1, c2, c3] = f


@cuda.jit
def _convert_4d(src, dst):
    n0, n1, n2, n3 = src.shape
    total = n0 * n1 * n2 * n3
    i0 = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(i0, total, stride):
        c3 = i % n3
        r = i // n3
        c2 = r % n2
        r = r // n2
        c1 = r % n1
        c0 = r // n1
        dst[c0, c1, c2, c3] = src[c0, c1, c2, c3]
