"""examples/flax_resnet.py runs (quick mode) and shows the swap changes nothing that matters."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flax_resnet_example_quick():
  result = subprocess.run([sys.executable, str(ROOT / "examples" / "flax_resnet.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for api in ("linen", "nnx"):
    acc = {lib: float(re.search(rf"{lib}\.{api}\s+test accuracy ([0-9.]+)", out).group(1))
           for lib in ("flax", "jaxnorm")}
    assert acc["flax"] > 0.3 and abs(acc["jaxnorm"] - acc["flax"]) <= 0.05, out
    same = re.search(rf"{api}\s+same variables.*?batch_stats difference\| ([0-9.e+-]+), "
                     rf"max \|logit difference\| ([0-9.e+-]+)", out)
    assert float(same.group(1)) < 1e-4 and float(same.group(2)) < 1e-3, out
