"""examples/data_parallel.py --quick: synchronized BN on 8 devices follows the single-device
loss curve; per-device BN does not."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_data_parallel_example_quick_mode():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "data_parallel.py"), "--quick"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  match = re.search(r"first epoch, max \|loss - loss\(single device\)\|: synchronized BN "
                    r"(\S+), per-device BN (\S+)", out)
  assert match, out
  d_sync, d_local = float(match.group(1)), float(match.group(2))
  assert d_sync < 1e-5, out  # the same curve, to float32 rounding
  assert d_local > 1e-3, out  # per-device statistics change the training
  assert "synchronized BN" in out and "sync_running_stats" in out
