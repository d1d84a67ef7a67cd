"""Statistics: moments of a reduction, their merge, and the collectives across devices.

Every normalizer (layer, RMS, group, instance and batch normalization) and every Flax wrapper
reduces its input through `two_pass` below, so the numerical choices are made once:

* accumulation in at least float32, whatever the input dtype (`_dtypes`);
* a two-pass variance (mean first, then centred squares), which has no `E[x²] - E[x]²`
  cancellation and is never negative;
* masked elements are replaced by zero *before* any arithmetic, so NaN or Inf there cannot leak;
* across devices, the statistics of the whole batch, weighted by each device's count of valid
  elements, with two small `psum`s (counts and sums, then centred squares). `psum` results are
  known to `shard_map` to be replicated, so `out_specs=P()` works with its checks on.

On a GPU (and a TPU, for float32 layer normalization of wide rows under differentiation)
the fused normalizers use `shifted_moments` where it saves a read of x: one pass of sums about
a shift among the data, the median of a few leading elements (docs/guides/internals.md, "One
read on GPUs").

Moments of disjoint sets combine by `merge_many` (many sets: ghost batches, replicas) or
`merge_moments` (two sets, Chan's update).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _checks
from ._compat import VMAP_AXIS_IN_SHARD_MAP_ERRORS, export
from ._dtypes import (
  COUNT_DTYPE,
  compute_dtype,
  count_sum_dtype,
  residual_sum_dtype,
  stats_dtypes,
  wide_dtype,
)
from ._layout import group_expand, group_sum
from ._platform import Policy, barrier, by_platform, hashable

AxisName = Hashable | Sequence[Hashable]


class Moments(NamedTuple):
  """Statistics of a reduction: a pytree of three arrays of the same shape.

  Attributes:
    count: number of valid *elements* reduced, per statistic, float32 (an integer value, so
      that it is summed across devices in the same collective as the sums). Not
      `BatchNormState.count`, which counts *updates*.
    mean: the mean, in at least float32.
    var: the population (biased) variance `sum((x - mean)²) / count`, never negative.
  """

  # `count` is the contract's name; mypy reports that it shadows the method tuple.count.
  count: jax.Array  # type: ignore[assignment]  # dtype=float32, shape=mean.shape
  mean: jax.Array
  var: jax.Array


# Functions that take or return moments can be serialized with `jax.export`.
if export is not None:
  export.register_namedtuple_serialization(Moments, serialized_name="jaxnorm.Moments")


def abs2(z: jax.Array) -> jax.Array:
  """`|z|²`, real: `z * z` for real `z`, `re² + im²` for complex."""
  if jnp.iscomplexobj(z):
    re, im = jnp.real(z), jnp.imag(z)
    return re * re + im * im
  return z * z


@contextlib.contextmanager
def groups_unsupported(axis_index_groups: Any) -> Iterator[None]:
  """JAX's NotImplementedError for `axis_index_groups` outside `jax.pmap`, raised within the
  block (by `lax.psum`, or by a transform of a program that holds one), naming the way."""
  try:
    yield
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


@contextlib.contextmanager
def named_axes(axis_name: AxisName) -> Iterator[None]:
  """JAX's errors for a collective over axis names it cannot reduce over (an unbound name
  gives a bare AssertionError under `jax.shard_map`), raised within the block, replaced by
  one that names the axes passed and those bound (`_checks.collective_error`)."""
  try:
    yield
  except (NameError, *VMAP_AXIS_IN_SHARD_MAP_ERRORS) as e:
    better = _checks.collective_error(axis_name, e)
    if better is None:
      raise
    raise better from e


def psum(tree: Any, axis_name: AxisName | None, axis_index_groups: Any) -> Any:
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
    summed = psum(parts, axis_name, axis_index_groups)
    leaves = [jax.lax.complex(*p) if isinstance(p, tuple) else p for p in summed]
    return jax.tree.unflatten(treedef, leaves)
  dtype = wide_dtype(*(leaf.dtype for leaf in leaves))
  if len({leaf.shape for leaf in leaves}) == 1:
    flat = jnp.stack([leaf.astype(dtype) for leaf in leaves]).ravel()
  else:
    flat = jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])
  with groups_unsupported(axis_index_groups), named_axes(axis_name):
    flat = jax.lax.psum(flat, axis_name, axis_index_groups=axis_index_groups)
  out, start = [], 0
  for leaf in leaves:
    out.append(flat[start:start + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


def two_pass(
    x: jax.Array,
    mask: jax.Array | None,
    *,
    reduction_axes: tuple[int, ...],
    dtype: Any,
    policy: Policy,
    centered: bool = True,
    groups: int | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> Moments:
  """Masked, count-weighted, cross-device moments of `x` (arguments validated), in a
  program compiled under `policy` (`_platform`).

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
    return group_sum(a, reduction_axes, groups, **kwargs)

  if mask is None:
    count = jnp.full(out_shape, n, COUNT_DTYPE)
    xz = xf
  else:
    # Summed in float32 where that is exact, so that under sharded jit XLA can merge the
    # count's all-reduce with the sum's.
    count = total(mask, dtype=count_sum_dtype(n))
    count = count.astype(COUNT_DTYPE)
    xz = jnp.where(mask, xf, jnp.zeros((), dtype))
  if not centered:
    sq = total(abs2(xz))
    count, sq = psum((count, sq), axis_name, axis_index_groups)
    denom = jnp.maximum(count, 1).astype(sq.dtype)
    return Moments(count, jnp.zeros(out_shape, dtype), sq / denom)
  s1 = total(xz)
  count, s1 = psum((count, s1), axis_name, axis_index_groups)
  denom = jnp.maximum(count, 1).astype(dtype)  # count 0: the sums are 0, so mean = var = 0.
  mean = s1 / denom
  # The second pass converts x on its own: one conversion shared by both passes would be
  # written out as a float32 copy of narrow input on XLA:CPU (docs/guides/internals.md).
  x2 = xf if x.dtype == dtype else barrier(policy, x).astype(dtype)
  centred = x2 - group_expand(mean, reduction_axes, groups, x.shape)
  if mask is not None:
    centred = jnp.where(mask, centred, jnp.zeros((), dtype))
  m2 = psum(total(abs2(centred)), axis_name, axis_index_groups)
  if m2.dtype != denom.dtype:  # complex input: the variance E[|x - μ|²] is real
    denom = jnp.maximum(count, 1).astype(m2.dtype)
  return Moments(count, mean, m2 / denom)


