"""The fused normalizer: statistics and output of a normalization under one derivative.

Every normalizer that computes its own statistics (layer, RMS, group, instance and batch
normalization in training) goes through `normalize_with_moments` below: one forward pass over
the one statistics path of `_stats`, a hand-written `custom_jvp` derivative that keeps only the
float32 statistics as residuals, and the XLA:CPU barriers that keep its fusions lean.
`apply` is the one place where `(x - mean) * rsqrt(var + epsilon) * scale + bias` is written;
normalization with given statistics (`jaxnorm.normalize`, batch norm in evaluation) calls it
directly. Arguments arrive validated: the public functions in `_normalize` and `_batch_norm`
check them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import ArrayLike

from ._stats import AxisName, Moments, _compute_dtype, _psum, _reduce, _wide_dtype

# The residuals that the backward pass of `normalize_with_moments` keeps from the forward pass.
_COUNT, _MEAN, _VAR = "jaxnorm_count", "jaxnorm_mean", "jaxnorm_var"
_CHECKPOINT_POLICY = jax.checkpoint_policies.save_only_these_names(_COUNT, _MEAN, _VAR)


def _broadcast_param(p: ArrayLike, feature_axes: tuple[int, ...], ndim: int,
                     shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Reshapes a feature-shaped parameter so that it broadcasts against the input."""
  full = tuple(shape[i] if i in feature_axes else 1 for i in range(ndim))
  return jnp.reshape(jnp.asarray(p).astype(dtype), full)


def _cpu_barrier(x: jax.Array) -> jax.Array:
  """`lax.optimization_barrier(x)` in programs compiled for CPU, `x` itself elsewhere.

  The barrier keeps XLA:CPU from sharing one full-size broadcast between fusions, which it
  would write out at x's size (see its two uses). On GPU the same sharing happens inside one
  fused kernel, and a barrier splits that kernel in two: on an H100 (jax 0.11.2), LayerNorm
  forward at 32768x4096 float32 took 719 µs with the barrier and 382 µs without it (flax's
  LayerNorm: 545 µs; a copy of the array at the card's measured bandwidth: 363 µs).
  """
  return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def _rstd(var: jax.Array, epsilon: Any, dtype: Any) -> jax.Array:
  """`rsqrt(max(var, 0) + epsilon)` in `dtype`; the clip guards user-supplied statistics."""
  var = jnp.maximum(var.astype(dtype), jnp.zeros((), dtype))
  return jax.lax.rsqrt(var + jnp.asarray(epsilon, dtype))


def apply(
    x: jax.Array,
    mean: jax.Array | None,
    var: jax.Array,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    epsilon: Any,
) -> jax.Array:
  """`(x - mean) * rsqrt(var + epsilon) * scale + bias` in float32 or wider, cast to x.dtype.

  `mean=None` skips the centring (RMS normalization). Statistics arguments have `x`'s shape
  with `reduction_axes` removed; `scale` and `bias` have the feature shape.
  """
  dtype = _wide_dtype(x.dtype, var.dtype)
  mul = jnp.expand_dims(_rstd(var, epsilon, dtype), reduction_axes)
  if scale is not None:
    mul = mul * _broadcast_param(scale, feature_axes, x.ndim, x.shape, dtype)
  y = x.astype(dtype)
  if mean is not None:
    y = y - jnp.expand_dims(mean.astype(dtype), reduction_axes)
  y = y * mul
  if bias is not None:
    y = y + _broadcast_param(bias, feature_axes, x.ndim, x.shape, dtype)
  return y.astype(x.dtype)


