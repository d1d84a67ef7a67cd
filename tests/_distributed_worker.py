"""One process of the two-process test in test_distributed.py (not a test module itself).

Usage: python tests/_distributed_worker.py PORT PROCESS_ID OUT_DIR

Joins a 2-process JAX cluster on 127.0.0.1:PORT with 4 CPU devices per process (collectives
through gloo), runs one data-parallel `batch_norm` training step over the 8-device global mesh
with uneven masks, both with `jax.shard_map` + `axis_name` and with plain `jax.jit` over the
global sharded arrays, and writes the gathered results to OUT_DIR/result_PROCESS_ID.npz.
"""

from __future__ import annotations

import sys

import numpy as np

LOCAL_DEVICES = 4
PROCESSES = 2
MOMENTUM = 0.9
# Valid rows of the 8 devices' 4 rows each: device 0 (process 0) and device 6 (process 1) hold
# none, so each process holds a different number of valid rows (9 and 8).
VALID = [0, 4, 2, 3, 1, 4, 0, 3]


def make_problem() -> dict[str, np.ndarray]:
  """The global batch and parameters, the same in every process and in the test."""
  rng = np.random.RandomState(0)
  mask = np.concatenate([np.arange(4) < k for k in VALID])[:, None, None]
  x = (rng.randn(32, 2, 3) * [1.0, 3.0, 0.5] + [1e4, -2.0, 5.0]).astype(np.float32)
  return {
      "x": np.where(mask, x, np.nan).astype(np.float32),  # masked rows must not leak
      "x_clean": x,
      "mask": mask,
      "scale": np.array([1.0, 2.0, 0.5], np.float32),
      "bias": np.array([0.0, -1.0, 3.0], np.float32),
      "state_mean": np.array([1.0, 2.0, 3.0], np.float32),
      "state_var": np.array([2.0, 1.0, 0.5], np.float32),
      "state_count": np.array(3, np.int32),
  }


def main(port: int, process_id: int, out_dir: str) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
      num_processes=PROCESSES, process_id=process_id,
      initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxnorm as jn

  assert jax.process_count() == PROCESSES, jax.process_count()
  assert jax.device_count() == PROCESSES * LOCAL_DEVICES, jax.device_count()
  assert jax.local_device_count() == LOCAL_DEVICES, jax.local_device_count()

  p = make_problem()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rows = NamedSharding(mesh, P("data"))
  # Each process supplies only the rows of its own devices.
  x, mask = (jax.make_array_from_callback(a.shape, rows, lambda idx, a=a: a[idx])
             for a in (p["x"], p["mask"]))
  state = jn.BatchNormState(p["state_mean"], p["state_var"], p["state_count"])

  def step(x, mask, axis_name):
    return jn.batch_norm(x, state, p["scale"], p["bias"], training=True, momentum=MOMENTUM,
                         mask=mask, axis_name=axis_name)

  shard_mapped = jax.jit(jax.shard_map(lambda x, m: step(x, m, "data"), mesh=mesh,
                                       in_specs=(P("data"), P("data")),
                                       out_specs=(P("data"), P())))
  sharded_jit = jax.jit(lambda x, m: step(x, m, None))
  out = {}
  for name, fn in (("shard_map", shard_mapped), ("jit", sharded_jit)):
    y, new = fn(x, mask)
    assert not y.is_fully_addressable  # rows live on both processes
    out[f"{name}_y"] = np.asarray(multihost_utils.process_allgather(y, tiled=True))
    for field in ("mean", "var", "count"):
      out[f"{name}_{field}"] = np.asarray(
          multihost_utils.process_allgather(getattr(new, field), tiled=True))
  out["local_valid_rows"] = np.asarray(
      sum(int(np.asarray(s.data).sum()) for s in mask.addressable_shards))
  np.savez(f"{out_dir}/result_{process_id}.npz", **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