# With `blocked`, at most this many blocks along the first reduction axis, of at least
# `SHIFT_BLOCK_ROWS` entries each: XLA:GPU writes smaller blocks' partial results out
# (docs/guides/internals.md, "One read on GPUs").
SHIFT_BLOCKS = 64
SHIFT_BLOCK_ROWS = 128


def _median3(a: jax.Array, axis: int) -> jax.Array:
  """The median of the first three entries of `a` along `axis` (of at least three), by
  minimum and maximum: one of them, and between the other two."""
  a0, a1, a2 = (jax.lax.index_in_dim(a, i, axis, keepdims=False) for i in range(3))
  return jnp.maximum(jnp.minimum(a0, a1), jnp.minimum(jnp.maximum(a0, a1), a2))


def residual_sum(x: jax.Array, residual: jax.Array) -> jax.Array:
  """`x + residual` in `_dtypes.residual_sum_dtype`, explicit casts (strict promotion too):
  the fused residual add's sum (`add_layer_norm`), and the sum of its parts' samples."""
  dtype = residual_sum_dtype(x.dtype, residual.dtype)
  return x.astype(dtype) + residual.astype(dtype)


def _leading_shift(xf: jax.Array, sample_axes: tuple[int, ...],
                   sample_apart: bool = False, parts: tuple[jax.Array, ...] = ()) -> jax.Array:
  """The shift of `shifted_moments` per set of `xf` over `sample_axes` (the other axes kept,
  at size 1): the median of the set's first three elements along the last of those axes that
  has three, the others at position 0 (a set of fewer elements: its first). No single element
  can spoil it: the median of three lies between the other two. `sample_apart`: the elements
  are sliced in a kernel of their own (`Policy.sample_apart`). `parts`: x is
  `residual_sum(*parts)` and the elements are summed from theirs (the same values), so that
  no kernel has to read x before the one that computes it."""
  axis = next((a for a in sorted(sample_axes, reverse=True) if xf.shape[a] >= 3), None)

  def sample(a: jax.Array) -> jax.Array:
    for ax in sample_axes:
      a = jax.lax.slice_in_dim(a, 0, 3 if ax == axis else 1, axis=ax)
    return a
  lead = sample(xf) if not parts else residual_sum(*map(sample, parts)).astype(xf.dtype)
  if sample_apart:
    lead = jax.lax.optimization_barrier(lead)
  if axis is None:  # sets of fewer than three elements: a shift among them suffices
    return lead
  return jnp.expand_dims(_median3(lead, axis), axis)


