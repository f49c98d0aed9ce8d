"""Shared test configuration: Hypothesis profiles and the backend fixture.

Profiles (``NUMOE_HYPOTHESIS_PROFILE``):
  ci       -- deterministic, small example counts (default)
  nightly  -- random, many examples
"""
import ctypes.util
import os

# Without an NVIDIA driver, run the CUDA backend's tests under numba's CUDA
# simulator (tiny sizes). pytest's warning filters may already have imported
# numba, so its configuration is re-read (numba.cuda itself is not imported yet).
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not ctypes.util.find_library("cuda"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numba.core.config

    numba.core.config.reload_config()

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "nightly", deadline=None, max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("NUMOE_HYPOTHESIS_PROFILE", "ci"))


def _cuda_ok():
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


CUDA = _cuda_ok()
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """Parametrise a test over the CPU and (when usable) the CUDA backend."""
    if request.param == "cuda" and not CUDA:
        pytest.skip("no CUDA device (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")
    return request.param


def to_backend(backend, a):
    """Move a host array to the backend (None passes through)."""
    if a is None or backend == "cpu":
        return a
    from numoe._cuda import _arrays as A     # bfloat16 too (numba's own copy refuses it)
    return A.to_device(np.ascontiguousarray(a))


def to_host(a):
    """Bring a result back to NumPy (device arrays are copied)."""
    if hasattr(a, "copy_to_host"):
        from numoe._cuda import _arrays as A
        return A.to_host(a)
    return np.asarray(a)


# tolerances per float dtype, for comparisons with the float64 reference
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-6, np.float64: 1e-13}
# 16-bit results are computed in float32 and rounded once to the storage dtype
# (tests/test_precision.py): the float32 tolerance plus one rounding, the unit
# roundoff u = 2**-8 (bfloat16, 8-bit significand) or 2**-11 (float16, 11 bits);
# float16 results below 2**-14 are subnormal, absolute error up to 2**-25.
RTOL[np.float16] = 2.0**-11 + RTOL[np.float32]
ATOL[np.float16] = 2.0**-25 + ATOL[np.float32]
RTOL[ml_dtypes.bfloat16] = 2.0**-8 + RTOL[np.float32]
ATOL[ml_dtypes.bfloat16] = ATOL[np.float32]
