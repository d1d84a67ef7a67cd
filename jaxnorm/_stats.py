"""Moments: the one place where jaxnorm computes statistics.

Every normalizer (layer, RMS, group, instance and batch normalization) and every Flax wrapper
reduces its input through `_reduce` below, so the numerical choices are made once:

* accumulation in at least float32, whatever the input dtype;
* a two-pass variance (mean first, then centred squares), which has no `E[x²] - E[x]²`
  cancellation and is never negative;
* masked elements are replaced by zero *before* any arithmetic, so NaN or Inf there cannot leak;
* across devices, the statistics of the whole batch, weighted by each device's count of valid
  elements, with two small `psum`s (counts and sums, then centred squares). `psum` results are
  known to `shard_map` to be replicated, so `out_specs=P()` works with its checks on.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _checks

AxisName = Hashable | Sequence[Hashable]


class Moments(NamedTuple):
  """Statistics of a reduction: a pytree of three arrays of the same shape.

  Attributes:
    count: number of valid elements reduced, float32 (an integer value).
    mean: the mean, in at least float32.
    var: the population (biased) variance `sum((x - mean)²) / count`, never negative.
  """

  # `count` is the contract's name; mypy reports that it shadows the method tuple.count.
  count: jax.Array  # type: ignore[assignment]  # dtype=float32, shape=mean.shape
  mean: jax.Array
  var: jax.Array


def _wide_dtype(*dtypes: Any) -> Any:
  """The widest of `dtypes` and float32 (explicit, so it holds under strict dtype promotion)."""
  best = jnp.dtype(jnp.float32)
  for d in dtypes:
    d = jnp.dtype(d)
    if jnp.issubdtype(d, jnp.floating) and d.itemsize > best.itemsize:
      best = d
  return jax.dtypes.canonicalize_dtype(best)


def _complex_of(dtype: Any) -> Any:
  """The complex dtype whose parts are `dtype` (float32 -> complex64, float64 -> complex128)."""
  return jnp.complex128 if jnp.dtype(dtype).itemsize >= 8 else jnp.complex64


def _real_of(dtype: Any) -> Any:
  """The real dtype of `dtype`'s parts (complex64 -> float32); real dtypes unchanged."""
  return jnp.finfo(dtype).dtype


def _compute_dtype(x_dtype: Any, dtype: DTypeLike | None) -> Any:
  """Accumulation dtype: at least float32, or at least complex64 for complex input."""
  if jnp.issubdtype(x_dtype, jnp.complexfloating):
    parts = _wide_dtype(_real_of(x_dtype), *(() if dtype is None else (_real_of(dtype),)))
    return jax.dtypes.canonicalize_dtype(_complex_of(parts))
  return _wide_dtype(x_dtype if dtype is None else dtype)


def _abs2(z: jax.Array) -> jax.Array:
  """`|z|²`, real: `z * z` for real `z`, `re² + im²` for complex."""
  if jnp.iscomplexobj(z):
    re, im = jnp.real(z), jnp.imag(z)
    return re * re + im * im
  return z * z