def from_shifted_sums(shift: jax.Array, s1: jax.Array, s2: jax.Array, n: int) -> Moments:
  r"""The moments of sets of `n` elements from their sums :math:`\sum d` and
  :math:`\sum d^2` about `shift` K (:math:`d = x - K`): :math:`\mu = K + \bar d`,
  :math:`\sigma^2 = (\sum d^2 - \bar d\sum d)/n`, clamped at 0."""
  mean_d = s1 / n
  var = jnp.maximum(s2 - s1 * mean_d, jnp.zeros((), s2.dtype)) / n
  return Moments(jnp.full(shift.shape, n, COUNT_DTYPE), shift + mean_d, var)


def _shifted_sums(x: jax.Array, reduction_axes: tuple[int, ...], dtype: Any,
                  groups: int | None = None, sample_apart: bool = False,
                  parts: tuple[jax.Array, ...] = ()) -> Moments:
  xf = x.astype(dtype)
  n = math.prod(x.shape[a] for a in reduction_axes) // (groups or 1)
  # With groups, the sample is taken along the other reduction (spatial) axes, every channel,
  # and the group's shift is the mean of its channels' medians.
  last = x.ndim - 1
  sample_axes = reduction_axes if groups is None else tuple(a for a in reduction_axes
                                                            if a != last)
  lead = _leading_shift(xf, sample_axes, sample_apart, parts)
  per_set = math.prod(lead.shape[a] for a in reduction_axes) // (groups or 1)
  shift = jax.lax.stop_gradient(group_sum(lead, reduction_axes, groups) / per_set)
  d = xf - group_expand(shift, reduction_axes, groups, x.shape)
  if groups is not None or last not in reduction_axes:
    # Sums down columns (channels last) as one reduction of the pair: as two sibling
    # reductions of d, XLA:GPU writes d out at some shapes (docs/guides/internals.md, "One
    # read on GPUs"). Along rows a TPU would write the pair out.
    s1, s2 = group_sum(jnp.stack([d, d * d]), tuple(a + 1 for a in reduction_axes), groups)
  else:
    s1, s2 = jnp.sum(d, reduction_axes), jnp.sum(d * d, reduction_axes)
  return from_shifted_sums(shift, s1, s2, n)


