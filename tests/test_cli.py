"""Smoke tests of the ``numoe`` command line and the benchmark suites, on tiny shapes."""
import ctypes.util
import json
import os
import pydoc
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numoe
from numoe import bench
from numoe.__main__ import _parser, main

TINY = [name for name, row in bench.ROWS.items() if not row.default and not row.full]
ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _table_lines(out):
    """The table of a bench printout: from the header row to its last data row."""
    lines = out.splitlines()
    heads = ("row ", "E ", "layer ", "run ")
    start = next(i for i, line in enumerate(lines) if line.startswith(heads))
    end = next(i for i in range(start, len(lines) + 1)
               if i == len(lines) or not lines[i].strip() or lines[i].startswith("  "))
    return lines[start:end]


def test_info(capsys):
    rc, out, _ = _run(capsys, "info")
    assert rc == 0
    assert f"numoe {numoe.__version__}" in out
    assert "numba" in out and "numpy" in out and "BLAS" in out
    assert "backends: cpu" in out


def test_info_from_python_is_what_the_cli_prints(capsys):
    d = numoe.info()
    assert d["numoe"] == numoe.__version__ and "cpu" in d["backends"]
    assert d["threads"] >= 1 and d["cores"] >= 1 and d["isa"]
    _, out, _ = _run(capsys, "info")
    assert f"cpu: {d['cpu']}, {d['cores']} cores, 16-bit GEMM path: {d['isa']}" in out


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "numoe", "info"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("numoe ")


def test_help_of_result_types_has_no_forward_refs():
    for cls in (numoe.DispatchPlan, numoe.Routing):
        text = pydoc.render_doc(cls)
        assert "ForwardRef" not in text


def test_isa_path_names_a_path():
    assert isinstance(bench.isa_path(), str) and bench.isa_path()
    assert bench._fallback_name({"avx2", "fma"}) == "avx2 fallback"
    assert bench._fallback_name({"avx512f", "avx2"}) == "avx512 fallback"
    assert bench._fallback_name(set()) == "generic fallback"


def test_list_names_every_row(capsys):
    rc, out, _ = _run(capsys, "bench", "--list")
    assert rc == 0
    for name in bench.ROWS:
        assert name in out


def test_select_rows():
    assert all(r.default for r in bench.select_rows())
    full = bench.select_rows(full=True)
    assert set(bench.select_rows()) < set(full) and all(r.default or r.full for r in full)
    assert [r.name for r in bench.select_rows("tiny-olmoe,tiny-mix*")] == ["tiny-olmoe",
                                                                          "tiny-mixtral"]
    with pytest.raises(ValueError, match="unknown row"):
        bench.select_rows(["no-such-row"])


def test_default_suite_is_light():
    """The default rows hold at most ~1.6 GB of float32 expert weights each (< 3 GiB peak)."""
    for r in bench.select_rows():
        assert r.E * 3 * r.H * r.F * 4 < 2 << 30, r.name


def test_custom_row():
    row = bench.custom_row("16,8,2,32,48", "olmoe")
    assert (row.name, row.preset, row.T, row.E, row.k, row.H, row.F) == (
        "olmoe-T16-E8-k2-H32-F48", "olmoe", 16, 8, 2, 32, 48)
    assert bench.build_config(bench.custom_row("4,16,2,32,8", "deepseek_v3")).n_groups == 8
    with pytest.raises(ValueError, match="five integers"):
        bench.custom_row("1,2,3")
    with pytest.raises(ValueError, match="preset"):
        bench.custom_row("1,2,1,4,4", "nope")


def test_bench_custom_shape(capsys, tmp_path):
    jpath = tmp_path / "out.json"
    rc, out, err = _run(capsys, "bench", "--shape", "16,8,2,32,48", "--preset", "olmoe",
                        "--repeat", "1", "--no-hf", "--json", str(jpath))
    assert rc == 0, err
    (row,) = json.loads(jpath.read_text())["rows"]
    assert row["name"] == "olmoe-T16-E8-k2-H32-F48" and row["check"] == "PASS"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "olmoe"], "add --shape"),
    (["--shape", "1,2"], "five integers"),
    (["--shape", "16,8,2,32,48", "--shapes", "tiny-olmoe"], "not both"),
    (["--shapes", "no-such-row"], "unknown row 'no-such-row'"),
    (["routing", "--weights", "int8"], "--weights applies"),
])
def test_bad_options_are_clear_errors(capsys, argv, message):
    rc, _, err = _run(capsys, "bench", "--no-hf", *argv)
    assert rc == 2
    assert message in err


