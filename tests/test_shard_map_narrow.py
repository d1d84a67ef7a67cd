"""Narrow input (bfloat16) under `jax.shard_map` with statistics across devices.

Regression test: in programs compiled for CPU, batch and layer normalization of input narrower
than float32 put `x` and the mean through one `lax.optimization_barrier`, which makes every
output vary over the mesh axes that any input varies over. The other platforms' branch of the
same `lax.platform_dependent` returned the mean unchanged (invariant), and JAX refused the
mismatch ("switch branches must have equal output types") whenever the call ran inside
`jax.shard_map` with an `axis_name`, on every platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from tests import jaxcompat, refs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_under_shard_map_with_axis_name(dtype):
  mesh = jax.make_mesh((8,), ("d",))
  rng = np.random.RandomState(0)
  x32 = (rng.randn(32, 4) * [1.0, 0.5, 2.0, 1.0] + 3).astype(np.float32)
  x = jnp.asarray(x32, dtype)
  state = jn.batch_norm_init(4)

  def step(x):
    y, new = jn.batch_norm(x, state, training=True, axis_name="d")
    return y, new.mean

  f = jaxcompat.shard_map(step, mesh=mesh, check_vma=True, in_specs=P("d"), out_specs=(P("d"), P()))
  y, mean = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("d"))))
  assert y.dtype == x.dtype
  xr = np.asarray(x.astype(jnp.float32))  # the values the normalizer received
  ref_y, _, ref_mean, _ = refs.ref_batch_norm_train(xr)
  out = np.float32 if dtype == "float32" else jnp.bfloat16
  refs.assert_within(np.asarray(y, np.float32), ref_y,
                     refs.norm_bound(xr, ref_y, None, 0, -1, 1e-5, out_dtype=out), "y")
  refs.assert_within(mean, 0.01 * ref_mean,
                     refs.ema_error(0.99, 0.0, ref_mean, refs.mean_error(xr, 0)), "mean")