def shift_blocks(n: int) -> int:
  """The number of blocks that `shifted_moments(blocked=True)` splits an axis of `n` into."""
  return math.gcd(n, SHIFT_BLOCKS, max(n // SHIFT_BLOCK_ROWS, 1))


def shifted_moments(x: jax.Array, reduction_axes: tuple[int, ...], dtype: Any, *,
                    blocked: bool = False, groups: int | None = None,
                    sample_apart: bool = False, parts: tuple[jax.Array, ...] = ()) -> Moments:
  r"""Moments of real `x` in one read: sums of `d = x - K` about a shift `K` (local: no mask,
  no `axis_name`; arguments validated). `groups`: as in `two_pass`, with spatial axes.

  `K`, held constant, is the median of each set's first three elements (`_leading_shift`; with
  groups, the mean over the group's channels of each channel's median at the first spatial
  positions). Then :math:`\mu = K + \bar d` and :math:`\sigma^2 = (\sum d^2 - \bar d \sum d) / n`,
  clamped at 0. Both sums read x in one kernel, where `two_pass` reads it
  twice when a set does not stay on chip. The variance's rounding error is the two-pass one's
  with :math:`\sigma^2 + (\mu - K)^2` in place of :math:`\sigma^2` (tests/refs.py,
  `shifted_errors`): it does not grow with the data's offset, because K lies among the data,
  and one element far from the rest (an outlier at the head of a row) cannot move K outside
  the range of the other two leading elements.

  With `blocked` (batch-like reductions, without groups), the first reduction axis is split
  into up to `SHIFT_BLOCKS` blocks of at least `SHIFT_BLOCK_ROWS` entries (as many as divide
  it), each shifted by the median of its own first three elements, and the blocks' moments
  are merged exactly (`merge_axis`). A batch split across devices along that axis then finds
  each block's shift on the device that holds the block, where one shift for the whole batch
  would have to be sent from the first device to the others.

  `parts`: x is the residual add `residual_sum(*parts)`, whose shift sample is summed from
  theirs (`_leading_shift`; without blocks).
  """
  with jax.named_scope("jaxnorm.shifted_moments"):
    a0 = min(reduction_axes)
    blocks = shift_blocks(x.shape[a0]) if blocked and groups is None else 1
    if blocks == 1:
      return _shifted_sums(x, reduction_axes, dtype, groups, sample_apart, parts)
    xb = x.reshape(x.shape[:a0] + (blocks, x.shape[a0] // blocks) + x.shape[a0 + 1:])
    per_block = _shifted_sums(xb, tuple(a + 1 for a in reduction_axes), dtype,
                              sample_apart=sample_apart)
    return merge_axis(per_block, a0)


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

  Range: the variance squares the deviations :math:`x_i - \mu` in the accumulation dtype, so
  in float32 it is exact where their squares and sums stay normal floats (between about
  1.2e-38 and 3.4e38): deviations from about 1e-19 to 1e19 in magnitude (the top divided by
  :math:`\sqrt n` for n elements). Above, the variance overflows to inf (or NaN where a path
  subtracts sums of squares) and normalization gives 0 (β with a bias) or NaN; below, the
  squares flush to 0 and, with `epsilon=0`, normalization gives ±inf or NaN (a positive
  epsilon that dominates such a variance gives finite output). No rescaling is done here: it
  would cost another pass over x on every call. For such data pass float64 input (with
  `jax_enable_x64`; `dtype=jnp.float64` here), or scale x by a power of two first (exact, and
  normalization with `epsilon=0` does not depend on the scale).

  With `axis_name`, the result is that of the concatenated batch of all devices, each weighted
  by its count of valid elements; it costs two `psum`s. Under plain `jax.jit` over sharded
  arrays no `axis_name` is needed: XLA inserts the collectives.

  Complex input (as flax supports it) has a complex mean and the real variance
  :math:`\sigma^2 = \frac{1}{n}\sum_i m_i |x_i - \mu|^2`, accumulated in at least complex64
  (its parts in float32).

  Args:
    x: floating or complex input.
    reduction_axes: axis or axes to reduce over.
    mask: optional boolean array broadcastable to `x`; True marks the elements to include. It
      broadcasts as NumPy does, aligned with `x`'s *last* axes: on `(batch, features)` input a
      mask of shape `(batch,)` would be a mask per feature; one flag per example is
      `mask[:, None]`.
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
  x, axes, mask = _checks.moments_args(x, reduction_axes, mask=mask, axis_name=axis_name,
                                       axis_index_groups=axis_index_groups, dtype=dtype)
  with jax.named_scope("jaxnorm.moments"):
    static = (axes, hashable(axis_name), hashable(axis_index_groups),
              compute_dtype(x.dtype, dtype))
    with groups_unsupported(axis_index_groups):
      return by_platform(_moments_branch, static, x, mask)


def _moments_branch(policy: Policy, static: tuple[Any, ...]) -> Callable[..., Moments]:
  """`moments`'s branch of `by_platform`: `two_pass` under `policy`."""
  axes, axis_name, axis_index_groups, dtype = static
  return lambda x, mask: two_pass(x, mask, reduction_axes=axes, dtype=dtype, policy=policy,
                                  axis_name=axis_name, axis_index_groups=axis_index_groups)


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
    (Array(10., dtype=float32), Array(4.5, dtype=float32), Array(8.25..., dtype=float32))
  """
  _checks.merge_args(a, b, Moments)
  dtype, mdtype = _stats_dtypes_of(a, b)
  na, nb = a.count.astype(dtype), b.count.astype(dtype)
  n = na + nb
  safe_n = jnp.where(n > 0, n, jnp.ones((), dtype))
  wb = nb / safe_n
  delta = b.mean.astype(mdtype) - a.mean.astype(mdtype)
  mean = a.mean.astype(mdtype) + delta * wb.astype(mdtype)
  m2 = na * a.var.astype(dtype) + nb * b.var.astype(dtype) + abs2(delta) * na * wb
  zero = jnp.zeros((), dtype)
  mean = jnp.where(n > 0, mean, jnp.zeros((), mdtype))
  var = jnp.where(n > 0, m2 / safe_n, zero)
  return Moments((a.count + b.count).astype(COUNT_DTYPE), mean, var)


def _stats_dtypes_of(*ms: Moments) -> tuple[Any, Any]:
  return stats_dtypes(*(d for m in ms for d in (m.mean.dtype, m.var.dtype)),
                      complex_mean=any(jnp.iscomplexobj(m.mean) for m in ms))


def merge_many(weight: jax.Array, mean: jax.Array, var: jax.Array,
          total: Callable[[tuple[jax.Array, ...]], tuple[jax.Array, ...]],
          expand: Callable[[jax.Array], jax.Array], *, dtypes: tuple[Any, Any],
          extra: tuple[jax.Array, ...] = (), equal_if_empty: bool = False,
          ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, ...]]:
  r"""Exact moments of the union of many disjoint sets (the law of total variance).

  .. math::
    W = \sum_g w_g, \quad \mu = \frac{1}{W}\sum_g w_g\mu_g, \quad
    \sigma^2 = \frac{1}{W}\sum_g w_g\big(\sigma_g^2 + |\mu_g - \mu|^2\big)

  `total(leaves)` sums each leaf over the sets (ghost batches laid out along an axis, or
  replicas across devices, where it is one collective per call), and `expand` broadcasts a
  merged value back against the sets' values. Only non-negative terms are added, and a set of
  weight 0 is neutral. With `equal_if_empty`, sets are weighted equally where no set has a
  positive weight (otherwise such a merge gives mean 0 and variance 0).

  Args:
    weight, mean, var: each set's weight (its count), mean and population variance.
    total: sums a tuple of arrays over the sets, in one reduction or collective.
    expand: broadcasts a merged statistic against the sets'.
    dtypes: `(real dtype, mean dtype)` of the arithmetic (`_dtypes.stats_dtypes`).
    extra: more arrays for the first `total` (summed in the same collective).
    equal_if_empty: weight the sets equally where every weight is 0.

  Returns:
    `(W, μ, σ², sums of extra)`; with `equal_if_empty`, `W` is the number of sets where every
    weight was 0.
  """
  dtype, mdtype = dtypes
  w = weight.astype(dtype)
  m = mean.astype(mdtype)
  one = jnp.ones((), dtype)
  if equal_if_empty:
    sets, m_sum, w_sum, wm_sum, *sums = total((one, m, w, w.astype(mdtype) * m, *extra))
    weighted = w_sum > 0
    w = jnp.where(expand(weighted), w, one)
    denom = jnp.where(weighted, w_sum, sets)
    merged = jnp.where(weighted, wm_sum, m_sum) / denom.astype(mdtype)
    sums = [sets, *sums]
  else:
    w_sum, wm_sum, *sums = total((w, w.astype(mdtype) * m, *extra))
    denom = jnp.maximum(w_sum, one)
    merged = wm_sum / denom.astype(mdtype)
  dev = m - expand(merged)
  m2, = total((w * (var.astype(dtype) + abs2(dev)),))
  return denom, merged, m2 / denom, tuple(sums)


def merge_axis(m: Moments, axis: int) -> Moments:
  """The moments of the union of the disjoint sets laid out along `axis` of `m` (`merge_many`)."""
  total = lambda leaves: tuple(jnp.sum(a, axis) for a in leaves)
  n, mean, var, _ = merge_many(m.count, m.mean, m.var, total, lambda s: jnp.expand_dims(s, axis),
                               dtypes=_stats_dtypes_of(m))
  return Moments(n.astype(COUNT_DTYPE), mean, var)


def bessel(var: jax.Array, count: jax.Array) -> jax.Array:
  """The unbiased variance `var * n / (n - 1)` from the population variance of `count`
  elements (Bessel's correction; n <= 1 gives `var * n`, i.e. 0 for a single element)."""
  n = count.astype(var.dtype)
  return var * n / jnp.maximum(n - 1, jnp.ones((), var.dtype))
