"""numba.cuda kernels; imported lazily by the public wrappers (numba-cuda is optional)."""
