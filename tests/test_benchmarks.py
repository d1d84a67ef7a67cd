"""The benchmark suite runs end to end in its tiny mode and writes what it promises.

No timing is asserted: this checks that every case runs and every reported field is there.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_run_module():
  spec = importlib.util.spec_from_file_location("jaxnorm_benchmarks_run",
                                                ROOT / "benchmarks" / "run.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_tiny_benchmark_writes_json_markdown_and_chart(tmp_path):
  bench = _load_run_module()
  bench.main(["--tiny", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "results.json").read_text())
  meta, records = result["meta"], result["records"]
  assert meta["mode"] == "tiny" and "jaxnorm" in meta["libs"] and "jnp" in meta["libs"]
  for key in ("date", "jax", "backend", "device", "reference", "skipped_libs", "failed_cases"):
    assert key in meta
  # jaxnorm and the plain-jnp reference run every case: 5 normalizers x 2 passes.
  for lib in ("jaxnorm", "jnp"):
    cases = {(r["norm"], r["pass"]) for r in records if r["lib"] == lib}
    assert cases == {(n, p) for n in bench.NORMS for p in ("fwd", "fwd+bwd")}, lib
  for r in records:
    assert r["time_ms"] > 0 and r["ratio_to_elementwise"] > 0
    assert len(r["samples_ms"]) == meta["reps"]
    if r["pass"] == "fwd+bwd":
      assert r["temp_bytes"] is not None and r["temp_bytes"] >= 0
    if meta["reference"] in meta["libs"]:
      assert r["ratio_to_flax"] is not None
  table = (tmp_path / "results.md").read_text()
  assert "| case | pass | jaxnorm |" in table and "batch_norm_eval" in table
  # The summary (the README's table): one row per case, one column per input shape and dtype.
  rows = [l for l in table.split("\n\n")[2].splitlines() if l.startswith("| ")][1:]
  assert len(rows) == 2 * len(bench.NORMS)
  assert all("×)" in cell for row in rows for cell in row.split(" | ")[2:]), rows
  png = (tmp_path / "chart.png").read_bytes() if (tmp_path / "chart.png").exists() else None
  if importlib.util.find_spec("matplotlib") is not None:
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


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
  assert [l[2:44].strip() for l in lines[1:]] == list(module.CASES)
  assert all(l.rstrip().endswith("x sum(x * x)") for l in lines[1:])
