"""Backend choice from where the arrays live.

NumPy arrays (and anything ``np.asarray`` accepts) run on the CPU; objects
exposing ``__cuda_array_interface__`` (numba device arrays, CuPy arrays,
PyTorch CUDA tensors) run on the GPU. Mixing the two is a ``TypeError``.
"""
from __future__ import annotations

import numpy as np


def is_device(a) -> bool:
    """True when ``a`` is a GPU array (exposes ``__cuda_array_interface__``)."""
    if isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    # arrays of numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) expose no interface
    return type(a).__module__.startswith("numba.cuda.simulator")


def backend_of(**arrays) -> str:
    """Return ``"cpu"`` or ``"cuda"`` for the given named arrays.

    ``None`` values are ignored. Raises ``TypeError`` naming the arguments
    when host and device arrays are mixed.
    """
    host, dev = [], []
    for name, a in arrays.items():
        if a is None:
            continue
        (dev if is_device(a) else host).append(name)
    if host and dev:
        raise TypeError(
            "cannot mix host (NumPy) and device (CUDA) arrays: "
            f"{', '.join(host)} on the host, {', '.join(dev)} on the device"
        )
    return "cuda" if dev else "cpu"


def cuda_module(name: str):
    """Import ``numoe._cuda.<name>`` lazily (numba-cuda is optional)."""
    import importlib

    try:
        return importlib.import_module(f"numoe._cuda.{name}")
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "device arrays were passed but the CUDA backend is unavailable "
            f"({exc}); install numoe[cuda] (numba-cuda)"
        ) from exc


def backends() -> list:
    """What is usable here: ``["cpu"]`` plus ``"cuda: <device name>"`` when a GPU works."""
    out = ["cpu"]
    try:
        from numba import cuda

        if cuda.is_available():
            dev = cuda.get_current_device()
            name = getattr(dev, "name", "CUDA simulator")   # the simulator's has no name
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append(f"cuda: {name}")
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        pass
    return out
