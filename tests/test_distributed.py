"""Expert parallelism (numoe.distributed): the expert split, errors, and
``mpiexec -n 2`` / ``-n 3`` runs of tests/_mpi_worker.py against the one-process layer.

The MPI runs need mpi4py and an ``mpiexec`` (the ``mpi`` extra brings both);
they are skipped, with the reason, when either is missing. Each launch runs
every case of the worker (tiny shapes, one Numba thread per rank) and takes
seconds once the Numba cache is warm.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numoe
from numoe.distributed import split_experts

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_mpi_worker.py"


def _mpiexec():
    """The mpiexec beside this Python (the venv's, from the mpich wheel), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def _mpi4py_reason():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec beside the Python interpreter or on PATH (pip install -e '.[mpi]')"
    return None


MPI_MISSING = _mpi4py_reason()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))


# ------------------------------------------------------------ expert split
@pytest.mark.parametrize("E,P", [(8, 2), (8, 3), (16, 3), (2, 3), (1, 1), (1, 4), (64, 7),
                                 (5, 5)])
def test_split_experts_is_contiguous_and_even(E, P):
    b = split_experts(E, P)
    sizes = np.diff(b)
    assert b.dtype == np.int64 and b.shape == (P + 1,)
    assert b[0] == 0 and b[-1] == E and (sizes >= 0).all()
    assert sizes.max() - sizes.min() <= 1
    assert (np.diff(sizes) <= 0).all()          # the larger blocks come first


@pytest.mark.parametrize("args,exc,match", [
    ((0, 2), ValueError, "num_experts must be >= 1"),
    ((4, 0), ValueError, "num_ranks must be >= 1"),
    ((4.0, 2), TypeError, "num_experts must be an int"),
    ((4, True), TypeError, "num_ranks must be an int"),
])
def test_split_experts_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        split_experts(*args)


def test_import_numoe_does_not_need_mpi4py():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numoe, numoe.distributed\n"
            "assert numoe.distributed.split_experts(3, 2).tolist() == [0, 2, 3]\n"
            "try:\n"
            "    numoe.distributed.ExpertParallel(numoe.MoELayer.random("
            "numoe.MoEConfig(num_experts=2, top_k=1, hidden_dim=2, expert_dim=2)))\n"
            "except ImportError as exc:\n"
            "    assert 'pip install' in str(exc), exc\n"
            "else:\n"
            "    raise SystemExit('no ImportError without mpi4py')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------- in-process, one rank
@needs_mpi
def test_one_rank_equals_the_layer_bit_for_bit():
    from mpi4py import MPI

    cfg = numoe.MoEConfig.qwen2_moe(num_experts=6, top_k=2, hidden_dim=16, expert_dim=12,
                                    shared_expert_dim=20, capacity_factor=0.7)
    layer = numoe.MoELayer.random(cfg, seed=3)
    ep = numoe.distributed.ExpertParallel(layer, MPI.COMM_SELF)
    assert list(ep.experts) == list(range(6)) and ep.size == 1
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    x0 = x.copy()
    y, info = ep.forward(x, return_info=True)
    y_ref, info_ref = layer.forward(x, return_info=True)
    assert np.array_equal(x, x0)                    # input untouched
    assert y.shape == x.shape and np.array_equal(y, y_ref)
    assert np.array_equal(info["plan"].dropped, info_ref["plan"].dropped)
    assert info["plan"].capacity == info_ref["plan"].capacity
    assert info["plan"].dropped.any()               # the capacity did drop something
    assert info["aux_loss"] == pytest.approx(info_ref["aux_loss"], rel=1e-12)
    assert set(ep.timings) == {"route", "exchange", "experts", "combine"}
    assert ep.traffic["sent"] == 0 and ep.traffic["local"] > 0
    y0 = ep(np.zeros((0, 16), np.float32))          # no tokens
    assert y0.shape == (0, 16)
    # backward: one rank holds every expert, so it is the layer's backward, bit for bit
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    coefs = dict(aux_loss_coef=0.02, z_loss_coef=0.001)
    g = ep.backward(x, info, dy, **coefs)
    g_ref = layer.backward(x, info_ref, dy, **coefs)
    assert sorted(g) == sorted(g_ref)
    for name, ref in g_ref.items():
        assert g[name].dtype == ref.dtype and np.array_equal(g[name], ref), name
    with pytest.raises(TypeError, match="info must be the dict from ep.forward"):
        ep.backward(x, info_ref, dy)


@needs_mpi
def test_errors_in_process():
    from mpi4py import MPI

    cfg = numoe.MoEConfig(num_experts=2, top_k=1, hidden_dim=4, expert_dim=4)
    with pytest.raises(TypeError, match="layer must be a numoe.MoELayer"):
        numoe.distributed.ExpertParallel(object(), MPI.COMM_SELF)
    ep = numoe.distributed.ExpertParallel(numoe.MoELayer.random(cfg), MPI.COMM_SELF)
    with pytest.raises(ValueError, match="hidden_dim = 4"):
        ep(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        ep(np.zeros((3, 4), np.float64))
    assert ep(np.ones((1, 4), np.float32)).shape == (1, 4)   # still usable


# ------------------------------------------------------- mpiexec -n P runs
def _env():
    """One thread per rank (Numba and BLAS); numoe importable from this checkout."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent),
                                                      env.get("PYTHONPATH")]))
    return env


def _worker_cases():
    src = WORKER.read_text()
    block = src[src.index("CASES = {"):src.index("\n}\n")]
    return [line.split('"')[1] for line in block.splitlines()[1:] if line.startswith('    "')]


@needs_mpi
@pytest.mark.parametrize("P", [2, 3])
def test_mpiexec_runs_equal_one_process(P):
    cmd = [_mpiexec(), "-n", str(P), sys.executable, str(WORKER)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(),
                       cwd=HERE.parent)
    out = r.stdout + r.stderr
    cases = _worker_cases()
    assert len(cases) >= 10
    ok = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("OK ")]
    assert r.returncode == 0, out
    assert sorted(ok) == sorted(cases), out


@needs_mpi
def test_bench_ep_smoke(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "numoe", "bench", "ep",
           "--shapes", "40,4,2,16,24", "--repeat", "2", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(),
                       cwd=HERE.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cost model" in r.stdout and "2 ranks: rank 1" in r.stdout, r.stdout
    res = json.loads(out.read_text())
    assert res["ranks"] == 2 and [d["T"] for d in res["per_rank"]] == [20, 20]
    for d in res["per_rank"]:
        assert d["sent"] == d["received"]                     # both trips, balanced rows
        assert all(d[p] >= 0 for p in ("route", "exchange", "experts", "combine"))
