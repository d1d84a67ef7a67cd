"""Batch normalization: running-statistics state, its update, and the normalizer.

The state is a NamedTuple of arrays made by `batch_norm_init` and advanced by
`update_running_stats`; `batch_norm` returns `(output, new_state)` and never mutates.

Momentum conventions, written down once:

* jaxnorm, flax, haiku, equinox and Keras use a *decay*:
  `running = momentum * running + (1 - momentum) * batch`, default 0.99.
* PyTorch uses the weight of the *new* batch: `running = (1 - m) * running + m * batch`,
  default 0.1. `momentum_from_torch(m)` converts it (0.1 -> 0.9).
* PyTorch's `momentum=None` is the exact cumulative average over all updates; here too.
* PyTorch stores the unbiased (Bessel-corrected) running variance `var * n / (n - 1)` and
  normalizes training batches with the biased one; `unbiased_running_var=True` does the same.
  Everyone else stores the biased variance (the default here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _checks
from ._apply import apply_given
from ._checks import BatchNormSpec
from ._compat import export
from ._dtypes import real_of, stats_dtypes
from ._fused import fused_norm
from ._layout import split_axis
from ._stats import AxisName, Moments, bessel, merge_axis


class BatchNormState(NamedTuple):
  """Running statistics of batch normalization, one entry per feature.

  Attributes:
    mean: running mean, of the feature shape (complex for complex input).
    var: running (biased, or unbiased with `unbiased_running_var=True`) variance, always real.
    count: number of *updates* that saw at least one valid element, an int32 scalar (what
      `momentum=None` averages over); or, with `batch_norm_init(..., per_feature_count=True)`,
      int32 of the feature shape: for each feature, the updates in which it had a valid
      element. Not `Moments.count`, which counts the *elements* a
      reduction saw, per feature; both keep the name of the quantity they count in their
      field, as PyTorch's `num_batches_tracked` and flax's statistics do.
  """

  mean: jax.Array  # shape=feature_shape
  var: jax.Array  # shape=feature_shape
  # `count` is the contract's name; mypy reports that it shadows the method tuple.count.
  count: jax.Array  # type: ignore[assignment]  # shape=() or feature_shape, dtype=int32


# A training step that takes or returns the state can be serialized with `jax.export`.
if export is not None:
  export.register_namedtuple_serialization(BatchNormState,
                                           serialized_name="jaxnorm.BatchNormState")


def batch_norm_init(feature_shape: int | Sequence[int], *,
                    dtype: DTypeLike = jnp.float32,
                    per_feature_count: bool = False) -> BatchNormState:
  r"""Initial running statistics: mean 0, variance 1, count 0.

  Evaluating before any training step therefore normalizes by `sqrt(1 + epsilon)`: finite,
  close to the identity.

  For complex input give a complex `dtype`: the running mean is then complex and the running
  variance, :math:`E[|x - \mu|^2]`, real (`complex64` gives a complex64 mean and a float32
  variance).

  Args:
    feature_shape: the shape of the feature axes (an int for one axis).
    dtype: dtype of the running mean and variance (the update computes in float32 or wider
      and casts back); a complex dtype for complex input (the variance gets its real dtype).
    per_feature_count: make `count` of the feature shape, one count per feature, so that
      `momentum=None` averages each feature over the updates in which it had valid elements
      (`batch_norm` with `momentum=None` refuses, with one count, a mask that can differ
      between features). Default: one int32 scalar
      for the state, the layout of earlier checkpoints, exact when every update that sees a
      valid element sees every feature.

  Returns:
    A `BatchNormState`.

  Example:
    >>> import jaxnorm as jn
    >>> jn.batch_norm_init(3)
    BatchNormState(mean=Array([0., 0., 0.], dtype=float32),
                   var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
    >>> jn.batch_norm_init(2, dtype=jnp.complex64)
    BatchNormState(mean=Array([0.+0.j, 0.+0.j], dtype=complex64),
                   var=Array([1., 1.], dtype=float32), count=Array(0, dtype=int32))
  """
  shape = _checks.init_args(feature_shape, dtype)
  return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, real_of(dtype)),
                        jnp.zeros(shape if per_feature_count else (), jnp.int32))


def momentum_from_torch(momentum: float | None) -> float | None:
  """Converts PyTorch's BatchNorm `momentum` (weight of the new batch) to jaxnorm's decay.

  PyTorch: `running = (1 - m) * running + m * batch` (default m = 0.1). jaxnorm, like flax:
  `running = momentum * running + (1 - momentum) * batch` (default 0.99). `None` (PyTorch's
  cumulative average) is the same in both.

  Example:
    >>> import jaxnorm as jn
    >>> jn.momentum_from_torch(0.1)
    0.9
  """
  _checks.check_torch_momentum(momentum)
  if momentum is None:
    return None
  return round(1.0 - momentum, 15)


def update_running_stats(
    state: BatchNormState,
    batch: Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> BatchNormState:
  r"""Folds a batch's moments into the running statistics.

  .. math::
    \bar\mu \leftarrow m\,\bar\mu + (1 - m)\,\mu_B, \qquad
    \bar\sigma^2 \leftarrow m\,\bar\sigma^2 + (1 - m)\,\sigma^2_B

  with the decay `m = momentum` (flax's convention; PyTorch's 0.1 is
  `momentum_from_torch(0.1) == 0.9`). With `momentum=None` the weight is `1 / (count + 1)`,
  the exact cumulative average of every update so far (PyTorch's `momentum=None`; the initial
  mean 0 / variance 1 do not enter it). With `unbiased_running_var=True` the batch variance
  enters as `var * n / (n - 1)` (Bessel's correction with the batch's valid count n, as
  PyTorch stores it; n = 1 contributes 0).

  The arithmetic runs in float32 or wider whatever the state's dtype (in bfloat16, a decay of
  0.999 would round to 1), and the result has the state's dtypes. A bfloat16 or float16 state
  is rounded back stochastically (unbiased), since rounding to nearest would lose every
  increment below half its spacing and stall the statistics short of their target; a copy
  (weight 1) is rounded to nearest. Moments of complex input
  (a complex mean, a real variance) need a state with a complex mean
  (`batch_norm_init(shape, dtype=jnp.complex64)`). Features whose batch count
  is 0 keep their running values. A scalar `count` advances if some feature saw a valid
  element, so with `momentum=None` a feature that a mask hid in earlier updates would give its
  first batch less than its due and keep part of the initial values; a per-feature `count`
  (`batch_norm_init(shape, per_feature_count=True)`) advances per feature and is exact.
  (`batch_norm` with `momentum=None` and a scalar count therefore refuses a mask that can
  differ between features; this function sees only the moments and cannot tell.)

  A batch whose moments are not all finite (a NaN or Inf at a valid position, or squares that
  overflow) leaves the whole state unchanged: mean, variance and count. One bad batch then
  cannot poison the running statistics; the normalized output still shows the NaN, so the loss
  usually does too, and `optax.apply_if_finite` can skip that step's parameter update (on
  XLA:CPU a `maximum` fused into a reduction may drop a NaN, openxla/xla#21461: a ReLU followed
  by mean or max pooling can hide it from the loss, so check the batch itself where that
  matters). Across devices the moments are global, so every device makes the same decision.

  Args:
    state: the running statistics.
    batch: the batch's `Moments`, of the state's feature shape.
    momentum: decay in [0, 1] (1 freezes the statistics), or None for the cumulative average.
    unbiased_running_var: store the Bessel-corrected variance, as PyTorch does.

  Returns:
    The new `BatchNormState`, with the same structure, shapes and dtypes.

  Raises:
    TypeError: complex moments and a real running mean, or the reverse.
    ValueError: momentum outside [0, 1], or moments of another shape than the state.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> state = jn.batch_norm_init(2)
    >>> batch = jn.moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), reduction_axes=0)
    >>> jn.update_running_stats(state, batch, momentum=None)
    BatchNormState(mean=Array([2., 4.], dtype=float32), var=Array([1., 4.], dtype=float32),
                   count=Array(1, dtype=int32))
    >>> bad = jn.moments(jnp.array([[1.0, jnp.nan], [3.0, 6.0]]), reduction_axes=0)
    >>> jn.update_running_stats(state, bad)  # a non-finite batch changes nothing
    BatchNormState(mean=Array([0., 0.], dtype=float32), var=Array([1., 1.], dtype=float32),
                   count=Array(0, dtype=int32))
  """
  _checks.update_args(state, batch, state_type=BatchNormState, moments_type=Moments,
                      momentum=momentum, unbiased_running_var=unbiased_running_var)
  return _update(state, batch, momentum, unbiased_running_var)


def _update(state: BatchNormState, batch: Moments, momentum: float | None,
            unbiased_running_var: bool) -> BatchNormState:
  """`update_running_stats` of validated arguments."""
  dtype, mean_dtype = stats_dtypes(state.mean.dtype, state.var.dtype, batch.mean.dtype,
                                   batch.var.dtype, complex_mean=jnp.iscomplexobj(batch.mean))
  count = batch.count.astype(dtype)
  var = batch.var.astype(dtype)
  if unbiased_running_var:
    var = bessel(var, count)
  if momentum is None:
    weight = 1 / (state.count.astype(dtype) + 1)  # weight of the new batch
  else:
    weight = jnp.asarray(1.0 - momentum, dtype)
  finite = jnp.all(jnp.isfinite(batch.mean) & jnp.isfinite(batch.var))
  seen = (count > 0) & finite

  def ema(old: jax.Array, new: jax.Array, dtype: Any, salt: int) -> jax.Array:
    w = weight.astype(dtype)
    mixed = (1 - w) * old.astype(dtype) + w * new.astype(dtype)
    if jnp.finfo(old.dtype).nmant >= jnp.finfo(jnp.float32).nmant:
      return jnp.where(seen, mixed, old.astype(dtype)).astype(old.dtype)
    # A weight-1 update (momentum 0, a first cumulative update) is a copy: nearest is best.
    stochastic = round_stochastically(mixed, old.dtype, (state.count, salt, batch.mean))
    return jnp.where(seen, jnp.where(w == 1, mixed.astype(old.dtype), stochastic), old)

  return BatchNormState(
      mean=ema(state.mean, batch.mean, mean_dtype, 0),
      var=ema(state.var, var, dtype, 1),
      count=state.count + _advanced(seen, state.count.shape).astype(state.count.dtype),
  )


def _advanced(seen: jax.Array, count_shape: tuple[int, ...]) -> jax.Array:
  """Which counts an update advances: a per-feature count where its feature had a valid
  element (so `momentum=None` weighs each feature by its own updates), one count for the
  state if any feature had."""
  return jnp.any(seen) if count_shape == () else jnp.broadcast_to(seen, count_shape)


def round_stochastically(x: jax.Array, dtype: Any, seeds: tuple[ArrayLike, ...]) -> jax.Array:
  r"""`x` rounded to the narrower `dtype` (bfloat16, float16) up or down at random, unbiased:
  to the far neighbour with probability equal to the fraction of the spacing it lies from the
  near one, so that :math:`E[\mathrm{round}(x)] = x`.

  Why: a running statistic stored in bfloat16 loses every increment below half its spacing when
  rounded to nearest, so an average with decay 0.99 stops 50 spacings short of its target (1%
  of the value; with 0.999, 500 spacings). Rounded stochastically it keeps moving, with an
  error of about one spacing times the square root of the batch's noise in spacings.

  The uniform draws come from a hash of `seeds` (the state's update count, a salt per
  statistic, the batch's mean), of each element's index and of the bits of `x` itself: no
  key is needed, the result is a function of the inputs (replicas with the same inputs stay
  identical), and a state that did not move draws afresh on the next update, because the count
  or the batch changed. A state whose count does not advance (flax's variable tree for a
  numeric momentum stores none) draws from the batch's values alone.
  """
  near = x.astype(dtype)
  near_x = near.astype(x.dtype)
  toward = jnp.where(near_x < x, jnp.inf, -jnp.inf).astype(dtype)
  far = jnp.nextafter(near, toward)
  frac = (x - near_x) / (far.astype(x.dtype) - near_x)  # in [0, 1/2]: far's probability
  h = _bits32(x) ^ jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  for seed in seeds:
    for part in jax.tree.leaves(seed):
      h = _mix(h ^ jnp.bitwise_xor.reduce(jnp.ravel(_bits32(jnp.asarray(part)))))
  h = _mix(h)
  uniform = (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # in [0, 1)
  return jnp.where(uniform < frac, far, near)


def _bits32(a: jax.Array) -> jax.Array:
  """The bits of `a` folded to uint32 (real and imaginary parts, 64-bit halves)."""
  if jnp.iscomplexobj(a):
    return _bits32(jnp.real(a)) ^ _mix(_bits32(jnp.imag(a)))
  width = jnp.dtype(a.dtype).itemsize * 8
  if a.dtype == jnp.bool_:
    return a.astype(jnp.uint32)
  u = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{width}"))
  if width == 64:
    return (u ^ (u >> 32)).astype(jnp.uint32)
  return u.astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """A 32-bit integer hash with full avalanche (Wellons' lowbias32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _train(x: jax.Array, state: BatchNormState, scale: Any, bias: Any, spec: BatchNormSpec,
           renorm: tuple[Any, Any, Any, Any] | None) -> tuple[jax.Array, BatchNormState]:
  """A training step of batch (re)normalization, with or without ghost batches."""
  norm = spec.norm
  if spec.virtual_batch_size is None:
    y, batch = fused_norm(x, scale, bias, norm, renorm)
  else:
    # Ghost batches: axis 0 becomes (groups, virtual_batch_size); the group axis keeps its own
    # statistics (with axis_name, ghost batch i is the i-th chunk of every device together).
    groups = x.shape[0] // spec.virtual_batch_size
    split = lambda a: split_axis(a, x.shape, 0, groups, norm.feature_axes)
    x_g, scale_g, bias_g = split(x), split(scale), split(bias)
    ghost_spec = norm._replace(
        # axis 0 is a reduction axis: it becomes axis 1
        reduction_axes=tuple(a + 1 for a in norm.reduction_axes),
        feature_axes=tuple(a + 1 for a in norm.feature_axes), mask=split(norm.mask))
    y, ghost = fused_norm(x_g, scale_g, bias_g, ghost_spec, renorm)
    y = y.reshape(x.shape)
    batch = merge_axis(ghost, 0)  # the whole batch's exact moments, for the running state
  new_state = _update(state, batch, spec.momentum, spec.unbiased_running_var)
  return y, new_state


def batch_norm(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    feature_axes: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
    virtual_batch_size: int | None = None,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch normalization (Ioffe & Szegedy, 2015) with explicit running statistics.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

  In training, `μ, σ²` are the moments of the batch over every axis except `feature_axes`
  (population variance, two passes, at least float32 — on a GPU without mask or `axis_name`,
  one read about a shift, as precise: docs/guides/internals.md; only elements where `mask` is
  True; with
  `axis_name`, over all named devices weighted by their valid counts), and the running
  statistics are updated with `update_running_stats`. In evaluation, the running statistics are
  used and the state is returned unchanged.

  Ghost batches (`virtual_batch_size`, Hoffer et al., 2017): axis 0 is split into consecutive
  virtual batches of that many examples, each normalized with its own statistics (masks apply
  within each). With `axis_name`, virtual batch *i* is the *i*-th chunk of every device
  together; without it, virtual batches stay on their device. The running statistics are
  updated once per call with the moments of the whole batch, the exact merge of the virtual
  batches' moments, so they estimate the population (Keras instead folds in the mean of the
  virtual batches' variances, which lacks the spread of their means).

  A training batch whose moments are not finite leaves the running statistics unchanged (see
  `update_running_stats`); its output shows the NaN.

  Complex input (as `flax.linen.BatchNorm` takes it) is normalized with a complex mean and the
  real variance :math:`E[|x - \mu|^2]` (see `moments`); its state needs a complex running mean,
  `batch_norm_init(shape, dtype=jnp.complex64)`, whose variance stays real. Its gradients are JAX's
  own (Wirtinger) derivatives of the two passes; the fused derivative serves real input.

  Args:
    x: floating or complex input.
    state: running statistics of the feature shape (`batch_norm_init`).
    scale: optional γ of the feature shape, or of any shape that broadcasts to `x`
      (conditional batch norm: e.g. `(batch, 1, 1, channels)`; its gradient comes back in that
      shape).
    bias: optional β, of the feature shape or a shape that broadcasts to `x`.
    training: True to use and fold in the batch's statistics, False to use the running ones.
    feature_axes: axes that keep separate statistics (default: the last, channels-last).
    momentum: decay of the running statistics in [0, 1] (1: frozen), or None for the
      cumulative average.
    epsilon: non-negative constant added to the variance.
    mask: optional boolean array broadcastable to `x`; True marks elements that enter the batch
      statistics. A batch with no valid element leaves the running statistics unchanged. It
      broadcasts against `x`'s last axes: for one flag per example of `(batch, features)`
      input pass `valid[:, None]`, not `valid` (a mask per feature).
    axis_name: mapped axis (or axes) over which the batch is split across devices.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    unbiased_running_var: store the Bessel-corrected running variance, as PyTorch does.
    virtual_batch_size: size of the ghost batches axis 0 is split into in training (it must
      divide `x.shape[0]`), or None for one batch. Ignored in evaluation, so a model trained
      with ghost batches evaluates on any batch size, a single example included.

  Returns:
    `(y, new_state)`: `y` of `x`'s shape and dtype, and the updated (or, in evaluation, the
    same) state.

  Raises:
    TypeError: `x` is neither floating nor complex, `training` is not a bool, `state` is not
      a BatchNormState, or its mean is real for complex `x` (or complex for real `x`).
    ValueError: bad axes, parameters or state of the wrong shape, a mask that does not
      broadcast, a negative epsilon, momentum outside [0, 1], or a `virtual_batch_size` that
      does not divide the batch.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, state = jn.batch_norm(x, jn.batch_norm_init(1), training=True, epsilon=0.0)
    >>> y
    Array([[-1.],
           [ 1.]], dtype=float32)
    >>> state
    BatchNormState(mean=Array([0.02], dtype=float32), var=Array([1.], dtype=float32),
                   count=Array(1, dtype=int32))
    >>> x = jnp.array([[1.0], [3.0], [10.0], [30.0]])
    >>> y, state = jn.batch_norm(x, jn.batch_norm_init(1), training=True, epsilon=0.0,
    ...                          momentum=0.0, virtual_batch_size=2)
    >>> y.ravel()  # each pair normalized on its own
    Array([-1.,  1., -1.,  1.], dtype=float32)
    >>> state.mean  # the whole batch's mean
    Array([11.], dtype=float32)
  """
  xa, spec = _checks.batch_norm_spec(
      x, state, scale, bias, state_type=BatchNormState, training=training, momentum=momentum,
      unbiased_running_var=unbiased_running_var, virtual_batch_size=virtual_batch_size,
      feature_axes=feature_axes, epsilon=epsilon, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups)
  with jax.named_scope("jaxnorm.batch_norm"):
    if not training:
      return apply_given(xa, state.mean, state.var, scale, bias, spec.norm), state
    return _train(xa, state, scale, bias, spec, renorm=None)


def batch_renorm(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    r_max: ArrayLike,
    d_max: ArrayLike,
    feature_axes: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
    virtual_batch_size: int | None = None,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch renormalization (Ioffe, 2017): batch norm corrected toward the running statistics.

  .. math::
    y = \Big(\frac{x - \mu_B}{\sigma_B}\,r + d\Big)\gamma + \beta, \quad
    r = \mathrm{clip}\Big(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\Big), \quad
    d = \mathrm{clip}\Big(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\Big)

  with the batch's moments :math:`\mu_B`, :math:`\sigma_B = \sqrt{\sigma^2_B + \epsilon}`
  (computed as in `batch_norm`) and the running ones :math:`\mu = ` `state.mean`,
  :math:`\sigma = \sqrt{\texttt{state.var} + \epsilon}`. `r` and `d` are constants for
  differentiation (stopped gradients). The state is updated exactly as by `batch_norm`; in
  evaluation this is `batch_norm`'s evaluation. With `r_max=1, d_max=0` it is batch norm.
  With `unbiased_running_var=True` the state stores the Bessel-corrected variance (as
  PyTorch's), and :math:`\sigma` is computed from it as stored.

  It runs through the same fused normalizer as `batch_norm`, with the effective parameters
  :math:`r\gamma` and :math:`d\gamma + \beta`: no normalized copy of `x` is kept for the
  backward pass. `r_max` and `d_max` may be traced, so a schedule (the paper ramps `r_max`
  from 1 to 3 and `d_max` from 0 to 5) costs no retrace.

  Args:
    x: floating input.
    state: running statistics of the feature shape (`batch_norm_init`).
    scale: optional γ of the feature shape, or of a shape that broadcasts to `x`.
    bias: optional β of the feature shape, or of a shape that broadcasts to `x`.
    training: True for a training step, False to normalize with the running statistics.
    r_max: bound (>= 1) of the correction of the scale, a scalar (may be traced).
    d_max: bound (>= 0) of the correction of the shift, a scalar (may be traced).
    feature_axes: axes that keep separate statistics (default: the last).
    momentum: decay of the running statistics in [0, 1] (1: frozen), or None for the
      cumulative average.
    epsilon: non-negative constant added to both variances.
    mask: optional boolean array broadcastable to `x`; True marks elements that enter the batch
      statistics.
    axis_name: mapped axis (or axes) over which the batch is split across devices.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    unbiased_running_var: store the Bessel-corrected running variance, as PyTorch does.
    virtual_batch_size: ghost batches as in `batch_norm` (each has its own `r` and `d`).

  Returns:
    `(y, new_state)`, as `batch_norm`.

  Raises:
    TypeError: as `batch_norm`, or complex `x` (batch renormalization takes real input).
    ValueError: as `batch_norm`, or a concrete `r_max < 1` or `d_max < 0`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0], [3.0]])  # batch mean 2, batch std 1
    >>> state = jn.BatchNormState(jnp.array([1.0]), jnp.array([4.0]), jnp.array(10))
    >>> y, new = jn.batch_renorm(x, state, training=True, r_max=3.0, d_max=5.0, epsilon=0.0)
    >>> y  # r = 1/2, d = (2 - 1)/2: y = x̂/2 + 1/2 = (x - 1)/2, the running statistics' output
    Array([[0.],
           [1.]], dtype=float32)
  """
  xa, spec = _checks.batch_norm_spec(
      x, state, scale, bias, state_type=BatchNormState, training=training, momentum=momentum,
      unbiased_running_var=unbiased_running_var, virtual_batch_size=virtual_batch_size,
      feature_axes=feature_axes, epsilon=epsilon, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      real_only="batch_renorm (its clipped corrections r and d are real)")
  _checks.check_bound(r_max, "r_max", 1.0)
  _checks.check_bound(d_max, "d_max", 0.0)
  with jax.named_scope("jaxnorm.batch_renorm"):
    if not training:
      return apply_given(xa, state.mean, state.var, scale, bias, spec.norm), state
    return _train(xa, state, scale, bias, spec, renorm=(state.mean, state.var, r_max, d_max))
