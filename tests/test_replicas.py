"""Running statistics across replicas: sync_running_stats, and replicas that stay identical."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from jaxnorm import _compat
from tests import jaxcompat, refs

R = 8  # replicas, one per fake CPU device


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((R,), ("r",))


def _stacked_states(counts, offset=1e4, seed=0, shape=(3,)) -> jn.BatchNormState:
  rng = np.random.RandomState(seed)
  return jn.BatchNormState(
      mean=(rng.randn(R, *shape) + offset).astype(np.float32),
      var=rng.uniform(0.5, 2.0, (R, *shape)).astype(np.float32),
      count=np.asarray(counts, np.int32))


def _ref_merge(states: jn.BatchNormState, weights) -> tuple[np.ndarray, np.ndarray]:
  """Float64 law-of-total-variance merge of the replicas' states (axis 0)."""
  w = refs.f64(weights).reshape((R,) + (1,) * (np.ndim(states.mean) - 1))
  mean = (w * refs.f64(states.mean)).sum(0) / w.sum()
  var = (w * (refs.f64(states.var) + (refs.f64(states.mean) - mean) ** 2)).sum(0) / w.sum()
  return mean, var


def _sync_everywhere(states: jn.BatchNormState, kind: str, **kw) -> jn.BatchNormState:
  """sync_running_stats of stacked per-replica states; checks the replicas agree bitwise."""
  sync = lambda s: jn.sync_running_stats(s, axis_name="r", **kw)
  if kind == "shard_map":
    mesh = _mesh()
    placed = jax.device_put(states, NamedSharding(mesh, P("r")))
    # out_specs=P() with check_vma on: the result is known to be replicated.
    f = jaxcompat.shard_map(lambda s: sync(jax.tree.map(lambda a: a[0], s)), mesh=mesh,
                            in_specs=P("r"), out_specs=P(), check_vma=True)
    return jax.tree.map(np.asarray, jax.jit(f)(placed))
  if kind == "pmap":
    out = jax.pmap(sync, axis_name="r")(states)
  else:
    out = jax.jit(jax.vmap(sync, axis_name="r"))(states)
  out = jax.tree.map(np.asarray, out)
  for a in out:
    for i in range(1, R):
      np.testing.assert_array_equal(a[i], a[0])
  return jax.tree.map(lambda a: a[0], out)


@pytest.mark.parametrize("kind", ["shard_map", "pmap", "vmap"])
def test_sync_is_the_count_weighted_merge_and_ignores_replicas_that_never_updated(kind):
  counts = [0, 1, 3, 2, 2, 0, 4, 4]
  states = _stacked_states(counts)
  states = states._replace(mean=states.mean.copy())
  states.mean[0] = -5e4  # count 0: must not move the merged mean
  out = _sync_everywhere(states, kind)
  mean, var = _ref_merge(states, counts)
  mean_err, var_err = refs.sync_error(states.mean, states.var, counts)
  refs.assert_within(out.mean, mean, mean_err, "mean")
  # The spread of the means is taken about the merged mean: no cancellation at 1e4.
  refs.assert_within(out.var, var, var_err, "var")
  assert out.count.dtype == np.int32 and int(out.count) == 2  # round(16 / 8)


def test_weights_replace_the_counts_and_all_zero_weights_mean_equal_weights():
  states = _stacked_states([1] * R, offset=3.0)
  examples = np.array([5, 0, 7, 1, 2, 9, 3, 4], np.float32)
  out = jax.vmap(lambda s, w: jn.sync_running_stats(s, axis_name="r", weights=w), axis_name="r")(
      states, examples)
  mean, var = _ref_merge(states, examples)
  mean_err, var_err = refs.sync_error(states.mean, states.var, examples)
  refs.assert_within(out.mean[3], mean, mean_err, "mean")
  refs.assert_within(out.var[3], var, var_err, "var")
  # No replica has updated: equal weights, and initial states merge to themselves exactly.
  init = jax.tree.map(lambda a: np.stack([a] * R), jn.batch_norm_init(3))
  out = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")(init)
  np.testing.assert_array_equal(out.mean, init.mean)
  np.testing.assert_array_equal(out.var, init.var)
  np.testing.assert_array_equal(out.count, 0)


def test_identical_states_merge_to_themselves():
  one = _stacked_states([5] * R, seed=3)
  same = jax.tree.map(lambda a: np.broadcast_to(a[:1], a.shape), one)
  out = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")(same)
  mean_err, var_err = refs.sync_error(same.mean, same.var, [5] * R)
  refs.assert_within(out.mean, same.mean, mean_err, "mean")
  refs.assert_within(out.var, same.var, var_err, "var")
  np.testing.assert_array_equal(out.count, 5)


