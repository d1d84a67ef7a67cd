"""Running statistics across replicas: one state for evaluation after per-replica updates.

With synchronized batch statistics (`batch_norm(..., axis_name=...)`) every replica folds the
same global moments into its running statistics, so the replicas' states stay identical and
nothing here is needed. With per-replica batch statistics (flax's ImageNet example, or any
model trained without `axis_name`), each replica's running statistics describe only its own
shard of the data; `sync_running_stats` merges them before evaluation or checkpointing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from ._batch_norm import BatchNormState
from ._dtypes import stats_dtypes
from ._stats import AxisName, merge_many, psum


def _is_state(node: Any) -> bool:
  return isinstance(node, BatchNormState)


def sync_running_stats(
    state: Any,
    *,
    axis_name: AxisName,
    weights: ArrayLike | None = None,
    axis_index_groups: Any = None,
) -> Any:
  r"""Makes every replica's running statistics identical: their weighted merge.

  Each replica's state is treated as the moments of the data it has seen, and the states are
  merged as `merge_moments` merges disjoint sets (law of total variance):

  .. math::
    W = \sum_r w_r, \qquad \bar\mu = \frac{1}{W}\sum_r w_r\,\mu_r, \qquad
    \bar\sigma^2 = \frac{1}{W}\sum_r w_r\left(\sigma^2_r + (\mu_r - \bar\mu)^2\right)

  The second sum is taken about the merged mean, after it is known, so running means of 1e4
  lose no precision. By default the weight `w_r` of a replica is its `count` (the number of
  updates that saw a valid element): a replica that never saw a valid element contributes
  nothing, and with `momentum=None` the merged mean is the exact cumulative average over every
  replica's batches. If no replica has a positive weight, the replicas are weighted equally.
  The merged `count` is the replicas' average count, rounded, so that merging replicas that
  update in step and keep training keeps `momentum=None` exact; identical states merge to
  themselves (to rounding). It is at least 1 when any replica counted an update, so that the
  merged statistics are not discarded by the next `momentum=None` update. `var` is treated as
  each replica's population variance (with `unbiased_running_var=True` the merge is
  approximate by a factor n / (n - 1)).

  It costs two `psum`s whatever the number of states: one of the weights, counts and
  weighted means, one of the centred variances; both results are replicated, so under
  `jax.shard_map` the synchronized state can be returned with `out_specs=P()`. Under plain
  `jax.jit` over sharded arrays there are no per-replica states and nothing to synchronize.

  Args:
    state: this replica's `BatchNormState`, or a pytree (e.g. a dict of layers) of them; all
      are merged in the same two collectives.
    axis_name: name (or tuple of names) of the mapped axes of the replicas (`shard_map`,
      `pmap`, `vmap`).
    weights: optional scalar, this replica's weight instead of each state's `count` (e.g. the
      number of examples it normalized); the same weight applies to every state of the tree.
    axis_index_groups: optional groups of replicas along `axis_name` that merge separately
      (`jax.pmap` only; elsewhere split the mesh axis in two and name the inner one).

  Returns:
    A pytree of the same structure, shapes and dtypes as `state`, identical on every replica
    (of a group).

  Raises:
    TypeError: a leaf of `state` is not a `BatchNormState`.
    ValueError: `axis_name` is None, states of inconsistent shapes, or `weights` not a finite,
      non-negative scalar.

  Example:
    Two replicas whose running statistics saw 1 and 3 updates:

    >>> import jax, jax.numpy as jnp, jaxnorm as jn
    >>> states = jn.BatchNormState(mean=jnp.array([[1.0], [4.0]]),
    ...                            var=jnp.array([[1.0], [2.0]]),
    ...                            count=jnp.array([1, 3], jnp.int32))
    >>> sync = lambda s: jn.sync_running_stats(s, axis_name="replica")
    >>> jax.vmap(sync, axis_name="replica")(states)
    BatchNormState(mean=Array([[3.25], [3.25]], dtype=float32),
                   var=Array([[3.4375], [3.4375]], dtype=float32),
                   count=Array([2, 2], dtype=int32))
  """
  states, treedef = jax.tree.flatten(state, is_leaf=_is_state)
  w_given = _checks.replicas_args(states, BatchNormState, axis_name=axis_name,
                                  axis_index_groups=axis_index_groups, weights=weights)
  if not states:
    return state
  with jax.named_scope("jaxnorm.sync_running_stats"):
    out = _merge_states(states, w_given, axis_name, axis_index_groups)
  return jax.tree.unflatten(treedef, out)


def _merge_states(states: list[BatchNormState], w_given: jax.Array | None, axis_name: Any,
                  axis_index_groups: Any) -> list[BatchNormState]:
  """`_stats.merge_many` of every state at once (two collectives): the states' means and variances
  laid end to end, each element weighted by its state's weight."""
  dtypes = stats_dtypes(*(d for s in states for d in (s.mean.dtype, s.var.dtype)),
                        complex_mean=False)
  dtype = dtypes[0]
  # A per-feature count (batch_norm_init(..., per_feature_count=True)) weighs each feature by
  # its own updates, and its merged count is per feature too.
  weights = [(s.count if w_given is None else w_given).astype(dtype) for s in states]
  flat = lambda parts: jnp.concatenate([jnp.ravel(p).astype(dtype) for p in parts])
  weight = flat([jnp.broadcast_to(w, s.mean.shape) for w, s in zip(weights, states,
                                                                     strict=True)])
  counts = jnp.stack([s.count.astype(dtype) for s in states])
  total = lambda leaves: psum(leaves, axis_name, axis_index_groups)
  _, mean, var, (replicas, c_sum) = merge_many(
      weight, flat([s.mean for s in states]), flat([s.var for s in states]), total,
      lambda v: v, dtypes=dtypes, extra=(counts,), equal_if_empty=True)
  out, start = [], 0
  for i, s in enumerate(states):
    stop = start + s.mean.size
    count = _merged_count(c_sum[i], replicas).astype(s.count.dtype)
    out.append(BatchNormState(mean[start:stop].reshape(s.mean.shape).astype(s.mean.dtype),
                              var[start:stop].reshape(s.var.shape).astype(s.var.dtype), count))
    start = stop
  return out


def _merged_count(c_sum: jax.Array, replicas: jax.Array) -> jax.Array:
  """The replicas' average count, rounded, and at least 1 if any replica counted an update:
  the merged statistics are then data's, which a count of 0 would let the next
  `momentum=None` update discard (counts [0, 1] average to 0.5, which rounds to 0)."""
  count = jnp.round(c_sum / replicas)
  return jnp.where(c_sum > 0, jnp.maximum(count, 1), count)
