"""asv benchmarks for numoe: one module per area, one class per operation.

Run from ``asv_bench/`` (see ``asv_bench/README.md``). Every ``setup`` calls
the kernel once, so Numba compilation never lands in a timed sample; cold
start is measured on its own by the ``timeraw_`` benchmarks in ``startup.py``.
"""