def test_a_tree_of_states_keeps_structure_and_dtypes_and_costs_two_all_reduces():
  rng = np.random.RandomState(4)
  tree = {
      "conv": jax.tree.map(lambda a: np.stack([a] * R), jn.batch_norm_init((4,))),
      "head": [jn.BatchNormState(jnp.asarray(rng.randn(R, 2, 3), jnp.bfloat16),
                                 jnp.asarray(rng.uniform(1, 2, (R, 2, 3)), jnp.bfloat16),
                                 jnp.asarray(np.arange(R), jnp.int32))],
  }
  sync = jax.pmap(lambda t: jn.sync_running_stats(t, axis_name="r"), axis_name="r")
  out = sync(tree)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
  head = out["head"][0]
  head_in = jax.tree.map(lambda a: np.asarray(a, np.float32), tree["head"][0])
  mean, var = _ref_merge(head_in, np.arange(R))
  mean_err, var_err = refs.sync_error(head_in.mean, head_in.var, np.arange(R), jnp.bfloat16)
  refs.assert_within(np.asarray(head.mean[5], np.float32), mean, mean_err, "mean")
  refs.assert_within(np.asarray(head.var[5], np.float32), var, var_err, "var")
  # The result passes through lax.cond with the input: same structure, shapes and dtypes.
  # (Indexed outside the branch: JAX 0.6 cannot index a sharded array while tracing one.)
  one, first = (jax.tree.map(lambda a: a[0], t) for t in (tree, out))
  jax.lax.cond(True, lambda: one, lambda: first)
  text = sync.lower(tree).as_text()
  assert len(re.findall(r"\ball_reduce\b", text)) == 2
  assert not re.search(r"\b(all_gather|all_to_all|reduce_scatter|collective_permute)\b", text)


def test_momentum_none_stays_the_exact_cumulative_average_across_syncs():
  """Replicas fold different numbers of batches, sync, fold 3 more each in step, sync again:
  the mean is the exact average of every batch mean any replica saw."""
  rng = np.random.RandomState(5)
  counts = [1, 3, 2, 2, 0, 4, 2, 2]  # average 2: the merged count is exact
  batches = [[rng.randn(3) + 10.0 for _ in range(c + 3)] for c in counts]

  def fold(state, means):
    for m in means:
      batch = jn.Moments(jnp.ones(3), jnp.asarray(m, jnp.float32), jnp.ones(3))
      state = jn.update_running_stats(state, batch, momentum=None)
    return state

  sync = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")
  stack = lambda states: jax.tree.map(lambda *a: jnp.stack(a), *states)
  states = stack([fold(jn.batch_norm_init(3), b[:c]) for b, c in zip(batches, counts, strict=True)])
  states = sync(states)
  np.testing.assert_array_equal(states.count, 2)
  states = stack([fold(jax.tree.map(lambda a, i=i: a[i], states), batches[i][counts[i]:])
                  for i in range(R)])
  states = sync(states)
  every = np.concatenate([np.stack(b) for b in batches])
  # Each batch mean is rounded to float32 once (u), then two rounds of cumulative averages
  # (`cumulative_average_error`: 4u per update, at most max(counts) + 3 updates) and two syncs
  # (`sync_error`: c(R) + 2u each) of values no larger than M.
  big_m = np.abs(every).max(0)
  bound = ((1 + 4 * (max(counts) + 3)) * refs.U32 + 2 * (refs.sum_factor(R) + 2 * refs.U32)) * big_m
  refs.assert_within(states.mean[0], every.mean(0), bound, "mean")
  np.testing.assert_array_equal(states.count, 5)


def _steps(steps: int = 48) -> tuple[np.ndarray, np.ndarray]:
  """Inputs (steps, 32, 3) at 1e4 and masks (steps, 32, 1): 0 to 4 valid rows of 4 per
  device, device 0 always empty."""
  rng = np.random.RandomState(6)
  xs = (rng.randn(steps, 32, 3) * [1.0, 2.0, 0.5] + 1e4).astype(np.float32)
  valid = rng.randint(0, 5, (steps, R))
  valid[:, 0] = 0
  return xs, (np.arange(4)[None, None, :] < valid[:, :, None]).reshape(steps, 32, 1)


