"""Parameter layout: how a scale, bias, mask or statistic lines up with the input.

A parameter has either the feature shape (it runs along the feature axes) or a shape that
broadcasts to the input as in NumPy (per-example conditioning, e.g. `(batch, 1, features)`).
Statistics reduced per group of channels (group normalization) have one entry per group on a
last axis. These functions are the one place where each case is reshaped; arguments arrive
validated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def broadcast_param(p: ArrayLike, feature_axes: tuple[int, ...], shape: tuple[int, ...],
                    dtype: Any) -> jax.Array:
  """`p` in `dtype`, reshaped so that it broadcasts against an input of `shape`.

  A parameter of exactly the feature shape runs along `feature_axes`; any other shape
  broadcasts as in NumPy, so it only gains leading axes of size 1.
  """
  ndim = len(shape)
  p = jnp.asarray(p).astype(dtype)
  if p.shape == tuple(shape[i] for i in feature_axes):
    full = tuple(shape[i] if i in feature_axes else 1 for i in range(ndim))
  else:
    full = (1,) * (ndim - p.ndim) + p.shape
  return jnp.reshape(p, full)


def split_axis(a: Any, shape: tuple[int, ...], axis: int, parts: int,
               feature_axes: tuple[int, ...]) -> Any:
  """Splits `axis` of `a` (the input, a mask or a parameter) into `(parts, size // parts)`.

  `a` broadcasts to `shape`, or has the feature shape of `feature_axes`. A feature-shaped `a`
  is split only where `axis` is one of its axes (group norm's channels); otherwise it is
  returned as it is (it runs along other axes: ghost batches split the batch). A broadcasting
  `a` whose `axis` has size 1 gains two axes of size 1. None stays None.
  """
  if a is None:
    return None
  a = jnp.asarray(a)
  fshape = tuple(shape[i] for i in feature_axes)
  if a.shape == fshape and a.shape != tuple(shape):
    if axis not in feature_axes:
      return a
    i = feature_axes.index(axis)
    return jnp.reshape(a, fshape[:i] + (parts, fshape[i] // parts) + fshape[i + 1:])
  full = (1,) * (len(shape) - a.ndim) + a.shape
  split = (parts, shape[axis] // parts) if full[axis] == shape[axis] else (1, 1)
  return jnp.reshape(a, full[:axis] + split + full[axis + 1:])


def group_sum(a: jax.Array, reduction_axes: tuple[int, ...], groups: int | None,
              **kwargs: Any) -> jax.Array:
  """`jnp.sum(a, reduction_axes)`, or with `groups` a sum per group of last-axis channels.

  With `groups`, the last axis (which `reduction_axes` includes) holds C channels in `groups`
  runs of C/groups consecutive channels, and the result has `groups` entries on its last axis.
  It sums over the other reduction axes first, keeping the channels contiguous (a column
  reduction), then over the channels of each group (a small array): see
  docs/guides/internals.md, "Group normalization".
  """
  if groups is None:
    return jnp.sum(a, reduction_axes, **kwargs)
  last = a.ndim - 1
  per_channel = jnp.sum(a, tuple(i for i in reduction_axes if i != last), **kwargs)
  # The group size is given, not -1, which an empty batch (size 0) leaves undetermined.
  size = per_channel.shape[-1] // groups
  return jnp.sum(per_channel.reshape(per_channel.shape[:-1] + (groups, size)), -1)


def group_expand(s: jax.Array, reduction_axes: tuple[int, ...], groups: int | None,
                 shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts a statistic of `group_sum`'s shape back against the input.

  Without `groups` this is `jnp.expand_dims(s, reduction_axes)`; with it, each group's value is
  repeated over the group's `channels // groups` channels of the last axis of the input's
  `shape` (a broadcast, not a gather). The shape is read only with groups: a scalar input has
  no last axis.
  """
  if groups is None:
    return jnp.expand_dims(s, reduction_axes)
  channels = shape[-1]
  last = s.ndim + len(reduction_axes) - 2  # the input's channel axis
  s = jnp.broadcast_to(s[..., None], (*s.shape, channels // groups))
  s = s.reshape((*s.shape[:-2], channels))
  return jnp.expand_dims(s, tuple(i for i in reduction_axes if i != last))
