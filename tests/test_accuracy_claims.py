"""The README's comparison table: jaxnorm is exact where the peers (as installed) are not."""

import importlib.util
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy


def test_offset_1e4():
  errors = accuracy.offset_errors(1e4)
  assert errors["jaxnorm LayerNorm"] < 2e-2 and errors["jaxnorm BatchNorm"] < 2e-2
  if importlib.util.find_spec("flax"):
    assert errors["flax LayerNorm (default)"] > 100  # E[x²]-E[x]² cancellation
    assert errors["flax LayerNorm (use_fast_variance=False)"] < 2e-2
  if importlib.util.find_spec("haiku"):
    assert math.isnan(errors["haiku BatchNorm"])


def test_low_precision():
  errors = accuracy.bfloat16_mean_20()
  assert errors["jaxnorm BatchNorm"] < 2e-2
  running = accuracy.bfloat16_running_average()
  assert running["jaxnorm"] == pytest.approx(0.02, rel=5e-3)
  if importlib.util.find_spec("flax"):  # the README's two flax columns are printed
    for tag in ("default", "use_fast_variance=False"):
      assert f"flax BatchNorm ({tag})" in errors and f"flax linen BatchNorm ({tag})" in running


@pytest.mark.parametrize("counts", [(2, 4, 6, 8), (0, 4, 6, 8)])
def test_uneven_devices(counts):
  out = accuracy.uneven_devices(counts)
  assert out["jaxnorm"] == pytest.approx(out["float64 truth"], rel=1e-5)
  if importlib.util.find_spec("flax"):  # equal weights per device, either variance formula
    for tag in ("default", "use_fast_variance=False"):
      flax_mean = out[f"flax linen BatchNorm ({tag})"][0]
      assert math.isnan(flax_mean) or abs(flax_mean - out["float64 truth"][0]) > 0.1
