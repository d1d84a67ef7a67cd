"""Cross-device batch statistics of jaxnorm and flax.linen with uneven masks, next to float64.

    python benchmarks/cross_device_stats.py

Two cases, one feature, the batch split across devices by rows, masked rows filled with NaN
(as a padded batch may hold anything):

* 4 devices holding 2, 4, 6 and 8 valid rows of 8 (the shards have different means, as
  non-shuffled or length-bucketed data do);
* 8 devices holding 0, 4, 1, 3, 2, 4, 1, 2 valid rows of 4: device 0 holds none;
* the first case with every input offset by 1e4 (float32 input; the truth is computed from
  the same float32 values).

For each, the batch mean and variance that a training step of `jaxnorm.batch_norm` and of
`flax.linen.BatchNorm(axis_name=...)` (called with `mask=`) normalize with, under
`jax.shard_map`, `jax.pmap` and plain `jax.jit` over a sharded global array (no axis_name: XLA
inserts the collectives), and the number of collectives in each program: in the lowered
StableHLO (what the library emits) and in the compiled HLO (after XLA's passes).
"""

from __future__ import annotations

import re

import jax

jax.config.update("jax_num_cpu_devices", 8)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402

COLLECTIVE = re.compile(r"\b(all_reduce|all_gather|reduce_scatter|all_to_all|collective_permute)\b")
COMPILED = re.compile(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                      r"(?:-start)?\(")


def make_case(valid: list[int], rows: int, offset: float = 0.0, seed: int = 0):
  rng = np.random.RandomState(seed)
  n = len(valid)
  x = np.concatenate([rng.randn(rows, 1) + 2.0 * d + offset for d in range(n)])
  x = x.astype(np.float32)
  mask = np.concatenate([np.arange(rows) < k for k in valid])[:, None]
  xv = x[mask[:, 0]].astype(np.float64)
  truth = (xv.mean(), xv.var()) if len(xv) else (float("nan"), float("nan"))
  return np.where(mask, x, np.nan).astype(np.float32), mask, truth


def jaxnorm_stats(x, mask, axis_name):
  # momentum=0: the new running statistics are the batch statistics themselves.
  _, s = jn.batch_norm(x, jn.batch_norm_init(1), training=True, momentum=0.0, mask=mask,
                       axis_name=axis_name)
  return s.mean, s.var


def flax_stats(x, mask, axis_name):
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name=axis_name,
                    use_scale=False, use_bias=False)
  variables = {"batch_stats": {"mean": jnp.zeros(1), "var": jnp.ones(1)}}
  _, new = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
  return new["batch_stats"]["mean"], new["batch_stats"]["var"]


def run(stats_fn, style, x, mask, n):
  devices = jax.devices()[:n]
  if style == "pmap":
    f = jax.pmap(lambda a, m: stats_fn(a, m, "d"), axis_name="d", devices=devices)
    args = (x.reshape(n, -1, 1), mask.reshape(n, -1, 1))
    out = f(*args)
    lowered = f.lower(*args)
    mean, var = (np.asarray(o)[0, 0] for o in out)
  else:
    mesh = jax.make_mesh((n,), ("d",), devices=devices)
    args = tuple(jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, mask))
    if style == "shard_map":
      f = jax.jit(jax.shard_map(lambda a, m: stats_fn(a, m, "d"), mesh=mesh,
                                in_specs=(P("d"), P("d")), out_specs=P()))
    else:
      f = jax.jit(lambda a, m: stats_fn(a, m, None))
    out = f(*args)
    lowered = f.lower(*args)
    mean, var = (float(np.asarray(o)[0]) for o in out)
  n_lowered = len(COLLECTIVE.findall(lowered.as_text()))
  n_compiled = len(COMPILED.findall(lowered.compile().as_text()))
  return float(mean), float(var), n_lowered, n_compiled


def main() -> None:
  cases = {
      "4 devices, 2/4/6/8 valid rows of 8": ([2, 4, 6, 8], 8, 0.0),
      "8 devices, 0/4/1/3/2/4/1/2 valid rows of 4": ([0, 4, 1, 3, 2, 4, 1, 2], 4, 0.0),
      "4 devices, 2/4/6/8 valid rows of 8, inputs offset by 1e4": ([2, 4, 6, 8], 8, 1e4),
  }
  print(f"jax {jax.__version__}; collectives = all-reduce/all-gather/... in the program, "
        f"lowered StableHLO / compiled HLO")
  for title, (valid, rows, offset) in cases.items():
    x, mask, (t_mean, t_var) = make_case(valid, rows, offset)
    print(f"\n{title}")
    print(f"  {'float64 truth':<28} mean {t_mean:12.6f}   var {t_var:10.6f}")
    for lib, fn in (("jaxnorm", jaxnorm_stats), ("flax.linen", flax_stats)):
      for style in ("shard_map", "pmap", "sharded jit"):
        mean, var, n_low, n_comp = run(fn, style, x, mask, len(valid))
        print(f"  {lib + ' ' + style:<28} mean {mean:12.6f}   var {var:10.6f}   "
              f"collectives {n_low} / {n_comp}")


if __name__ == "__main__":
  main()
