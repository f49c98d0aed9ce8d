"""Smoke tests of the ``numoe`` command line and the benchmark suites, on tiny shapes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numoe
from numoe import bench
from numoe.__main__ import main

TINY = [name for name, row in bench.ROWS.items() if not row.default]


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _table_lines(out):
    """The table of a bench printout: from the header row to the first blank line."""
    lines = out.splitlines()
    heads = ("row", "E ", "layer", "cache")
    start = next(i for i, line in enumerate(lines) if line.startswith(heads))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return [line for line in lines[start:end] if not line.startswith("  note:")]


def test_info(capsys):
    rc, out, _ = _run(capsys, "info")
    assert rc == 0
    assert f"numoe {numoe.__version__}" in out
    assert "numba" in out and "numpy" in out and "BLAS" in out
    assert "backends: cpu" in out


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "numoe", "info"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("numoe ")


def test_list_names_every_row(capsys):
    rc, out, _ = _run(capsys, "bench", "--list")
    assert rc == 0
    for name in bench.ROWS:
        assert name in out


def test_select_rows():
    assert all(r.default for r in bench.select_rows())
    assert [r.name for r in bench.select_rows("tiny-olmoe,tiny-mix*")] == ["tiny-olmoe",
                                                                          "tiny-mixtral"]
    with pytest.raises(ValueError, match="unknown row"):
        bench.select_rows(["no-such-row"])


def test_unknown_shape_is_a_clear_error(capsys):
    rc, _, err = _run(capsys, "bench", "--shapes", "no-such-row", "--no-hf")
    assert rc == 2
    assert "unknown row 'no-such-row'" in err


def test_conflicting_suites_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "routing", "--latency"])


def test_layer_flops_counts_router_experts_and_shared():
    layer = numoe.MoELayer.random(bench.build_config(bench.ROWS["tiny-deepseek-v3"]))
    T, H, E, k, F = 16, 32, 32, 4, 16
    expected = 2 * T * H * E + 2 * T * k * H * F * 3 + 2 * T * H * 16 * 3
    assert bench.layer_flops(layer, T) == expected


def test_bench_layers_tiny(capsys, tmp_path):
    jpath, ppath = tmp_path / "out.json", tmp_path / "out.png"
    rc, out, err = _run(capsys, "bench", "--shapes", "tiny-mixtral,tiny-deepseek-v3",
                        "--repeat", "1", "--no-hf", "--json", str(jpath), "--plot", str(ppath))
    assert rc == 0, err
    first = out.splitlines()[0]
    assert "cores" in first and "threads" in first and "numpy" in first and "numba" in first
    assert "[1/2] tiny-mixtral" in err and "[2/2] tiny-deepseek-v3" in err   # progress
    assert "peak RSS" in out
    table = _table_lines(out)
    assert len(table) == 2 + 2 and len({len(line) for line in table}) == 1   # aligned
    data = json.loads(jpath.read_text())
    assert data["suite"] == "layers" and [r["name"] for r in data["rows"]] == [
        "tiny-mixtral", "tiny-deepseek-v3"]
    for r in data["rows"]:
        assert r["rel_err"] < 1e-5
        assert r["numoe_s"] > 0 and r["ref_s"] > 0 and r["gflops"] > 0
    assert ppath.stat().st_size > 1000


@pytest.mark.parity
def test_hf_blocks_match_the_reference():
    """Every family's Hugging Face block, given the layer's weights, computes the same layer."""
    pytest.importorskip("transformers")
    rows = bench.run_layer_suite(TINY, repeat=1)
    assert [r["name"] for r in rows] == TINY
    for r in rows:
        assert r["rel_err"] < 1e-5, r["name"]
        assert r["hf_err"] is not None and r["hf_err"] < 1e-5, (r["name"], r["notes"])
        assert r["hf_eager_s"] > 0 and r["speedup"] > 0


def test_float64_layers(capsys):
    rows = bench.run_layer_suite(["tiny-olmoe"], dtype="float64", repeat=1, hf=False)
    assert rows[0]["dtype"] == "float64" and rows[0]["rel_err"] < 1e-12


def test_bench_routing_small(capsys, tmp_path):
    jpath = tmp_path / "routing.json"
    rc, out, err = _run(capsys, "bench", "routing", "--tokens", "256", "--repeat", "1",
                        "--json", str(jpath))
    assert rc == 0, err
    rows = json.loads(jpath.read_text())["rows"]
    assert [(r["E"], r["k"]) for r in rows] == [(8, 2), (8, 8), (64, 2), (64, 8), (256, 2),
                                               (256, 8)]
    for r in rows:
        assert r["experts_equal"]
        assert r["H"] == 2048
        for key in ("route_s", "ref_route_s", "plan_s", "permute_s", "unpermute_s", "copy_s"):
            assert r[key] > 0
    assert len({len(line) for line in _table_lines(out)}) == 1


def test_routing_shrinks_width_to_fit_memory():
    (row,) = bench.run_routing_suite(64, experts=(8,), ks=(2,), repeat=1,
                                     max_bytes=64 * 2 * 100 * 4)
    assert row["H"] == 100


def test_latency_suite_small():
    rows = bench.run_latency_suite("tiny-olmoe", tokens=(1, 3), budget=0.05, min_calls=5,
                                   bandwidth_bytes=4 << 20)
    assert [r["T"] for r in rows] == [1, 3]
    for r in rows:
        assert r["calls"] >= 5
        assert 0 < r["p50_s"] <= r["p95_s"] <= r["p99_s"]
        assert 1 <= r["touched_experts"] <= min(r["E"], r["T"] * r["k"])
        assert r["floor_s"] > 0 and r["bandwidth_gbs"] > 0


def test_threads_option_runs_in_a_child_with_blas_pinned(capfd):
    rc = main(["bench", "--threads", "1", "--shapes", "tiny-mixtral", "--repeat", "1",
               "--no-hf"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "1 threads" in out.splitlines()[0]


@pytest.mark.skipif(bool(os.environ.get("NUMBA_ENABLE_CUDASIM")) or len(numoe.backends()) > 1,
                    reason="a CUDA backend is present")
def test_cuda_without_gpu_says_why(capsys):
    rc, _, err = _run(capsys, "bench", "--device", "cuda", "--shapes", "tiny-mixtral")
    assert rc == 2
    assert "CUDA benchmark could not run" in err


@pytest.mark.slow
def test_startup_probe():
    rows = bench.run_startup("tiny-mixtral", warm_runs=1)
    assert [r["mode"] for r in rows] == ["cold", "warm"]
    for r in rows:
        assert r["import_s"] > 0 and r["first_forward_s"] > 0


def test_table_alignment():
    rows = [dict(mode="cold", shape="x", runs=1, import_s=1.5, first_forward_s=12.0,
                 second_forward_s=0.001, process_s=14.0),
            dict(mode="warm", shape="longer-name", runs=3, import_s=0.5, first_forward_s=None,
                 second_forward_s=0.0012, process_s=2.0)]
    lines = bench.format_table(rows, "startup").splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "n/a" in lines[3]


def test_rel_err():
    assert np.isfinite(bench.rel_err(np.ones(3), np.ones(3)))
    assert bench.rel_err(np.zeros(2), np.zeros(2)) == 0.0