def test_conflicting_suites_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "routing", "--latency"])


def test_layer_flops_counts_router_experts_and_shared():
    layer = numoe.MoELayer.random(bench.build_config(bench.ROWS["tiny-deepseek-v3"]))
    T, H, E, k, F = 16, 32, 32, 4, 16
    expected = 2 * T * H * E + 2 * T * k * H * F * 3 + 2 * T * H * 16 * 3
    assert bench.layer_flops(layer, T) == expected


# ------------------------------------------------------------------ timing
def test_time_calls_batches_short_calls_and_gives_a_spread():
    t = bench.time_calls(lambda: 1 + 1, repeat=5)
    assert t.calls > 1 and t.runs == 5 and t.result == 2
    assert 0 < t.min <= t.q1 <= t.median <= t.q3 <= t.max
    assert t.median * t.calls >= 0.5 * bench.MIN_SAMPLE_S     # each sample well above resolution
    sp = t.spread()
    assert set(sp) == {"min", "q1", "median", "q3", "max", "runs", "calls"}


def test_time_calls_does_not_batch_long_calls():
    t = bench.time_calls(lambda: bench.time.sleep(2 * bench.MIN_SAMPLE_S), repeat=2)
    assert t.calls == 1 and t.min >= 2 * bench.MIN_SAMPLE_S


def test_noise_warnings():
    quiet = dict(name="a", numoe_spread=dict(min=1.0, q1=1.0, median=1.0, q3=1.01, max=1.1,
                                             runs=5, calls=1))
    noisy = dict(name="b", numoe_spread=dict(min=1.0, q1=1.0, median=1.2, q3=1.5, max=3.0,
                                             runs=5, calls=1))
    assert bench.noise_warnings([quiet], ["numoe_s"]) == []
    (w,) = bench.noise_warnings([quiet, noisy], ["numoe_s"])
    assert w.startswith("b:") and "numoe 42%" in w
    assert bench.noise_warnings([], [], load_before=(0.1, 2), load_after=(2.2, 2),
                                threads=2) == []
    (w,) = bench.noise_warnings([], [], load_before=(3.0, 2), load_after=None)
    assert "load 3.00 before" in w


def test_roofs_are_positive():
    assert bench.read_bandwidth(8 << 20, repeat=2) > 0
    assert bench.memory_bandwidth(8 << 20, repeat=2) > 0
    assert bench.blas_gflops(np.float32, n=64, repeat=2) > 0
    assert bench.blas_gflops("bfloat16", n=64, repeat=2) > 0    # measured in float32


def test_read_pass_sums():
    a = np.arange(1000, dtype=np.float32)
    assert bench._read_pass(a, 7) == pytest.approx(a.sum())


