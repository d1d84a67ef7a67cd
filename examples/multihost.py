"""Multi-host data-parallel training that survives a crash: jax.distributed, one global mesh,
sharded `jax.jit`, masked BatchNorm and orbax checkpoints.

A small CNN with two `jaxnorm.linen.BatchNorm` layers learns scikit-learn's bundled 8x8 digits
(no download) on several processes (4 by default, as if 4 hosts) of 2 CPU devices each:

* every process joins JAX's distributed runtime (`jax.distributed.initialize`; on CPU the
  collectives go through gloo) and builds the same mesh over all 8 devices;
* each step's global batch of 64 rows is split by rows: each process builds only its own 16
  rows and `jax.make_array_from_process_local_data` assembles the global array. The processes
  hold different numbers of valid rows (16, 11, 6 and 1 with 4 processes: padding fills the
  rest, and one device holds none), and the mask given to `BatchNorm(mask=...)` and to the loss
  keeps the statistics and the gradient those of the valid rows;
* one plain `jax.jit` step over the sharded arrays (no `pmap`, no `shard_map`): XLA inserts the
  all-reduces of the batch statistics and of the gradient itself;
* the parameters, the running statistics (`batch_stats`), the optimizer state, the step and
  the data position are written with orbax every `--checkpoint-every` steps. Run again with the
  same arguments, the program resumes from the latest complete checkpoint. The data order is a
  function of the step only, so a resumed run replays the lost steps exactly and ends with the
  same bits as a run that was never interrupted;
* at `--nan-step` one process feeds an image holding a NaN. jaxnorm leaves the running
  statistics unchanged for a batch whose statistics are not finite, and
  `optax.apply_if_finite` skips that step's update, so training goes on. Every process writes
  its statistics before and after that step to `WORKDIR/nan_step/process_I.npz`.

At the end process 0 prints the test accuracy, a SHA-256 digest of the parameters and running
statistics, and writes every leaf of the final state to `WORKDIR/final_state.npz`.

Run (one command; starts the 4 processes on 127.0.0.1 and resumes if WORKDIR has checkpoints):

    python examples/multihost.py --launch 4 --workdir /tmp/multihost

The 36 steps cost about 50 s of CPU time for the 4 processes together (measured on a shared
2-core machine); a restarted job reuses the compiled programs kept in WORKDIR.

One process of a job started some other way (one per host, same arguments everywhere but
`--process-id`; the coordinator is process 0's address):

    python examples/multihost.py --process-id 0 --num-processes 4 \\
        --coordinator 10.0.0.1:1234 --workdir /shared/multihost
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np

LOCAL_DEVICES = 2  # CPU devices per process
ROWS_PER_DEVICE = 8
LOCAL_ROWS = LOCAL_DEVICES * ROWS_PER_DEVICE  # rows each process contributes to a step
TRAIN_IMAGES = 1500  # the other 297 digits are the test set
SEED = 0
BN_MOMENTUM = 0.9
LR = 0.1
NAN_PROCESS = 1  # the process that feeds the NaN image at --nan-step (0 with one process)


def valid_rows(process: int) -> int:
  """Valid (unpadded) rows of `process` in every step: 16, 11, 6, 1, 12, ... of 16."""
  return LOCAL_ROWS - (5 * process) % LOCAL_ROWS


def load_digits_split():
  """Digits as (N, 8, 8, 1) float32 in [0, 1] and int32 labels, shuffled once: train, test."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(SEED).permutation(len(y))
  x, y = x[order], y[order]
  return (x[:TRAIN_IMAGES], y[:TRAIN_IMAGES]), (x[TRAIN_IMAGES:], y[TRAIN_IMAGES:])


