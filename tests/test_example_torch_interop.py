"""examples/torch_interop.py --quick: PyTorch CNN -> flax/jaxnorm, identical to float rounding."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)


def test_torch_interop_quick(tmp_path):
  pytest.importorskip("torch")
  proc = subprocess.run([sys.executable, "examples/torch_interop.py", "--quick", "--out",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "torch_interop.json").read_text())
  scale = 1 + res["max_abs_logit_after_conversion"]
  # Two convolutions (9 and 72 terms), two BatchNorms, a LayerNorm and a Dense in float32 on
  # each side, with different kernels: rounding of a few hundred ulps of the logits' scale. A
  # wrong layout (NCHW/NHWC, OIHW/HWIO, a transposed weight) gives differences of order 1.
  assert res["max_abs_logit_diff_after_conversion"] <= 1e3 * EPS32 * scale
  assert res["max_abs_logit_diff_to_torch_round_trip"] <= 1e3 * EPS32 * scale
  # After 5 more SGD steps on both sides those differences have been through 5 updates
  # (lr 0.05) and are still rounding-sized; a different update rule (momentum convention,
  # biased running variance) would differ by ~10% of the statistics.
  assert res["max_abs_logit_diff_after_training_both"] <= 1e4 * EPS32 * scale
  for v in res["max_abs_diff_running_stats_after_training_both"].values():
    assert v <= 1e4 * EPS32 * (1 + res["max_abs_running_var"])