def _cpu_barrier(x: Any) -> Any:
  """`lax.optimization_barrier(x)` in programs compiled for CPU, `x` itself elsewhere.

  The barrier keeps XLA:CPU from sharing one full-size expression between fusions (a broadcast
  of a statistic, the float32 conversion of bfloat16 input), which it would write out at x's
  size (see its uses here and in `_fused`). On GPU the same sharing happens inside one
  fused kernel, and a barrier splits that kernel in two: on an H100 (jax 0.11.2), LayerNorm
  forward at 32768x4096 float32 took 719 µs with the barrier and 382 µs without it (flax's
  LayerNorm: 545 µs; a copy of the array at the card's measured bandwidth: 363 µs).
  """
  return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def _psum(tree: Any, axis_name: AxisName | None, axis_index_groups: Any) -> Any:
  """One all-reduce of every leaf of `tree` over `axis_name` (a no-op without a name).

  `lax.psum` of a tuple lowers to one all-reduce per leaf, so the leaves are packed into one
  array of their widest dtype (float32 counts are exact in it) and unpacked afterwards. Leaves
  of one shape are stacked rather than concatenated: in JAX 0.10, `vmap` of a concatenation of
  a batched and an unbatched operand fails on input sharded over an Explicit mesh axis unless
  it runs under `jax.set_mesh`.
  """
  if axis_name is None:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  if any(jnp.iscomplexobj(leaf) for leaf in leaves):  # summed as their real and imaginary parts
    parts = [(jnp.real(a), jnp.imag(a)) if jnp.iscomplexobj(a) else a for a in leaves]
    summed = _psum(parts, axis_name, axis_index_groups)
    leaves = [jax.lax.complex(*p) if isinstance(p, tuple) else p for p in summed]
    return jax.tree.unflatten(treedef, leaves)
  dtype = _wide_dtype(*(leaf.dtype for leaf in leaves))
  if len({leaf.shape for leaf in leaves}) == 1:
    flat = jnp.stack([leaf.astype(dtype) for leaf in leaves]).ravel()
  else:
    flat = jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])
  try:
    flat = jax.lax.psum(flat, axis_name, axis_index_groups=axis_index_groups)
  except NotImplementedError as e:
    if axis_index_groups is None:
      raise
    raise NotImplementedError(
        f"axis_index_groups={axis_index_groups!r} is not supported by this transform "
        f"(JAX implements it only under jax.pmap). Under jax.shard_map, split the mesh axis "
        f"in two instead, e.g. Mesh(devices.reshape(groups, per_group), ('group', 'replica')), "
        f"and pass axis_name='replica'; under jax.vmap, reshape the mapped axis to "
        f"(groups, per_group) and nest two vmaps, naming the inner one."
    ) from e
  out, start = [], 0
  for leaf in leaves:
    out.append(flat[start:start + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


def _group_sum(a: jax.Array, reduction_axes: tuple[int, ...], groups: int | None,
               **kwargs: Any) -> jax.Array:
  """`jnp.sum(a, reduction_axes)`, or with `groups` a sum per group of last-axis channels.

  With `groups`, the last axis (which `reduction_axes` includes) holds C channels in `groups`
  runs of C/groups consecutive channels, and the result has `groups` entries on its last axis.
  It sums over the other reduction axes first, keeping the channels contiguous (a column
  reduction, which XLA:CPU vectorizes), then over the channels of each group (a small array).
  Reducing a `(..., groups, C/groups)` view over its spatial and last axes in one reduction
  instead took 1.5-3x as long on XLA:CPU (group norm statistics at 64x32x32x128 float32;
  measured, jax 0.10.2).
  """
  if groups is None:
    return jnp.sum(a, reduction_axes, **kwargs)
  last = a.ndim - 1
  per_channel = jnp.sum(a, tuple(i for i in reduction_axes if i != last), **kwargs)
  return jnp.sum(per_channel.reshape(per_channel.shape[:-1] + (groups, -1)), -1)


def _group_expand(s: jax.Array, reduction_axes: tuple[int, ...], groups: int | None,
                  channels: int) -> jax.Array:
  """Broadcasts a statistic of `_group_sum`'s shape back against the input.

  Without `groups` this is `jnp.expand_dims(s, reduction_axes)`; with it, each group's value is
  repeated over the group's `channels // groups` channels of the last axis (a broadcast, not a
  gather).
  """
  if groups is None:
    return jnp.expand_dims(s, reduction_axes)
  last = s.ndim + len(reduction_axes) - 2  # the input's channel axis
  s = jnp.broadcast_to(s[..., None], (*s.shape, channels // groups))
  s = s.reshape((*s.shape[:-2], channels))
  return jnp.expand_dims(s, tuple(i for i in reduction_axes if i != last))


def _reduce(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName | None,
    axis_index_groups: Any,
    dtype: Any,
    centered: bool,
    groups: int | None = None,
) -> Moments:
  """Masked, count-weighted, cross-device moments of `x` (already validated).

  With `centered=False` the returned `mean` is zero and `var` is the mean square `E[x²]`,
  the statistic of RMS normalization. With `groups` (group normalization of channels-last
  input), the last axis is one of `reduction_axes` and its channels are reduced in `groups`
  groups of consecutive channels, so the moments have `groups` entries on a last axis (see
  `_group_sum`); the variance is still the two-pass one, centred by each group's own mean.
  """
  xf = x.astype(dtype)
  out_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduction_axes)
  if groups is not None:
    out_shape += (groups,)
  n = math.prod(x.shape[a] for a in reduction_axes) // (groups or 1)

  def total(a: jax.Array, **kwargs: Any) -> jax.Array:
    return _group_sum(a, reduction_axes, groups, **kwargs)

  if mask is None:
    count = jnp.full(out_shape, n, jnp.float32)
    xz = xf
  else:
    # Summed in float32 when that is exact (every partial sum is an integer below 2**24), so
    # that under sharded jit XLA can merge the count's all-reduce with the sum's (an int32
    # count needs its own all-reduce: three collectives instead of two).
    count = total(mask, dtype=jnp.float32 if n < 2**24 else jnp.int32)
    count = count.astype(jnp.float32)
    xz = jnp.where(mask, xf, jnp.zeros((), dtype))
  if not centered:
    sq = total(_abs2(xz))
    count, sq = _psum((count, sq), axis_name, axis_index_groups)
    denom = jnp.maximum(count, 1).astype(sq.dtype)
    return Moments(count, jnp.zeros(out_shape, dtype), sq / denom)
  s1 = total(xz)
  count, s1 = _psum((count, s1), axis_name, axis_index_groups)
  denom = jnp.maximum(count, 1).astype(dtype)  # count 0: the sums are 0, so mean = var = 0.
  mean = s1 / denom
  # The second pass converts x on its own: with one conversion shared by both passes,
  # XLA:CPU writes a float32 copy of bfloat16 input out and reads it twice (32 MiB more
  # temporary memory at 8192x1024), where each reduction can convert as it reads.
  x2 = xf if x.dtype == dtype else _cpu_barrier(x).astype(dtype)
  centred = x2 - _group_expand(mean, reduction_axes, groups, x.shape[-1])
  if mask is not None:
    centred = jnp.where(mask, centred, jnp.zeros((), dtype))
  m2 = _psum(total(_abs2(centred)), axis_name, axis_index_groups)
  if m2.dtype != denom.dtype:  # complex input: the variance E[|x - μ|²] is real
    denom = jnp.maximum(count, 1).astype(m2.dtype)
  return Moments(count, mean, m2 / denom)


def moments(
    x: ArrayLike,
    reduction_axes: int | Sequence[int],
    *,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: DTypeLike | None = None,
) -> Moments:
  r"""Count, mean and population variance of `x` over `reduction_axes`.

  .. math::
    n = \sum_i m_i, \qquad \mu = \frac{1}{n}\sum_i m_i x_i, \qquad
    \sigma^2 = \frac{1}{n}\sum_i m_i (x_i - \mu)^2

  where :math:`m_i` is the mask (1 everywhere without one) and the sums run over the reduction
  axes and, with `axis_name`, over every device of the named axis. The variance is the
  population (biased) one, computed in two passes, so inputs with a large offset (mean 1e4,
  std 1 in float32) keep full precision; it is never negative. Statistics are accumulated in
  `promote_types(dtype or x.dtype, float32)`.

  A reduction with no valid element has count 0, mean 0 and variance 0 (no NaN). Masked
  elements never enter the arithmetic, so they may hold NaN or Inf.

  With `axis_name`, the result is that of the concatenated batch of all devices, each weighted
  by its count of valid elements; it costs two `psum`s. Under plain `jax.jit` over sharded
  arrays no `axis_name` is needed: XLA inserts the collectives.

  Complex input (as flax supports it) has a complex mean and the real variance
  :math:`\sigma^2 = \frac{1}{n}\sum_i m_i |x_i - \mu|^2`, accumulated in at least complex64
  (its parts in float32).

  Args:
    x: floating or complex input.
    reduction_axes: axis or axes to reduce over.
    mask: optional boolean array broadcastable to `x`; True marks the elements to include.
    axis_name: name (or tuple of names) of mapped axes (`shard_map`, `pmap`, `vmap`) to reduce
      over as well.
    axis_index_groups: optional groups of device indices along `axis_name` that reduce
      separately (supported by JAX only under `jax.pmap`).
    dtype: accumulation dtype; promoted to at least float32.

  Returns:
    `Moments(count, mean, var)`, each of `x`'s shape with `reduction_axes` removed; `count` is
    float32, `mean` and `var` are in the accumulation dtype.

  Raises:
    TypeError: `x` is not floating, or `mask` is not boolean.
    ValueError: an axis is out of range or repeated, or `mask` does not broadcast to `x`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    >>> m = jn.moments(x, reduction_axes=1, mask=jnp.array([True, True, False]))
    >>> m.count, m.mean, m.var
    (Array([2., 2.], dtype=float32), Array([ 1.5, 15. ], dtype=float32),
     Array([ 0.25, 25.  ], dtype=float32))
  """
  x = jnp.asarray(x)
  _checks.check_floating(x, allow_complex=True)
  axes = _checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  mask = _checks.check_mask(mask, x.shape)
  _checks.check_axis_index_groups(axis_name, axis_index_groups)
  with jax.named_scope("jaxnorm.moments"):
    return _reduce(x, axes, mask, axis_name, axis_index_groups,
                   _compute_dtype(x.dtype, dtype), centered=True)


def merge_moments(a: Moments, b: Moments) -> Moments:
  r"""Exact moments of the union of two disjoint sets of elements (Chan et al., 1979).

  .. math::
    n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad
    \mu = \mu_a + \delta\frac{n_b}{n}, \quad
    \sigma^2 = \frac{n_a\sigma_a^2 + n_b\sigma_b^2 + \delta^2 n_a n_b / n}{n}

  The update adds only non-negative terms, so it keeps the precision of both inputs, and an
  empty side (count 0) is neutral: merging with it returns the other side unchanged. Complex
  moments (a complex mean, the real variance of `moments`) merge with :math:`|\delta|^2` for
  :math:`\delta^2`.

  Args:
    a: moments of the first set.
    b: moments of the second set, of a shape that broadcasts with `a`'s.

  Returns:
    The merged `Moments` (population variance).

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.arange(10.0)
    >>> m = jn.merge_moments(jn.moments(x[:3], 0), jn.moments(x[3:], 0))
    >>> m.count, m.mean, m.var
    (Array(10., dtype=float32), Array(4.5, dtype=float32), Array(8.25, dtype=float32))
  """
  dtype, mdtype = _merge_dtypes(a, b)
  na, nb = a.count.astype(dtype), b.count.astype(dtype)
  n = na + nb
  safe_n = jnp.where(n > 0, n, jnp.ones((), dtype))
  wb = nb / safe_n
  delta = b.mean.astype(mdtype) - a.mean.astype(mdtype)
  mean = a.mean.astype(mdtype) + delta * wb.astype(mdtype)
  m2 = na * a.var.astype(dtype) + nb * b.var.astype(dtype) + _abs2(delta) * na * wb
  zero = jnp.zeros((), dtype)
  mean = jnp.where(n > 0, mean, jnp.zeros((), mdtype))
  var = jnp.where(n > 0, m2 / safe_n, zero)
  return Moments((a.count + b.count).astype(jnp.float32), mean, var)


def _merge_dtypes(*ms: Moments) -> tuple[Any, Any]:
  """The real dtype of merged counts and variances (at least float32) and that of the merged
  mean: the same, or its complex counterpart when a mean is complex."""
  parts = [_real_of(d) for m in ms for d in (m.mean.dtype, m.var.dtype)]
  dtype = _wide_dtype(*parts)
  if any(jnp.iscomplexobj(m.mean) for m in ms):
    return dtype, jax.dtypes.canonicalize_dtype(_complex_of(dtype))
  return dtype, dtype


def _merge_axis(m: Moments, axis: int) -> Moments:
  r"""Exact moments of the union of the disjoint sets laid out along `axis` of `m`.

  `merge_moments` of many sets at once (ghost batches merged into their whole batch):

  .. math::
    n = \sum_g n_g, \quad \mu = \frac{1}{n}\sum_g n_g\mu_g, \quad
    \sigma^2 = \frac{1}{n}\sum_g n_g\big(\sigma_g^2 + (\mu_g - \mu)^2\big)

  Only non-negative terms are added, and a set of count 0 is neutral.
  """
  dtype, mdtype = _merge_dtypes(m)
  n_g = m.count.astype(dtype)
  n = jnp.sum(n_g, axis)
  safe_n = jnp.maximum(n, jnp.ones((), dtype))
  mean = jnp.sum(n_g.astype(mdtype) * m.mean.astype(mdtype), axis) / safe_n.astype(mdtype)
  dev = m.mean.astype(mdtype) - jnp.expand_dims(mean, axis)
  var = jnp.sum(n_g * (m.var.astype(dtype) + _abs2(dev)), axis) / safe_n
  return Moments(n.astype(jnp.float32), mean, var)