def example_indices(position: int, count: int) -> np.ndarray:
  """Training indices `position, ..., position + count - 1` of the endless stream of epochs.

  Epoch `e` visits the training images in the order of a permutation seeded by `e` alone, so
  the stream (and each step's batch, which starts at `step * examples_per_step`) depends on
  nothing but the position: a resumed run reads exactly what the lost run read.
  """
  out = []
  while count > 0:
    epoch, offset = divmod(position, TRAIN_IMAGES)
    order = np.random.RandomState(SEED + 1 + epoch).permutation(TRAIN_IMAGES)
    take = min(count, TRAIN_IMAGES - offset)
    out.append(order[offset:offset + take])
    position, count = position + take, count - take
  return np.concatenate(out)


def local_batch(train, position: int, process: int, num_processes: int, nan: bool):
  """This process's LOCAL_ROWS rows of the step that starts at data `position`.

  The step's examples are the next `sum(valid_rows)` of the stream; process p takes its
  `valid_rows(p)` of them after those of processes 0..p-1, and zero padding (mask False) fills
  its remaining rows.
  """
  start = position + sum(valid_rows(p) for p in range(process))
  n = valid_rows(process)
  idx = example_indices(start, n)
  x = np.zeros((LOCAL_ROWS,) + train[0].shape[1:], np.float32)
  y = np.zeros(LOCAL_ROWS, np.int32)
  x[:n], y[:n] = train[0][idx], train[1][idx]
  if nan:
    x[0, 3, 3, 0] = np.nan  # one pixel of one valid image
  return x, y, np.arange(LOCAL_ROWS) < n


