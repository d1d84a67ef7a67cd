"""Beyond one machine: two real processes joined by jax.distributed on 127.0.0.1.

Each process has 4 CPU devices (collectives through gloo); together they run one
data-parallel batch-norm training step over the 8-device global mesh with uneven masks. The
outputs and the new running statistics must equal a single-process run on the whole batch.
Every wait is bounded, so a hung or crashed peer fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxnorm as jn
from tests import _distributed_worker as worker
from tests import refs

WORKER = pathlib.Path(worker.__file__)
TIMEOUT_S = 180  # both processes together; JAX's own initialization timeout is 60 s


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_cluster(out_dir: pathlib.Path, attempts: int = 2) -> list[dict[str, np.ndarray]]:
  for attempt in range(attempts):
    try:
      return _run_cluster_once(out_dir, _free_port())
    except _PortTaken:
      if attempt == attempts - 1:
        raise
  raise AssertionError("unreachable")


class _PortTaken(Exception):
  """Another program took the coordinator's port between our probe and the bind."""


def _run_cluster_once(out_dir: pathlib.Path, port: int) -> list[dict[str, np.ndarray]]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(out_dir)],
                            cwd=WORKER.parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(worker.PROCESSES)]
  deadline = time.monotonic() + TIMEOUT_S
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      logs.append(out)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [p.communicate()[0][-3000:] for p in procs]
    pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s:\n" + "\n---\n".join(tails))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode for p in procs) and re.search(r"already in use|Failed to add port",
                                                    "".join(logs)):
    raise _PortTaken(port)
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-5000:]}"
  return [dict(np.load(out_dir / f"result_{i}.npz")) for i in range(worker.PROCESSES)]


def test_two_processes_give_the_single_process_result(tmp_path):
  results = _run_cluster(tmp_path)
  prob = worker.make_problem()
  state = jn.BatchNormState(prob["state_mean"], prob["state_var"], prob["state_count"])
  # Single process, one device, whole batch, no axis_name.
  y1, new1 = jn.batch_norm(prob["x"], state, prob["scale"], prob["bias"], training=True,
                           momentum=worker.MOMENTUM, mask=prob["mask"])
  ref_y, _, mean, var = refs.ref_batch_norm_train(prob["x_clean"], prob["scale"], prob["bias"],
                                                  mask=prob["mask"])
  valid = np.broadcast_to(prob["mask"], prob["x"].shape)
  # The processes held different numbers of valid rows: count weighting matters.
  assert [int(r["local_valid_rows"]) for r in results] == [9, 8]
  xc, m = prob["x_clean"], prob["mask"]
  red = (0, 1)
  bound = refs.norm_bound(xc, ref_y, prob["scale"], red, -1, 1e-5, m)
  mean_err = refs.ema_error(worker.MOMENTUM, state.mean, mean, refs.mean_error(xc, red, m))
  var_err = refs.ema_error(worker.MOMENTUM, state.var, var, refs.var_error(xc, red, m))
  # The single-process run meets the same bounds.
  refs.assert_within(np.asarray(y1)[valid], ref_y[valid], bound[valid], "single-process y")
  for r in results:
    for path in ("shard_map", "jit"):
      y = r[f"{path}_y"]
      assert y.shape == prob["x"].shape
      # Column 0 sits at 1e4, where the mean's bound (c(n)·1e4) sets the output's.
      refs.assert_within(y[valid], ref_y[valid], bound[valid], f"{path} y")
      refs.assert_within(y[valid], np.asarray(y1)[valid], 2 * bound[valid], f"{path} y vs one")
      refs.assert_within(r[f"{path}_mean"], 0.9 * state.mean + 0.1 * mean, mean_err, "mean")
      refs.assert_within(r[f"{path}_var"], 0.9 * state.var + 0.1 * var, var_err, "var")
      refs.assert_within(r[f"{path}_mean"], new1.mean, 2 * mean_err, "mean vs one")
      refs.assert_within(r[f"{path}_var"], new1.var, 2 * var_err, "var vs one")
      assert int(r[f"{path}_count"]) == 4
  # Both processes hold the same (replicated) new state, bit for bit.
  for field in ("mean", "var", "count"):
    np.testing.assert_array_equal(results[0][f"shard_map_{field}"],
                                  results[1][f"shard_map_{field}"])
