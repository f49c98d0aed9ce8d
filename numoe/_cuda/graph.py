"""Device forwards replayed as captured CUDA graphs (decode sizes, and prefill
sizes of 16-bit layers).

At decode sizes (a few tokens) the fused forward of :mod:`numoe._cuda.moe`
is a dozen small kernels whose GPU time is far below what Python spends
launching them. A layer called again and again with the same token count
therefore captures that forward once, on its second call with that shape,
into a CUDA graph (stream capture through the driver API), and from then on
a call is: copy ``x`` into the graph's input buffer, launch the graph, read
the routing status back (the one synchronisation the eager forward has
too), copy the output out. The maths is the eager forward's, kernel for
kernel, so results are bit-identical to it.

What the graph relies on, and how it is kept:

* every launch goes to the capturing stream (``_launch.on_stream``);
* every array the forward allocates is carved from one arena shared by all
  graphs (``_arrays.ARENA``; the graph keeps it, so its replays never write
  memory handed out again). Replays run one at a time, in the order of the
  legacy default stream, under a lock, and each one's output and routing
  status are copied out before the next may start, so the graphs can share
  their scratch memory: a 16-bit OLMoE-sized forward of 4096 tokens needs
  about 350 MB, once, not once per graph. A capture that needs more than the
  arena holds grows it (at least doubling; graphs captured before keep the
  smaller arena) and captures again; past :data:`ARENA_LIMIT` bytes the
  shape runs eagerly;
* the weights are read through the addresses they had at capture: the cache
  key holds the identity of every weight array (in-place updates are seen,
  a replaced array means a new capture);
* capture runs in the driver's global mode: any synchronising call inside
  the forward (a host read-back, a blocking copy) fails the capture instead
  of running out of order; such a shape is then run eagerly for good.

Used for layers without a capacity (their forward has no host read-back)
and C-contiguous ``x`` with at most :data:`MAX_TOKENS` tokens -- or, for
16-bit expert weights (whose forward is the tensor-core tiles at any size),
at most :data:`MAX_TOKENS_16` -- and at most :data:`MAX_GRAPHS` shapes per
layer; the numba GEMM kernels and the tensor-core tiles only (no cuBLAS;
16-bit weights: :mod:`numoe._cuda.mma`, or the split-K GEMV of
:mod:`numoe._cuda.decode` where the tensor cores cannot run).
``NUMOE_CUDA_GRAPH=0`` turns it off.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np

from . import _arrays as A
from . import _launch as L

MAX_TOKENS = 64
MAX_TOKENS_16 = 16384
MAX_GRAPHS = 16
ARENA_LIMIT = int(float(os.environ.get("NUMOE_CUDA_GRAPH_ARENA_MB", "2048")) * 2**20)
ENABLED = L.ENABLED and os.environ.get("NUMOE_CUDA_GRAPH", "1") != "0"

_SEEN, _EAGER = "seen", "eager"     # cache states before a graph exists
FAILURES: list = []                 # why captures failed (for reports and tests)


def _weights(layer):
    dev = getattr(layer, "_dev", None) or {}
    names = ("router", "w_down", "router_bias", "selection_bias", "b_gate", "b_up", "b_down",
             "shared_down_proj", "shared_gate_weight")
    return ([getattr(layer, n, None) for n in names] + [dev.get("w_gate"), dev.get("w_up")]
            + list(dev.get("shared") or ()))


def forward(layer, x):
    """``y`` through this layer's graph for ``x``'s shape, or None: run the eager forward."""
    if not ENABLED or layer.config.capacity_factor is not None:
        return None
    try:
        x = A.as_device("x", x)
    except TypeError:
        return None
    shape = tuple(x.shape)
    wg = getattr(layer, "w_gate", None)
    most = MAX_TOKENS_16 if wg is not None and wg.dtype in A.NARROW else MAX_TOKENS
    if len(shape) < 1 or int(np.prod(shape[:-1], dtype=np.int64)) > most \
            or not x.is_c_contiguous() or x.size == 0:
        return None
    weights = _weights(layer)
    key = (shape, np.dtype(x.dtype).str) + tuple(id(w) for w in weights)
    cache = layer.__dict__.setdefault("_graphs", {})
    state = cache.get(key)
    if state is None:                 # first call: the eager forward compiles every kernel
        if sum(not isinstance(v, str) for v in cache.values()) >= MAX_GRAPHS:
            return None
        cache[key] = _SEEN
        return None
    if state == _EAGER:
        return None
    if state == _SEEN:
        state = _Graph.capture(layer, x, weights)
        cache[key] = _EAGER if state is None else state
        if state is None:
            return None
    return state.run(x)


def captured(layer):
    """Whether ``layer`` holds a captured graph (some shape replays)."""
    return any(isinstance(v, _Graph) for v in layer.__dict__.get("_graphs", {}).values())


class _Graph:
    """One captured forward: its input/output buffers and every array it uses."""

    def __init__(self, exec_, graph, stream, x_in, y_out, status, keep):
        from cuda.bindings import driver

        self.driver = driver
        self.exec, self.graph, self.stream = exec_, graph, stream
        self.x_in, self.y_out, self.status, self.keep = x_in, y_out, status, keep
        self.nbytes_x = x_in.size * x_in.dtype.itemsize
        self.nbytes_y = y_out.size * y_out.dtype.itemsize

    @classmethod
    def capture(cls, layer, x, weights):
        """Capture in the shared arena; once more in a grown arena if it overflowed."""
        arena = _arena()
        with _LOCK:                      # no replay may use the arena meanwhile
            for _ in range(2):
                g = cls._capture(layer, x, weights, arena)
                if g is None or arena.used <= arena.size:
                    return g
                need = arena.used
                del g                    # overflowed: its extra arrays are freed with it
                if need > ARENA_LIMIT:
                    FAILURES.append(f"the forward needs {need} bytes of graph arena, "
                                    f"more than NUMOE_CUDA_GRAPH_ARENA_MB allows")
                    return None
                arena = _arena(need)
        return None

    @classmethod
    def _capture(cls, layer, x, weights, arena):
        from cuda.bindings import driver

        from . import moe

        err, stream = driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
        if int(err):
            return None
        keep = [arena, weights]
        arena.used = 0
        A.KEEP, A.ARENA = keep, arena
        graph = None
        try:
            x_in = A.empty(tuple(x.shape), x.dtype)
            with L.on_stream(int(stream)):
                err, = driver.cuStreamBeginCapture(
                    stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)
                if int(err):
                    raise RuntimeError(f"cuStreamBeginCapture: {err}")
                try:
                    y, status = moe.queue(layer, x_in, gemm="graph")
                finally:
                    err, graph = driver.cuStreamEndCapture(stream)
                if int(err):
                    raise RuntimeError(f"cuStreamEndCapture: {err}")
            if not (y.is_c_contiguous() or A._c_memory(y)):   # a copy would not replay
                raise RuntimeError("the captured output is not C-contiguous")
            y = A.contiguous(y)               # (a C-strided view of the same memory)
            err, exec_ = driver.cuGraphInstantiate(graph, 0)
            if int(err):
                raise RuntimeError(f"cuGraphInstantiate: {err}")
        except Exception as exc:  # noqa: BLE001 - a shape that cannot be captured runs eagerly
            FAILURES.append(f"{type(exc).__name__}: {exc}"[:300])
            if graph is not None:
                driver.cuGraphDestroy(graph)
            driver.cuStreamDestroy(stream)
            return None
        finally:
            A.KEEP = A.ARENA = None
        return cls(exec_, graph, stream, x_in, y, status, keep)

    def run(self, x):
        """Replay on the legacy default stream (ordered with the caller's work); the
        output and the status leave the shared arena before another replay may start."""
        from . import routing as R

        d = self.driver
        s0 = d.CUstream(0)
        y = A.empty(tuple(self.y_out.shape), self.y_out.dtype)
        with _LOCK:
            _check(d.cuMemcpyDtoDAsync(_ptr(self.x_in), _ptr(x), self.nbytes_x, s0))
            _check(d.cuGraphLaunch(self.exec, s0))
            _check(d.cuMemcpyDtoDAsync(_ptr(y), _ptr(self.y_out), self.nbytes_y, s0))
            if self.status is not None:
                R.check_status(self.status)
        return y

    def __del__(self):
        try:
            self.driver.cuGraphExecDestroy(self.exec)
            self.driver.cuGraphDestroy(self.graph)
            self.driver.cuStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_LOCK = threading.RLock()
_ARENA = [None]
_ALIGN = 256


class _Arena:
    """One device allocation that captures carve their arrays from, front to back."""

    def __init__(self, size):
        self.size = size
        self.used = 0
        self.mem = A.empty((max(size, 1),), np.uint8)     # CuPy's pool (or numba's)
        self.base = self.mem.device_ctypes_pointer.value

    def take(self, shape, dtype):
        """A C-contiguous array at the next free offset, or None past the end (the
        overflow is counted in ``used``: the capture is then repeated in a larger arena)."""
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes == 0:
            return None
        off = self.used
        self.used += -(-nbytes // _ALIGN) * _ALIGN
        if self.used > self.size:
            return None
        return A.wrap(self.mem.gpu_data.context, self.base + off, shape, dtype, self.mem)


def _arena(need=0):
    """The shared arena, replaced by one of at least ``need`` bytes (and at least twice
    the old size) when it is smaller; graphs captured in the old one keep it alive."""
    cur = _ARENA[0]
    if cur is None or cur.size < need:
        size = max(need, 2 * cur.size if cur is not None else 1 << 20)
        _ARENA[0] = cur = _Arena(-(-size // _ALIGN) * _ALIGN)
    return cur


def _ptr(a):
    from cuda.bindings import driver

    return driver.CUdeviceptr(a.device_ctypes_pointer.value or 0)


def _check(res):
    err = res[0] if isinstance(res, tuple) else res
    if int(err):
        raise RuntimeError(f"CUDA graph replay failed: {err}")
