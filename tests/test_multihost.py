"""examples/multihost.py: a 4-process job (2 CPU devices each, jax.distributed on 127.0.0.1)
that is killed mid-run and restarted from its last orbax checkpoint ends with exactly the bits
of a job that was never interrupted; and the step whose batch holds a NaN leaves the running
statistics and the parameters unchanged on every process.

Every subprocess has a timeout, and every process this test starts is killed when it fails.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multihost.py"
PROCESSES = 4
STEPS, EVERY, NAN_STEP = 36, 8, 12
KILL_AFTER = 19  # a step after the checkpoint of step 16 and before that of step 24
VICTIM = 2  # the process that crashes (not the coordinator, process 0)
TIMEOUT_S = 420  # per job; the example itself takes well under a minute on 2 idle cores


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _args(workdir: pathlib.Path, cache: pathlib.Path) -> list[str]:
  return ["--workdir", str(workdir), "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
          "--nan-step", str(NAN_STEP), "--compilation-cache", str(cache)]


def _launch(workdir: pathlib.Path, cache: pathlib.Path) -> str:
  """The one-command launcher, as a user runs it; returns its output."""
  proc = subprocess.Popen(
      [sys.executable, "-u", str(EXAMPLE), "--launch", str(PROCESSES),
       "--timeout", str(TIMEOUT_S - 20), *_args(workdir, cache)],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)  # its own process group: the launcher and its workers
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    pytest.fail(f"the launcher did not finish in {TIMEOUT_S} s:\n{out[-5000:]}")
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, out[-8000:]
  return out


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _crash(workdir: pathlib.Path, cache: pathlib.Path) -> str:
  """Starts the 4 processes directly, SIGKILLs process VICTIM once process 0 reports step
  KILL_AFTER, then the others (as a scheduler ends a job whose task died); returns process 0's
  output."""
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-u", str(EXAMPLE), *_args(workdir, cache), "--process-id", str(i),
       "--num-processes", str(PROCESSES), "--coordinator", coordinator],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(PROCESSES)]
  logs: list[list[str]] = [[] for _ in procs]
  reached = threading.Event()

  def read(i: int) -> None:
    for line in procs[i].stdout:
      logs[i].append(line)
      if i == 0 and line.startswith(f"step {KILL_AFTER} "):
        reached.set()

  readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(PROCESSES)]
  for t in readers:
    t.start()
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not reached.wait(0.05):
      failed = [i for i, p in enumerate(procs) if p.poll() is not None]
      if failed or time.monotonic() > deadline:
        pytest.fail(f"process(es) {failed} ended, or step {KILL_AFTER} was not reached in "
                    f"{TIMEOUT_S} s:\n" + _first_errors(logs))
    assert procs[VICTIM].poll() is None, "the victim ended before it was killed"
    procs[VICTIM].send_signal(signal.SIGKILL)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=60)
    for t in readers:
      t.join(timeout=10)
  assert procs[VICTIM].returncode == -signal.SIGKILL
  return "".join(logs[0])


def _first_errors(logs: list[list[str]]) -> str:
  """Each process's first lines and first error, not the peers' echoes that follow it."""
  out = []
  for i, lines in enumerate(logs):
    errors = [j for j, line in enumerate(lines) if re.search(r"Error|error|Traceback", line)]
    at = errors[0] if errors else len(lines)
    out.append(f"process {i}:\n" + "".join(lines[:5] + ["...\n"] + lines[max(5, at - 10):at + 10]))
  return "\n---\n".join(out)


def _complete_checkpoints(workdir: pathlib.Path) -> list[int]:
  return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir()
                if d.name.isdigit() and (d / "_CHECKPOINT_METADATA").exists())


def _check_nan_step(workdir: pathlib.Path, final: dict[str, np.ndarray]) -> None:
  for i in range(PROCESSES):
    rec = dict(np.load(workdir / "nan_step" / f"process_{i}.npz"))
    assert not np.isfinite(rec["loss"]), f"process {i}: the NaN batch's loss is {rec['loss']}"
    stats = [k[len("before/"):] for k in rec if k.startswith("before/batch_stats/")]
    params = [k[len("before/"):] for k in rec if k.startswith("before/params/")]
    assert len(stats) == 4 and len(params) == 8, sorted(rec)  # 2 BatchNorms; 8 parameters
    for k in stats + params:
      assert np.array_equal(rec["before/" + k], rec["after/" + k]), f"process {i}: {k} changed"
    # Not vacuous: training went on and moved the statistics after that step.
    assert all(not np.array_equal(rec["after/" + k], final[k]) for k in stats)
  assert all(np.all(np.isfinite(v)) for k, v in final.items() if k.startswith("params/"))


def test_a_killed_job_resumes_to_the_bits_of_an_uninterrupted_one(tmp_path):
  cache = tmp_path / "compilation_cache"  # shared: only the first job compiles
  t0 = time.perf_counter()
  clean = _launch(tmp_path / "clean", cache)
  t_clean = time.perf_counter() - t0
  assert f"step {STEPS} loss" in clean and "resumed" not in clean, clean[-3000:]
  assert "sha256(params, batch_stats): " in clean

  crashed = tmp_path / "crashed"
  log = _crash(crashed, cache)
  assert f"step {KILL_AFTER} loss" in log and f"step {STEPS} loss" not in log, log[-3000:]
  assert not (crashed / "final_state.npz").exists()
  steps = _complete_checkpoints(crashed)
  assert steps and EVERY <= steps[-1] <= KILL_AFTER, steps
  latest = steps[-1]

  resumed = _launch(crashed, cache)  # the same command again
  assert f"resumed from the checkpoint of step {latest} " in resumed, resumed[-3000:]
  # The steps after the checkpoint were lost and are replayed: KILL_AFTER - latest of them.
  assert f"step {latest + 1} loss" in resumed and f"step {latest} loss" not in resumed

  a = dict(np.load(tmp_path / "clean" / "final_state.npz"))
  b = dict(np.load(crashed / "final_state.npz"))
  assert sorted(a) == sorted(b)
  assert int(a["step"]) == int(b["step"]) == STEPS
  assert any(k.startswith("batch_stats/") for k in a) and any(k.startswith("params/") for k in a)
  for k in a:  # params, batch_stats, opt_state, step, data position: bit for bit
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  digest = lambda out: re.search(r"sha256\(params, batch_stats\): (\w+)", out).group(1)
  assert digest(clean) == digest(resumed)
  # The losses of the replayed and later steps are those of the uninterrupted job.
  losses = lambda out: dict(re.findall(r"^step (\d+) loss (\S+)$", out, re.MULTILINE))
  ref = losses(clean)
  assert all(ref[s] == v for s, v in (losses(log) | losses(resumed)).items())

  for workdir in (tmp_path / "clean", crashed):  # the NaN step ran in both jobs
    _check_nan_step(workdir, a)
  print(f"\nuninterrupted job {t_clean:.1f} s; killed at step {KILL_AFTER}, resumed from "
        f"{latest}; whole test {time.perf_counter() - t0:.1f} s")