# ------------------------------------------------------------------ suites
def test_bench_layers_tiny(capsys, tmp_path):
    jpath, ppath = tmp_path / "out.json", tmp_path / "out.png"
    rc, out, err = _run(capsys, "bench", "--shapes", "tiny-mixtral,tiny-deepseek-v3",
                        "--repeat", "3", "--no-hf", "--json", str(jpath), "--plot", str(ppath))
    assert rc == 0, err
    first = out.splitlines()[0]
    assert "cores" in first and "threads" in first and "numpy" in first and "numba" in first
    assert bench.isa_path() in first
    assert "[1/2] tiny-mixtral" in err and "[2/2] tiny-deepseek-v3" in err   # progress
    assert "peak RSS" in out
    table = _table_lines(out)
    assert len(table) == 2 + 2 and len({len(line) for line in table}) == 1   # aligned
    assert "numoe speedup vs ref (>1: faster)" in table[0] and "check" in table[0]
    assert "HF eager" not in table[0]         # --no-hf: no empty HF columns
    assert all(" PASS " in line for line in table[2:])
    assert "legend: " in out and "%BLAS" in out and "tolerance" in out
    data = json.loads(jpath.read_text())
    assert data["suite"] == "layers" and [r["name"] for r in data["rows"]] == [
        "tiny-mixtral", "tiny-deepseek-v3"]
    import numba
    assert data["machine"]["threads"] == numba.get_num_threads()
    assert data["machine"]["isa"] and data["legend"]
    for r in data["rows"]:
        assert r["rel_err"] < r["tol"] == bench.TOLERANCE["float32"] and r["check"] == "PASS"
        assert r["numoe_s"] > 0 and r["ref_s"] > 0 and r["gflops"] > 0
        sp = r["numoe_spread"]
        assert sp["min"] <= sp["median"] == r["numoe_s"] <= sp["max"] and sp["runs"] == 3
        assert r["blas_gflops"] == max(r["blas_gflops_before"], r["blas_gflops_after"])
        assert r["ref_speedup"] == pytest.approx(r["ref_s"] / r["numoe_s"])
    assert ppath.stat().st_size > 1000


def test_bench_batch_invariant_column(capsys, tmp_path):
    """--batch-invariant times the same layer in the batch-invariant mode next to it."""
    jpath = tmp_path / "out.json"
    rc, out, err = _run(capsys, "bench", "--shapes", "tiny-mixtral", "--repeat", "3",
                        "--no-hf", "--batch-invariant", "--json", str(jpath))
    assert rc == 0, err
    table = _table_lines(out)
    assert "batch-invariant ms" in table[0] and "batch-invariant cost" in table[0]
    assert "batch_invariant=True" in out          # the legend says what it is
    (r,) = json.loads(jpath.read_text())["rows"]
    assert r["inv_s"] > 0 and r["inv_cost"] == pytest.approx(r["inv_s"] / r["numoe_s"])
    assert r["inv_err"] < r["tol"]
    rc, out, err = _run(capsys, "bench", "routing", "--batch-invariant")
    assert rc != 0 and "--batch-invariant" in err


def test_check_fails_beyond_the_tolerance(monkeypatch):
    monkeypatch.setitem(bench.TOLERANCE, "float32", 0.0)
    (row,) = bench.run_layer_suite(["tiny-olmoe"], repeat=1, hf=False)
    assert row["check"] == "FAIL" and row["rel_err"] > 0


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


def _narrow_layers_supported():
    try:
        cfg = bench.build_config(bench.ROWS["tiny-olmoe"])
        numoe.MoELayer.random(cfg, dtype="bfloat16", weight_dtype="bfloat16")
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.skipif(not _narrow_layers_supported(),
                    reason="this numoe's MoELayer.random has no bfloat16/weight_dtype yet")
@pytest.mark.parametrize("dtype, weights", [("bfloat16", None), ("float32", "bfloat16"),
                                            ("float16", None)])
def test_narrow_layers(dtype, weights):
    (row,) = bench.run_layer_suite(["tiny-olmoe"], dtype=dtype, weights=weights, repeat=1,
                                   hf=False)
    assert row["dtype"] == dtype and row["weights"] == (weights or dtype)
    assert row["check"] == "PASS" and row["tol"] == bench.TOLERANCE[dtype]


@pytest.mark.parity
@pytest.mark.skipif(not _narrow_layers_supported(),
                    reason="this numoe's MoELayer.random has no bfloat16/weight_dtype yet")
def test_hf_columns_in_bfloat16():
    pytest.importorskip("transformers")
    (row,) = bench.run_layer_suite(["tiny-olmoe"], dtype="bfloat16", repeat=1)
    assert row["hf_eager_s"] > 0 and row["hf_err"] < 5e-2


