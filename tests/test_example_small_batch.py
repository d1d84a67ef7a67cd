"""examples/small_batch.py runs in quick mode, as a user runs it, and writes what it promises."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_small_batch_quick_run(tmp_path):
  proc = subprocess.run([sys.executable, "examples/small_batch.py", "--quick", "--out",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  cfg = results["config"]
  assert cfg["quick"] and cfg["devices"] == 8
  names = {"BN (per device)", "sync BN (8 devices)", "batch renorm", "GroupNorm", "LayerNorm"}
  assert {row["normalizer"] for row in results["table"]} == names
  columns = [f"{b}x8" for b in cfg["per_device"]]
  for row in results["table"]:
    assert all("±" in row[c] for c in columns)
  # One run per (variant, setting, seed), each accuracy a probability.
  settings = len(columns) * 5 + 3 + len(cfg["plain_batches"])
  assert len(results["runs"]) == settings * cfg["seeds"]
  assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in results["runs"])
  # The ablation is decided by the rule, and the verdict says which way.
  (v,) = results["ablation_verdicts"]
  assert v["ghost_batch"] == 2
  assert isinstance(v["collapses"], bool) and isinstance(v["plain_bn_fails"], bool)
  if not v["plain_bn_fails"]:
    expected = "Not decided"
  else:
    expected = "The failure is" if v["collapses"] else "Not (only)"
  assert results["verdict"].startswith(expected)
  assert (tmp_path / "small_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| normalizer |" in proc.stdout and "Verdict:" in proc.stdout
