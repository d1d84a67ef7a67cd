"""benchmarks/fold.py runs (one tiny round) and its folded model gives the original's logits."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)


def test_fold_benchmark_runs_and_folding_is_exact(tmp_path):
  spec = importlib.util.spec_from_file_location("fold_bench", ROOT / "benchmarks" / "fold.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--batch", "2", "--rounds", "1", "--inner", "1", "--out", str(tmp_path)])
  assert json.loads((tmp_path / "fold.json").read_text())["rows"][0]["batch"] == 2
  assert len(res["folded_pairs"]) == 3
  # Five 3x3 convolutions (<= 144 terms each) and the norms in float32 on both sides.
  assert res["max_abs_logit_diff"] <= 1e3 * EPS32 * (1 + res["max_abs_logit"])
  assert res["rows"][0]["folded_us"] > 0 and res["rows"][0]["original_us"] > 0