def test_weight_bytes_follow_the_storage():
    size = {w: bench.run_layer_suite(["tiny-olmoe"], weights=w, repeat=1, hf=False)[0][
        "weight_bytes"] for w in ("float32", "bfloat16", "int8")}
    assert 0.45 * size["float32"] < size["bfloat16"] < 0.55 * size["float32"]
    assert size["int8"] < 0.35 * size["float32"]


def test_unsupported_precision_is_a_clear_error(monkeypatch):
    def old_random(cfg, seed=0, dtype=np.float32):
        raise TypeError("dtype must be float32 or float64")
    monkeypatch.setattr(numoe.MoELayer, "random", staticmethod(old_random))
    with pytest.raises(ValueError, match="cannot build a layer of bfloat16"):
        bench.build_layer(bench.ROWS["tiny-olmoe"], "bfloat16")


def test_float64_layers():
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
        assert r["experts_equal"] and r["check"] == "PASS"
        assert r["H"] == 2048
        for key in ("route", "ref_route", "plan", "permute", "unpermute", "copy"):
            assert r[key + "_s"] > 0 and r[key + "_spread"]["min"] <= r[key + "_s"]
    assert len({len(line) for line in _table_lines(out)}) == 1
    assert "plan % perm" in out and "legend:" in out


def test_routing_shrinks_width_to_fit_memory():
    (row,) = bench.run_routing_suite(64, experts=(8,), ks=(2,), repeat=1,
                                     max_bytes=64 * 2 * 100 * 4)
    assert row["H"] == 100


def test_latency_suite_small(tmp_path):
    rows = bench.run_latency_suite("tiny-olmoe", tokens=(1, 3), budget=0.05, min_calls=5,
                                   bandwidth_bytes=4 << 20)
    assert [r["T"] for r in rows] == [1, 3]
    assert [r["shape"] for r in rows] == ["tiny-olmoe-T1", "tiny-olmoe-T3"]   # the real T
    for r in rows:
        assert r["calls"] >= 5
        assert 0 < r["min_s"] <= r["p50_s"] <= r["p95_s"] <= r["p99_s"] <= r["max_s"]
        assert 1 <= r["touched_experts"] <= min(r["E"], r["T"] * r["k"])
        assert r["floor_s"] > 0 and r["bandwidth_gbs"] == max(r["bandwidth_gbs_before"],
                                                              r["bandwidth_gbs_after"])
        assert r["threads"] >= 1
    text = bench.format_table(rows, "latency")
    assert "fresh tokens" in text and "read-only pass" in text
    bench.plot(rows, "latency", tmp_path / "lat.png", title="t")
    assert (tmp_path / "lat.png").stat().st_size > 1000


def test_train_suite_small():
    (r,) = bench.run_train_suite(["tiny-olmoe"], repeat=1, hf=False)
    assert r["numoe_grads"].startswith("out=")       # timed as a training loop runs it
    assert r["numoe_s"] > 0 and r["numoe_new_s"] > 0 and r["numoe_fwd_s"] > 0
    assert r["speedup"] is None and any("HF" in n for n in r["notes"])
    text = bench.format_table([r], "train")
    assert "new-grads" in text and "out=g" in text