def _train(synced: bool, steps: int = 48):
  """`steps` batch-norm training steps on 8 devices with uneven masks (device 0 always
  empty): per-device states, and the states of one device running the whole batch."""
  xs, masks = _steps(steps)
  xs = np.where(masks, xs, np.nan).astype(np.float32)
  init = jn.batch_norm_init(3)
  ax = "r" if synced else None

  def run(x_steps, m_steps, axis_name, state):
    def body(state, xm):
      _, state = jn.batch_norm(xm[0], state, training=True, momentum=0.9, mask=xm[1],
                               axis_name=axis_name)
      return state, None
    return jax.lax.scan(body, state, (x_steps, m_steps))[0]

  def per_replica(x, m):
    # Unsynchronized states differ per device: the carry must start as a varying value.
    state = init if synced else _compat.pcast_varying(init, ("r",))
    return jax.tree.map(lambda a: a[None], run(x, m, ax, state))

  mesh = _mesh()
  spec = P(None, "r")
  f = jaxcompat.shard_map(per_replica, mesh=mesh, in_specs=(spec, spec), out_specs=P("r"),
                          check_vma=True)
  per_device = jax.jit(f)(*(jax.device_put(a, NamedSharding(mesh, spec)) for a in (xs, masks)))
  whole = jax.jit(run, static_argnums=2)(xs, masks, None, init)
  return jax.tree.map(np.asarray, per_device), whole


def test_replicas_with_synchronized_statistics_stay_bit_identical_over_many_steps():
  per_device, whole = _train(synced=True)
  for a in per_device:
    assert np.all(np.isfinite(a))
    for i in range(1, R):
      np.testing.assert_array_equal(a[i], a[0])
  # And they equal one device training on the whole batch, to float32 rounding: both are within
  # `ema_chain_error` of the exact running statistics, from the per-step batch bounds.
  xs, masks = _steps()
  means = [refs.ref_moments(x, 0, m)[1] for x, m in zip(xs, masks, strict=True)]
  mean_err = refs.ema_chain_error(0.9, means, [refs.mean_error(x, 0, m)
                                               for x, m in zip(xs, masks, strict=True)])
  var_err = refs.ema_chain_error(0.9, [refs.ref_moments(x, 0, m)[2]
                                       for x, m in zip(xs, masks, strict=True)],
                                 [refs.var_error(x, 0, m) for x, m in zip(xs, masks, strict=True)])
  refs.assert_within(per_device.mean[0], whole.mean, 2 * mean_err, "mean")
  refs.assert_within(per_device.var[0], whole.var, 2 * var_err, "var")
  assert int(per_device.count[0]) == int(whole.count) == 48


def test_unsynchronized_replicas_diverge_and_sync_running_stats_reunites_them():
  per_device, _ = _train(synced=False)
  assert not np.array_equal(per_device.mean[1], per_device.mean[2])
  np.testing.assert_array_equal(per_device.count[0], 0)  # device 0 never saw a valid row
  np.testing.assert_array_equal(per_device.mean[0], 0.0)
  out = _sync_everywhere(per_device, "pmap")
  mean, var = _ref_merge(per_device, per_device.count)
  mean_err, var_err = refs.sync_error(per_device.mean, per_device.var, per_device.count)
  refs.assert_within(out.mean, mean, mean_err, "mean")
  refs.assert_within(out.var, var, var_err, "var")


def test_a_replica_that_saw_data_keeps_the_merged_count_positive():
  """Counts [0, 1]: the merge keeps the one replica's statistics, so its count must stay
  positive, or the next momentum=None update would replace them with the new batch."""
  states = jn.BatchNormState(mean=jnp.float32([[0.0], [4.0]]), var=jnp.float32([[1.0], [2.0]]),
                             count=jnp.int32([0, 1]))
  synced = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")(states)
  np.testing.assert_array_equal(synced.mean, [[4.0], [4.0]])
  np.testing.assert_array_equal(synced.count, [1, 1])
  x = jnp.float32([[9.0], [11.0]])  # batch mean 10: the average of 4 and 10 is 7
  new = jn.update_running_stats(jax.tree.map(lambda a: a[0], synced), jn.moments(x, 0),
                                momentum=None)
  np.testing.assert_array_equal(new.mean, [7.0])


def test_per_feature_counts_weigh_each_feature_by_its_own_updates():
  """Feature 1 was hidden on replica 0 (count 0) and seen once on replica 1: its merged
  statistics are replica 1's, with count 1; feature 0 merges both replicas equally."""
  states = jn.BatchNormState(mean=jnp.float32([[2.0, 0.0], [4.0, 6.0]]),
                             var=jnp.float32([[1.0, 1.0], [1.0, 3.0]]),
                             count=jnp.int32([[1, 0], [1, 1]]))
  synced = jax.vmap(lambda s: jn.sync_running_stats(s, axis_name="r"), axis_name="r")(states)
  np.testing.assert_array_equal(synced.mean, [[3.0, 6.0]] * 2)
  np.testing.assert_array_equal(synced.var, [[2.0, 3.0]] * 2)  # 1 + the means' spread 1
  np.testing.assert_array_equal(synced.count, [[1, 1]] * 2)
