"""The benchmark suite runs end to end in its tiny mode and writes what it promises.

No timing is asserted: this checks that every case runs and every reported field is there.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from tests import refs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_run_module():
  spec = importlib.util.spec_from_file_location("jaxnorm_benchmarks_run",
                                                ROOT / "benchmarks" / "run.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_tiny_benchmark_writes_json_markdown_and_chart(tmp_path, capsys):
  bench = _load_run_module()
  bench.main(["--tiny", "--hlo", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "results.json").read_text())
  meta, records = result["meta"], result["records"]
  assert meta["mode"] == "tiny" and "jaxnorm" in meta["libs"] and "jnp" in meta["libs"]
  for key in ("date", "jax", "backend", "device", "reference", "skipped_libs", "failed_cases"):
    assert key in meta
  # jaxnorm and the plain-jnp reference run every case: 5 normalizers x 2 passes.
  for lib in ("jaxnorm", "jnp"):
    cases = {(r["norm"], r["pass"]) for r in records if r["lib"] == lib}
    assert cases == {(n, p) for n in bench.NORMS for p in ("fwd", "fwd+bwd")}, lib
  printed = capsys.readouterr().out
  # --hlo printed each case's fusion counts, forward and forward+backward.
  hlo = {(m[1], m[2]): {"fwd": int(m[3]), "fwd+bwd": int(m[4])} for m in re.finditer(
      r"fusions (\S+)\s+(\S+)\s+\S+ \S+\s+fwd\s+(\d+)\s+fwd\+bwd\s+(\d+)", printed)}
  for r in records:
    assert r["time_ms"] > 0 and r["ratio_to_elementwise"] > 0
    assert r["fusions"] >= 1  # every compiled program runs at least one kernel
    assert f"fusions {r['lib']:10s} {r['norm']:16s}" in printed  # --hlo printed the case
    assert r["fusions"] == hlo[(r["lib"], r["norm"])][r["pass"]], r  # the case's own program
    assert len(r["samples_ms"]) == meta["reps"]
    if r["pass"] == "fwd+bwd":
      assert r["temp_bytes"] is not None and r["temp_bytes"] >= 0
    if meta["reference"] in meta["libs"]:
      assert r["ratio_to_flax"] is not None
  table = (tmp_path / "results.md").read_text()
  assert "| case | pass | jaxnorm |" in table and "batch_norm_eval" in table
  # The summary (the README's table): one row per case, one column per input shape and dtype.
  rows = [r for r in table.split("\n\n")[2].splitlines() if r.startswith("| ")][1:]
  assert len(rows) == 2 * len(bench.NORMS)
  assert all("×)" in cell for row in rows for cell in row.split(" | ")[2:]), rows
  png = (tmp_path / "chart.png").read_bytes() if (tmp_path / "chart.png").exists() else None
  if importlib.util.find_spec("matplotlib") is not None:
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry_builds_every_case_of_every_library():
  """benchmarks/cases.py: each library's builder gives a call for every norm (jaxnorm's own
  kernels for layer and RMS norm only) whose output has x's shape, in the dtype its library
  returns: for bfloat16 x, flax.linen's default float32, x's dtype for jaxnorm and for
  flax.linen with `dtype=x` (the peers' bfloat16, where some fail, is for run.py to report)."""
  bench = _load_run_module()  # also puts benchmarks/ on the path
  import cases

  assert set(bench.LIBS) <= set(cases.LIBRARIES)
  bf16_libs = ("jaxnorm", "jaxnorm pallas", "flax.linen", "flax.linen dtype=x")
  for lib, norm, values, dtype in itertools.product(
      cases.LIBRARIES, cases.NORMS, (cases.TIMED, cases.COUNTED), cases.DTYPES):
    if not cases.have(lib) or (dtype == "bfloat16" and lib not in bf16_libs):
      continue
    x = jax.ShapeDtypeStruct((4, 64), jax.numpy.dtype(dtype))
    with jax.numpy_dtype_promotion("standard"):  # flax's bfloat16 layers need it, as users have it
      built = cases.build(lib, norm, x.shape, x.dtype, values)
      if lib == "jaxnorm pallas" and norm not in cases.PALLAS_NORMS:
        assert built is None
        continue
      fn, params = built
      y, _ = jax.eval_shape(fn, params, x)
    want = "float32" if lib == "flax.linen" else dtype
    assert (y.shape, y.dtype) == (x.shape, want), (lib, norm, dtype, y)


def test_registry_builds_every_residual_case():
  """cases.py's fused residual add: every library's call takes (x, r) and returns (y, h) with
  h = x + r in the promoted dtype and y the norm of h (flax.linen's, jaxnorm's, the same within
  the bound of two float32 evaluations); forward+backward has gradients for x and r."""
  _load_run_module()
  import cases

  from jaxnorm import _stats
  rng = np.random.default_rng(0)
  for norm, name, lib in itertools.product(cases.RESIDUAL_NORMS, cases.RESIDUAL_DTYPES,
                                           cases.RESIDUAL_LIBS):
    xd, rd = cases.residual_dtypes(name)
    x = jax.numpy.asarray(rng.normal(size=(4, 64)), xd)
    r = jax.numpy.asarray(rng.normal(size=(4, 64)) + 3, rd)
    with jax.numpy_dtype_promotion("standard"):
      fn, params = cases.build_residual(lib, norm, x.shape, xd, cases.COUNTED)
      (y, h), _ = fn(params, (x, r))
      (_, _), _, (_, (dx, dr)) = cases.with_pass(fn, "fwd+bwd")(params, (x, r), (y, h))
    np.testing.assert_array_equal(h, _stats.residual_sum(x, r))
    assert (dx.dtype, dr.dtype) == (xd, rd)
    if lib == "flax.linen":
      assert y.dtype == "float32"
    h64 = refs.f64(h)
    want = (refs.ref_layer_norm(h64) if norm == "add_layer_norm" else refs.ref_rms_norm(h64))
    bound = refs.norm_bound(h64, want, centered=norm == "add_layer_norm",
                            out_dtype=y.dtype)
    refs.assert_within(y, want, bound, f"{lib} {norm} {name}")


def test_the_residual_floor_counts_each_array_in_its_dtype():
  _load_run_module()
  import compiled

  f32, bf16 = np.dtype("float32"), jax.numpy.dtype("bfloat16")
  assert compiled.residual_floor("fwd", (f32, f32)) == 4
  assert compiled.residual_floor("fwd+bwd", (f32, f32)) == 8
  assert compiled.residual_floor("fwd", (bf16, f32)) == 6
  assert compiled.residual_floor("fwd+bwd", (bf16, f32)) == 12


def test_unknown_library_is_a_clear_error():
  bench = _load_run_module()
  with pytest.raises(SystemExit):
    bench.main(["--tiny", "--libs", "torch"])


def test_column_reduction_script_times_every_case(capsys):
  spec = importlib.util.spec_from_file_location(
      "jaxnorm_bench_column_reduction", ROOT / "benchmarks" / "column_reduction.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(["--rows", "64", "--columns", "32", "--rounds", "1"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("64x32 float32")
  assert [line[2:44].strip() for line in lines[1:]] == list(module.CASES)
  assert all(line.rstrip().endswith("x sum(x * x)") for line in lines[1:])


def test_gpu_script_runs_on_cpu_and_checks_exactness(tmp_path):
  """benchmarks/gpu.py on the CPU: JAX's Pallas GPU kernels are reported as failing, the rest
  runs, jaxnorm's own Pallas kernels ("jaxnorm pallas") in interpret mode, in the feature-size
  sweep too."""
  spec = importlib.util.spec_from_file_location("jaxnorm_bench_gpu",
                                                ROOT / "benchmarks" / "gpu.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with jax.numpy_dtype_promotion("standard"):  # flax's bfloat16 layers need it, as users have it
    module.main(["--quick", "--shapes", "64x128", "--copy-mib", "4", "--out", str(tmp_path),
                 "--sweep-elements", "512", "--sweep-features", "256"])
  result = json.loads((tmp_path / "gpu_results.json").read_text())
  assert result["meta"]["copy_gbs"] > 0
  libs = {r["lib"] for r in result["speed"]}
  assert {"jaxnorm", "jaxnorm pallas", "flax.linen", "jnp two-pass"} <= libs
  for r in result["speed"] + result["sweep"]:
    assert r["time_us"] > 0 and r["bandwidth_gbs"] > 0 and r["ratio_to_flax"] is not None
    assert r["ratio_to_xla"] is not None
  sweep = {(r["lib"], tuple(r["shape"])) for r in result["sweep"]}
  assert sweep == {(lib, shape) for lib in module.SWEEP_LIBS for shape in ((2, 256),)}
  err = {(r["norm"], r["lib"], r["offset"]): r["max_error"] for r in result["exactness"]}
  assert err[("layer_norm", "jaxnorm pallas", 1e4)] < 2e-2
  for norm in ("layer_norm", "batch_norm"):
    assert err[(norm, "jaxnorm", 1e4)] < 2e-2
    assert err[(norm, "flax.linen", 1e4)] > 1.0  # flax's default fast variance cancels
  assert all(r["max_rel_error"] < 1e-5 for r in result["gradients"]), result["gradients"]
  assert {r["norm"] for r in result["gradients"]} == {"layer_norm", "layer_norm pallas",
                                                      "batch_norm"}
  table = (tmp_path / "gpu_results.md").read_text()
  assert "| layer_norm | 64x128 | float32 | fwd | jaxnorm |" in table
  assert "| rms_norm | 2x256 | bfloat16 | fwd+bwd | jaxnorm pallas |" in table


def test_shift_precision_prints_every_formula_and_case(capsys):
  spec = importlib.util.spec_from_file_location("jaxnorm_bench_shift_precision",
                                                ROOT / "benchmarks" / "shift_precision.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main()
  lines = capsys.readouterr().out.strip().splitlines()[1:]
  assert len(lines) == 6
  for line in lines:
    assert all(f"{name}: var " in line for name in module.FORMULAS), line
  # Every case it prints, the median shift within its bound.
  for _, x, axes in module.cases(np.random.default_rng(1)):
    m = module.FORMULAS["median shift"](x, axes)
    _, mean, var = refs.ref_moments(x, axes)
    mean_err, var_err = refs.shifted_errors(x, axes)
    refs.assert_within(m.mean, mean, mean_err, "mean")
    refs.assert_within(m.var, var, var_err, "var")
