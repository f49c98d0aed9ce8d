"""Start-up cost: ``import numoe`` and the first calls, each in a fresh interpreter.

``timeraw_`` benchmarks time the returned code in a new Python process. For
the ``first_`` ones the untimed setup code points ``NUMBA_CACHE_DIR`` at a
fresh temporary folder (removed at exit), so "first call" means a cold JIT:
nothing is loaded from an on-disk cache. ``timeraw_warm_layer`` is the second
time a user runs a script: its setup runs the same script once in another
process (which compiles only if numba's usual cache, next to the installed
numoe or in ``NUMBA_CACHE_DIR``, is not already filled), then the timed
start loads the compiled code from that cache.
"""
_FRESH_CACHE = """
import atexit, os, shutil, tempfile
_cache = tempfile.mkdtemp(prefix="numoe-asv-jit-")
atexit.register(shutil.rmtree, _cache, True)
os.environ["NUMBA_CACHE_DIR"] = _cache
"""

_ROUTE = """
import numpy as np
import numoe
logits = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
numoe.route(logits, 2)
"""

_LAYER_LINES = [
    "import numpy as np",
    "import numoe",
    "config = numoe.MoEConfig(8, 2, 64, 128)",
    "layer = numoe.MoELayer.random(config, seed=0, dtype=np.float32)",
    "x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)",
    "layer(x)",
]
_LAYER = "\n".join(_LAYER_LINES)


class Startup:
    """One sample per fresh process; cold compiles take seconds, so few samples."""

    number = 1
    rounds = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0
    timeout = 600

    def timeraw_import_numoe(self):
        return "import numoe", _FRESH_CACHE

    def timeraw_first_route(self):
        """``import numoe`` plus one cold-compiled ``route`` call."""
        return _ROUTE, _FRESH_CACHE

    def timeraw_first_layer(self):
        """``import numoe`` plus one cold-compiled forward pass of a small layer."""
        return _LAYER, _FRESH_CACHE

    def timeraw_warm_layer(self):
        """The same forward pass with the JIT cache already on disk (a warm start)."""
        # one line, so that it survives asv's embedding in a triple-quoted string
        fill = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
                f"{'; '.join(_LAYER_LINES)!r}], check=True)")
        return _LAYER, fill
