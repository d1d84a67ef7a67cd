"""examples/precise_bn.py --quick runs as a user runs it and writes what it promises."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)


def test_precise_bn_quick(tmp_path):
  proc = subprocess.run([sys.executable, "examples/precise_bn.py", "--quick", "--out",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        check=False, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "precise_bn.json").read_text())
  assert res["config"]["batch_sizes"] == [2] and res["config"]["quick"] is True
  assert [r["batch_size"] for r in res["runs"]] == [2]
  for r in res["runs"]:
    for k in ("accuracy_running_averages", "accuracy_recomputed",
              "accuracy_recomputed_training_mode"):
      assert (r[k] * 512) == round(r[k] * 512)  # a count of the 512 test images
    # The linen CNN with jaxnorm.linen.BatchNorm reproduces the functional model's logits
    # (the same core calls; float32 rounding of O(10) logits over a few hundred-term sums).
    assert r["max_abs_logit_diff_linen_vs_functional"] <= 1e3 * EPS32 * (
        1 + r["max_abs_logit_diff_functional"])
    # The first BatchNorm's recomputed statistics are its input's population statistics over
    # the 1280 training images (float32 sums of 1280*64 terms of magnitude <= n1_max_abs_input).
    n = 1280 * 64
    bound = 4 * np.sqrt(n) * EPS32 * (r["n1_max_abs_input"] + r["n1_max_abs_input"] ** 2)
    assert r["n1_max_abs_diff_mean_vs_direct"] <= bound
    assert r["n1_max_abs_diff_var_vs_direct"] <= bound
    assert r["max_rel_change_var"]["n3"] > 0  # the statistics were actually replaced
  assert "recomputed" in proc.stdout