def normalize_with_moments(
    x: jax.Array,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    epsilon: Any,
    mask: jax.Array | None,
    *,
    reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    axis_name: AxisName | None,
    axis_index_groups: Any,
    centered: bool,
) -> tuple[jax.Array, Moments]:
  r"""Normalizes `x` by its own moments; returns `(y, moments)` (arguments already validated).

  Forward: `moments = _reduce(x, ...)` (count-weighted, masked, two-pass, at least float32,
  two `psum`s across devices) and `y = apply(x, mean, var, scale, bias, ...)`, i.e.
  :math:`y = \hat x\gamma + \beta` with :math:`\hat x = (x - \mu) r`,
  :math:`r = 1/\sqrt{\sigma^2 + \epsilon}` (:math:`\mu = 0` and :math:`\sigma^2 = E[x^2]`
  with `centered=False`).

  Derivative, as a `jax.custom_jvp` whose tangent is linear in `(dx, dγ, dβ, dε)`, so that
  JAX transposes it for reverse mode and `jax.jvp`, `jax.grad`, `jax.hessian` all work:

  .. math::
    d\mu = \frac{1}{n}\sum_i m_i\,dx_i, \qquad
    d\sigma^2 = \frac{2}{n}\sum_i m_i (x_i - \mu)\,dx_i, \qquad
    dr = -\tfrac12 r^3 (d\sigma^2 + d\epsilon),

  .. math::
    dy = \big((dx - d\mu)\,r + (x - \mu)\,dr\big)\gamma + \hat x\,d\gamma + d\beta

  with the sums over the reduction axes and, with `axis_name`, over devices (one `psum` of the
  two sums; reverse mode transposes it into one more). The term :math:`\sum_i m_i (x_i - \mu)`
  that the exact derivative of the variance also contains is zero and dropped. With a mask, a
  non-finite :math:`x - \mu` (NaN or Inf at a masked position, where `y` is non-finite too) is
  taken as 0 in the tangent, so a loss that ignores the masked outputs gets finite gradients
  (plain autodiff would give `0 * NaN = NaN` in every gradient). The tangent
  is computed in the statistics' dtype (at least float32) and cast to `x.dtype`. It is
  evaluated as :math:`dy = ((dx - d\mu) r + \hat x\,dr/r)\gamma + \hat x\,d\gamma + d\beta`
  when every axis is a statistics or a feature axis (layer, RMS normalization), and as
  :math:`dy = (dx - d\mu)(r\gamma) + (x - \mu)(dr\,\gamma + r\,d\gamma) + d\beta` otherwise
  (batch, instance normalization), where the factors in parentheses are small: the same
  derivative, in the order that XLA fuses into the fewest passes over memory. The function
  runs under `jax.checkpoint` with a policy that saves only the statistics (count, mean and
  variance, float32) from the forward pass: the backward pass recomputes :math:`x - \mu` and
  :math:`r` from `x` (which the caller holds anyway) instead of keeping a normalized copy of the
  input, and never repeats a reduction.

  Returns:
    `y` (of `x`'s shape and dtype) and the batch's `Moments` (whose mean and variance are
    differentiable too, for callers that use them).
  """
  dtype = _compute_dtype(x.dtype, None)
  red, feat, shape = reduction_axes, feature_axes, x.shape

  def param(p):
    return _broadcast_param(p, feat, x.ndim, shape, dtype)

  def output(x, mean, var, scale, bias, eps):
    # y's `x - mean` goes through a barrier so that it is not the same expression as the
    # variance pass's `x - mean`: XLA:CPU would compute that once for both and write it out at
    # x's size (an extra pass over memory in batch and group norm; measured, jax 0.10.2).
    mean = _cpu_barrier(mean) if centered else None
    return apply(x, mean, var, scale, bias, red, feat, eps)

  @jax.custom_jvp
  def fused(x, scale, bias, eps, mask):
    m = _reduce(x, red, mask, axis_name, axis_index_groups, dtype, centered)
    return output(x, m.mean, m.var, scale, bias, eps), m

  @fused.defjvp
  def fused_jvp(primals, tangents):
    x, scale, bias, eps, mask = primals
    dx, dscale, dbias, deps, _ = tangents
    m = _reduce(x, red, mask, axis_name, axis_index_groups, dtype, centered)
    count = checkpoint_name(m.count, _COUNT)
    mean = checkpoint_name(m.mean, _MEAN)
    var = checkpoint_name(m.var, _VAR)
    y = output(x, mean, var, scale, bias, eps)
    rstd = _rstd(var, eps, dtype)  # as in apply: XLA computes it once.
    zero = jnp.zeros((), dtype)
    xc = x.astype(dtype)
    if centered:
      xc = xc - jnp.expand_dims(mean, red)
    if mask is not None:  # a NaN/Inf at a masked position must not reach the sums' cotangents
      xc = jnp.where(jnp.isfinite(xc), xc, zero)
    dxf = dx.astype(dtype)
    inv_n = 1 / jnp.maximum(count, 1).astype(dtype)
    r = jnp.expand_dims(rstd, red)
    # Per-example normalizers (every axis a statistics or a feature axis: layer, RMS norm) sum
    # against x̂ = (x - μ) r; the others (batch, instance, spatial group norm) against x - μ, so
    # that r γ and dr γ + r dγ stay small arrays. Either way the reverse pass then reads one
    # full-size primal array besides x and dy (see the docstring).
    per_example = all(i not in red or i in feat for i in range(x.ndim))
    u = xc * r if per_example else xc
    u_dx = u * dxf
    if mask is not None:
      u_dx = jnp.where(mask, u_dx, zero)
    if centered:
      dx_valid = dxf if mask is None else jnp.where(mask, dxf, zero)
      s_dx, s_u = _psum((jnp.sum(dx_valid, red), jnp.sum(u_dx, red)), axis_name,
                        axis_index_groups)
      dmean = s_dx * inv_n
      dxc = dxf - jnp.expand_dims(dmean, red)
    else:
      s_u = _psum(jnp.sum(u_dx, red), axis_name, axis_index_groups)
      dmean = jnp.zeros_like(mean)
      dxc = dxf
    if per_example:
      dvar = 2 * s_u * inv_n * jnp.sqrt(jnp.maximum(var, zero) + eps)
      k = jnp.expand_dims(-(rstd * s_u) * inv_n - 0.5 * (rstd * rstd) * deps, red)  # dr / r
      # Its own broadcast of r: one that XLA:CPU shares with the forward pass's fusions is
      # materialized at x's size (measured), the barrier keeps the two apart.
      r_own = jnp.expand_dims(_cpu_barrier(rstd), red)
      dy = dxc * r_own + u * k
      if scale is not None:
        dy = dy * param(scale) + u * param(dscale)
    else:
      dvar = 2 * s_u * inv_n
      dr = jnp.expand_dims(-0.5 * (rstd * rstd * rstd) * (dvar + deps), red)
      if scale is None:
        a, b = r, dr
      else:
        a, b = r * param(scale), dr * param(scale) + r * param(dscale)
      dy = dxc * a + xc * b
    if bias is not None:
      dy = dy + param(dbias)
    dm = Moments(jnp.zeros_like(count), dmean, dvar)
    return (y, Moments(count, mean, var)), (dy.astype(x.dtype), dm)

  scale = None if scale is None else jnp.asarray(scale)
  bias = None if bias is None else jnp.asarray(bias)
  eps = jnp.asarray(epsilon, dtype)
  # jax.checkpoint's CSE barrier (prevent_cse) keeps XLA:CPU from merging the backward pass's
  # recomputation with the forward pass, which halves LayerNorm's temporary memory there. On GPU
  # it keeps the forward and backward kernels apart; without it XLA fuses more of them (H100,
  # 32768x4096 float32 forward+backward: RMSNorm 10 -> 7 kernels, 1426 -> 1307 µs; LayerNorm
  # 12 -> 8 kernels, 1604 -> 1562 µs).
  on_cpu = jax.checkpoint(fused, policy=_CHECKPOINT_POLICY)
  elsewhere = jax.checkpoint(fused, policy=_CHECKPOINT_POLICY, prevent_cse=False)
  return jax.lax.platform_dependent(x, scale, bias, eps, mask, cpu=on_cpu, default=elsewhere)