def digest(tree) -> str:
  """SHA-256 of the leaves' bytes, in the tree's (sorted-key) order."""
  import jax

  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def flat_dict(tree, prefix: str) -> dict[str, np.ndarray]:
  import jax

  return {prefix + jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def train(args) -> None:
  """One process of the job."""
  t_start = time.perf_counter()
  import jax

  # Before anything starts JAX's backends: CPU only, 2 devices here, gloo collectives.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Compiled programs are kept on disk: a restarted job does not compile again.
  cache = args.compilation_cache or pathlib.Path(args.workdir).absolute() / "compilation_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  # Every process must join, or initialize() fails after the timeout. The heartbeat makes the
  # survivors of a crash fail too, instead of waiting forever in a collective.
  local_coordinator = args.coordinator.startswith("127.0.0.1:")
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      coordinator_bind_address=args.coordinator if local_coordinator else None,
      num_processes=args.num_processes, process_id=args.process_id,
      initialization_timeout=300, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=300)

  import flax.linen as nn
  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxnorm import linen as jnn

  pid, nproc = jax.process_index(), jax.process_count()
  log = print if pid == 0 else (lambda *a, **k: None)
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, mask, train: bool):
      m = None if mask is None else mask[:, None, None, None]
      for features, stride in ((16, 1), (32, 2)):
        x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
        x = jnn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x, mask=m)
        x = nn.relu(x)
      # Flattened, not mean-pooled: on XLA:CPU a reduction fused with the ReLU's maximum can
      # turn a NaN into 0, which would hide a NaN batch from the loss.
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  model = CNN()
  tx = optax.apply_if_finite(optax.sgd(LR, momentum=0.9), max_consecutive_errors=3)

  # One mesh over every process's devices; the batch is split by rows, the state replicated.
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  global_rows = LOCAL_ROWS * nproc
  examples_per_step = sum(valid_rows(p) for p in range(nproc))

  @jax.jit
  def init_state():
    x = jnp.zeros((global_rows, 8, 8, 1))
    # "rbg" keys compile in a quarter of the time of the default threefry ones (seconds on CPU).
    key = jax.random.key(SEED, impl="rbg")
    variables = model.init(key, x, jnp.ones(global_rows, bool), train=False)
    params = variables["params"]
    return {"params": params, "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(params)}

  def loss_fn(params, batch_stats, x, y, mask):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, mask,
                                  train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    # The mean over the valid rows of the whole (global) batch.
    loss = jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.sum(mask.astype(jnp.float32))
    return loss, updates["batch_stats"]

  def step_fn(state, x, y, mask):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, batch_stats), grads = grad_fn(state["params"], state["batch_stats"], x, y, mask)
    # A non-finite gradient: apply_if_finite returns zero updates and keeps its inner state.
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  # Fixed shardings in and out: the state stays replicated, whether it was initialized here or
  # restored from a checkpoint, and the step compiles once, ahead of time.
  init_state = jax.jit(init_state, out_shardings=replicated)
  state = init_state()
  batch = lambda shape, dtype: jax.ShapeDtypeStruct((global_rows,) + shape, dtype, sharding=rows)
  step_fn = jax.jit(step_fn, in_shardings=(replicated, rows, rows, rows),
                    out_shardings=(replicated, replicated)).lower(
                        state, batch((8, 8, 1), jnp.float32), batch((), jnp.int32),
                        batch((), jnp.bool_)).compile()
  train_data, test_data = load_digits_split()
  # Until here no process waited for another. CPU collectives (gloo) wait 30 s at most for a
  # late peer; a barrier of the distributed runtime waits as long as it is told.
  ocp.multihost.sync_global_processes("ready", timeout=600, processes=set(range(nproc)))

  # Orbax: every process calls save and restore (each writes its shards of the arrays; the
  # JSON is written by process 0). A checkpoint counts only once it is complete, so a crash
  # during a save leaves the previous one as the latest.
  workdir = pathlib.Path(args.workdir).absolute()
  manager = ocp.CheckpointManager(
      workdir / "checkpoints", item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True))
  step, position = 0, 0
  latest = manager.latest_step()
  if latest is not None:
    # The restored arrays get the shardings of the freshly initialized ones.
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    state, step, position = restored.state, restored.data["step"], restored.data["position"]
    if position != step * examples_per_step:
      raise ValueError(f"the checkpoint of step {step} is at data position {position}, not at "
                       f"{step * examples_per_step}: it was written by a run with another "
                       "number of processes; use a new --workdir")
    log(f"resumed from the checkpoint of step {step} (data position {position})", flush=True)
  else:
    log(f"{nproc} processes x {LOCAL_DEVICES} devices, global batch {global_rows} rows "
        f"({examples_per_step} valid: {[valid_rows(p) for p in range(nproc)]} per process)",
        flush=True)

  local = lambda tree: jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
  t_loop = time.perf_counter()
  t_first = t_ckpt = 0.0
  first_step = step + 1
  while step < args.steps:
    nan = step + 1 == args.nan_step and pid == NAN_PROCESS % nproc
    xb, yb, mb = local_batch(train_data, position, pid, nproc, nan)
    x, y, mask = (jax.make_array_from_process_local_data(rows, a, (global_rows,) + a.shape[1:])
                  for a in (xb, yb, mb))
    before = local(state) if step + 1 == args.nan_step else None
    state, loss = step_fn(state, x, y, mask)
    step, position = step + 1, position + examples_per_step
    loss = float(loss)  # waits for the step
    if step == first_step:
      t_first = time.perf_counter() - t_loop
    log(f"step {step} loss {loss:.6f}", flush=True)
    if before is not None:
      after = local(state)
      (workdir / "nan_step").mkdir(parents=True, exist_ok=True)
      np.savez(workdir / "nan_step" / f"process_{pid}.npz", loss=np.float32(loss),
               **flat_dict(before["batch_stats"], "before/batch_stats/"),
               **flat_dict(after["batch_stats"], "after/batch_stats/"),
               **flat_dict(before["params"], "before/params/"),
               **flat_dict(after["params"], "after/params/"))
      kept = lambda t: (t["params"], t["batch_stats"])
      same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept(before)),
                                                      jax.tree.leaves(kept(after)), strict=True))
      print(f"process {pid}: step {step} held a NaN image; loss {loss}; parameters and running "
            f"statistics {'unchanged' if same else 'CHANGED'}; updates skipped so far: "
            f"{int(after['opt_state'].total_notfinite)}", flush=True)
    if step % args.checkpoint_every == 0 or step == args.steps:
      t = time.perf_counter()
      manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"step": step, "position": position})))
      t_ckpt += time.perf_counter() - t
      log(f"checkpoint saved at step {step}", flush=True)
  manager.close()

  final = local(state)
  if pid == 0:
    eval_fn = jax.jit(lambda v, x: model.apply(v, x, None, train=False))
    logits = eval_fn({"params": final["params"], "batch_stats": final["batch_stats"]},
                     test_data[0])
    accuracy = float(np.mean(np.argmax(logits, -1) == test_data[1]))
    t_end = time.perf_counter()
    print(f"trained to step {step}; test accuracy {accuracy:.4f} on {len(test_data[1])} images")
    print(f"process 0's time in this run: {t_end - t_start:.1f} s (start-up, compilation and "
          f"restore {t_loop - t_start:.1f} s, first step {t_first:.1f} s, other steps "
          f"{t_end - t_loop - t_first - t_ckpt:.1f} s, checkpoints {t_ckpt:.1f} s)")
    print(f"sha256(params, batch_stats): {digest((final['params'], final['batch_stats']))}")
    np.savez(workdir / "final_state.npz", step=np.int64(step), position=np.int64(position),
             **flat_dict(final, ""))
  jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args, argv: list[str]) -> int:
  """Starts `args.launch` processes on 127.0.0.1 and relays their output; returns the exit
  status. If one process fails, the others are stopped (as a job scheduler would)."""
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-u", os.path.abspath(__file__), *argv]
  procs = [subprocess.Popen(cmd + ["--process-id", str(i), "--num-processes", str(args.launch),
                                   "--coordinator", coordinator],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(args.launch)]
  logs: list[list[str]] = [[] for _ in procs]

  def relay(i: int) -> None:
    for line in procs[i].stdout:
      logs[i].append(line)
      if i == 0 or "process" in line:  # process 0's log, and every process's NaN-step report
        print(line, end="", flush=True)

  threads = [threading.Thread(target=relay, args=(i,), daemon=True) for i in range(len(procs))]
  for t in threads:
    t.start()
  deadline = time.monotonic() + args.timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode for p in procs if p.poll() is not None):
        break  # one failed: the others would only wait for it
      if time.monotonic() > deadline:
        print(f"launcher: the job did not finish in {args.timeout} s", file=sys.stderr)
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in threads:
      t.join(timeout=5)
  failed = [i for i, p in enumerate(procs) if p.returncode]
  for i in failed:
    # The first traceback, not the peers' error messages that follow it.
    start = next((j for j, line in enumerate(logs[i]) if line.startswith("Traceback")),
                 max(0, len(logs[i]) - 30))
    print(f"launcher: process {i} exited with {procs[i].returncode}:\n"
          + "".join(logs[i][start:start + 40]), file=sys.stderr)
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="checkpoints and results")
  parser.add_argument("--steps", type=int, default=36, help="train to this step (default 36)")
  parser.add_argument("--checkpoint-every", type=int, default=8, help="default 8 steps")
  parser.add_argument("--nan-step", type=int, default=12,
                      help="the step whose batch holds a NaN on one process (0: none)")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="JAX's compilation cache (default: WORKDIR/compilation_cache)")
  parser.add_argument("--launch", type=int, metavar="N",
                      help="start N processes on 127.0.0.1 and wait for them")
  parser.add_argument("--timeout", type=float, default=300, help="launcher: seconds, in all")
  parser.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
  parser.add_argument("--num-processes", type=int, help="N, the number of processes")
  parser.add_argument("--coordinator", help="process 0's HOST:PORT")
  args = parser.parse_args(argv)
  if args.launch is not None:
    if args.launch < 1:
      parser.error(f"--launch must be at least 1, got {args.launch}")
    return launch(args, ["--workdir", args.workdir, "--steps", str(args.steps),
                         "--checkpoint-every", str(args.checkpoint_every),
                         "--nan-step", str(args.nan_step)]
                  + (["--compilation-cache", args.compilation_cache]
                     if args.compilation_cache else []))
  if args.process_id is None or args.num_processes is None or args.coordinator is None:
    parser.error("give either --launch N, or --process-id, --num-processes and --coordinator")
  train(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