def test_threads_option_runs_in_a_child_with_blas_pinned(capfd):
    rc = main(["bench", "--threads", "1", "--shapes", "tiny-mixtral", "--repeat", "1",
               "--no-hf"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "1 threads" in out.splitlines()[0]


def test_cuda_without_gpu_says_why():
    """Without a GPU driver (and without the simulator), ``--device cuda`` fails plainly."""
    if ctypes.util.find_library("cuda"):
        pytest.skip("an NVIDIA driver is installed: --device cuda would run, not fail")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "numoe", "bench", "--device", "cuda",
                           "--shapes", "tiny-mixtral"], capture_output=True, text=True,
                          env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "CUDA benchmark could not run" in proc.stderr


def test_cuda_bench_custom_shape_under_the_simulator():
    """``--device cuda`` takes a ``--shape`` row and ``--no-hf`` like the CPU suite
    (run under numba's CUDA simulator: the table, not the timings, is checked)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-m", "numoe", "bench", "--device", "cuda",
                           "--shape", "4,4,2,8,8", "--no-hf", "--repeat", "1"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "mixtral-T4-E4-k2-H8-F8" in proc.stdout
    assert "HF: not requested" in proc.stdout or "n/a" in proc.stdout


@pytest.mark.slow
def test_startup_probe():
    rows = bench.run_startup("tiny-mixtral", warm_runs=1)
    assert [r["mode"] for r in rows] == ["cold", "warm"]
    assert rows[0]["cache"].startswith("empty") and rows[1]["cache"] == "cache on disk"
    for r in rows:
        assert r["import_s"] > 0 and r["first_forward_s"] > 0


def test_table_alignment():
    rows = [dict(mode="cold", cache="empty cache: compiles", shape="x", runs=1, import_s=1.5,
                 first_forward_s=12.0, second_forward_s=0.001, process_s=14.0),
            dict(mode="warm", cache="cache on disk", shape="longer-name", runs=3,
                 import_s=0.5, first_forward_s=None, second_forward_s=0.0012, process_s=2.0)]
    lines = bench.format_table(rows, "startup", with_legend=False).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "n/a" in lines[3]


def test_spread_shown_in_cells():
    sp = dict(min=0.001, q1=0.0011, median=0.0012, q3=0.0013, max=0.002, runs=5, calls=1)
    assert bench._fmt(0.0012, "ms", sp) == "1.2 [1-2]"
    assert bench._fmt(0.0012, "ms") == "1.2"


def test_rel_err():
    assert np.isfinite(bench.rel_err(np.ones(3), np.ones(3)))
    assert bench.rel_err(np.zeros(2), np.zeros(2)) == 0.0


# ------------------------------------------- commands quoted in the docs
def _quoted_commands():
    """Every ``numoe ...`` command quoted in README.md, docs/*.md and the notebooks."""
    texts = [(p.name, p.read_text()) for p in [ROOT / "README.md", *sorted(
        (ROOT / "docs").glob("*.md"))]]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts.append((nb.name, "\n".join("".join(c["source"]) for c in cells)))
    # inline code is a command when it names a subcommand or passes an option (not, say,
    # the column header `numoe ms`); every `numoe` line of a code block is a command
    inline = re.compile(r"numoe (info|bench)\b|numoe .*\s-")
    found = []
    for name, text in texts:
        spans = [(s, False) for s in re.findall(r"`([^`\n]+)`", text)]
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):   # shell lines only,
            spans += [(line, True) for line in block.splitlines()       # not printed output
                      if line.startswith("numoe ") or "&& numoe " in line]   # (indented)
        for span, in_block in spans:
            for part in re.split(r"&&|;|\|", span):
                part = part.split(" #")[0].strip()
                if re.match(r"numoe( |$)", part) and (in_block or inline.match(part)):
                    found.append((name, part))
    return found


def test_docs_quote_commands():
    names = {name for name, _ in _quoted_commands()}
    assert "README.md" in names and "03_performance.ipynb" in names


@pytest.mark.parametrize("where, command", _quoted_commands(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_quoted_command_parses(where, command):
    """Every quoted ``numoe`` command is accepted by the real argument parser."""
    argv = [a for a in shlex.split(command)[1:] if a != "..."] or ["info"]
    try:
        _parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code})")


def test_asv_machine_is_named_after_the_cpu():
    import importlib.util
    spec = importlib.util.spec_from_file_location("asv_machine", ROOT / "asv_bench" / "machine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.machine_name("AMD EPYC 9B45 128-Core Processor",
                            {"avx2", "avx512f", "avx512_bf16"}, 2) == "amd-epyc-9b45-avx512bf16-2c"
    assert mod.machine_name("AMD EPYC 7B13 64-Core Processor", {"avx2"}, 2) == \
        "amd-epyc-7b13-avx2-2c"
    assert mod.machine_name("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", {"avx512f"}, 4) \
        == "intel-xeon-platinum-8481c-avx512-4c"
    assert re.fullmatch(r"[a-z0-9-]+-(avx512bf16|avx512|avx2|generic)-\d+c", mod.machine_name())
