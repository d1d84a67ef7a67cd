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
  assert accuracy.bfloat16_mean_20()["jaxnorm BatchNorm"] < 2e-2
  assert accuracy.bfloat16_running_average()["jaxnorm"] == pytest.approx(0.02, rel=5e-3)


@pytest.mark.parametrize("counts", [(2, 4, 6, 8), (0, 4, 6, 8)])
def test_uneven_devices(counts):
  out = accuracy.uneven_devices(counts)
  assert out["jaxnorm"] == pytest.approx(out["float64 truth"], rel=1e-5)
  if "flax linen BatchNorm" in out:
    flax_mean = out["flax linen BatchNorm"][0]
    assert math.isnan(flax_mean) or abs(flax_mean - out["float64 truth"][0]) > 0.1
