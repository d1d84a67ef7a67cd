"""The fused normalizer: statistics and output of a normalization under one derivative.

Every normalizer that computes its own statistics (layer, RMS, group, instance and batch
normalization in training) goes through `normalize_with_moments` below: one forward pass over
the one statistics path of `_stats`, a hand-written `custom_jvp` derivative that keeps only the
float32 statistics as residuals, and the XLA:CPU barriers that keep its fusions lean.
`apply` is the one place where `(x - mean) * rsqrt(var + epsilon) * scale + bias` is written;
normalization with given statistics (`jaxnorm.normalize`, batch norm in evaluation) calls it
directly. `dispatch` is the one place that picks the kernel of layer and RMS normalization
(`implementation=`): this XLA path or the fused Pallas kernels of `_pallas`. Arguments arrive
validated: the public functions in `_normalize` and `_batch_norm` check them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import ArrayLike

from . import _pallas
from ._stats import (
    AxisName,
    Moments,
    _complex_of,
    _compute_dtype,
    _cpu_barrier,
    _group_expand,
    _group_sum,
    _psum,
    _reduce,
    _wide_dtype,
)

# The residuals that the backward pass of `normalize_with_moments` keeps from the forward pass.
_COUNT, _MEAN, _VAR = "jaxnorm_count", "jaxnorm_mean", "jaxnorm_var"
_CHECKPOINT_POLICY = jax.checkpoint_policies.save_only_these_names(_COUNT, _MEAN, _VAR)


def _broadcast_param(p: ArrayLike, feature_axes: tuple[int, ...], ndim: int,
                     shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Reshapes a parameter so that it broadcasts against the input.

  A parameter of exactly the feature shape runs along `feature_axes`; any other shape (a
  per-example scale or bias such as `(batch, 1, features)`, already validated) broadcasts
  against the input as in NumPy, so it only gains leading axes of size 1.
  """
  p = jnp.asarray(p).astype(dtype)
  if p.shape == tuple(shape[i] for i in feature_axes):
    full = tuple(shape[i] if i in feature_axes else 1 for i in range(ndim))
  else:
    full = (1,) * (ndim - p.ndim) + p.shape
  return jnp.reshape(p, full)


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
    groups: int | None = None,
) -> jax.Array:
  """`(x - mean) * rsqrt(var + epsilon) * scale + bias` in float32 or wider, cast to x.dtype.

  `mean=None` skips the centring (RMS normalization). Statistics arguments have `x`'s shape
  with `reduction_axes` removed (and, with `groups`, `groups` entries on a last axis, one per
  group of the input's last-axis channels: see `_stats._group_sum`); `scale` and `bias` have
  the feature shape or a shape that broadcasts to `x` (see `_broadcast_param`).
  """
  if jnp.iscomplexobj(x):
    return _apply_complex(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon,
                          groups)
  dtype = _wide_dtype(x.dtype, var.dtype)

  def expand(s: jax.Array) -> jax.Array:
    return _group_expand(s, reduction_axes, groups, x.shape[-1])

  mul = expand(_rstd(var, epsilon, dtype))
  if scale is not None:
    mul = mul * _broadcast_param(scale, feature_axes, x.ndim, x.shape, dtype)
  y = x.astype(dtype)
  if mean is not None:
    y = y - expand(mean.astype(dtype))
  y = y * mul
  if bias is not None:
    y = y + _broadcast_param(bias, feature_axes, x.ndim, x.shape, dtype)
  return y.astype(x.dtype)


def apply_given(x: jax.Array, mean: jax.Array | None, var: jax.Array, scale: ArrayLike | None,
                bias: ArrayLike | None, reduction_axes: tuple[int, ...],
                feature_axes: tuple[int, ...], epsilon: Any) -> jax.Array:
  """`apply` with given statistics (batch norm in evaluation, `jaxnorm.normalize`).

  JAX differentiates it. In programs compiled for CPU, input narrower than the arithmetic
  (bfloat16 x, float32 statistics) runs under `jax.checkpoint` with nothing saved, so that
  reverse mode recomputes `x - mean` from `x` where it sums against the cotangent: the value
  shared with the forward pass would be written out as a float32 copy of `x` (XLA:CPU, batch
  norm evaluation forward+backward at 8192x1024 bfloat16: 64 MiB of temporary memory instead of
  32). Elsewhere XLA fuses the recomputation itself, and the program is plain `apply`.
  """
  if jnp.iscomplexobj(x) or x.dtype == _wide_dtype(x.dtype, var.dtype):
    return apply(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon)

  def run(x, mean, var, scale, bias, epsilon):
    return apply(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon)

  on_cpu = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
  return jax.lax.platform_dependent(x, mean, var, scale, bias, epsilon, cpu=on_cpu,
                                    default=run)


def _apply_complex(x: jax.Array, mean: jax.Array | None, var: jax.Array, scale: Any,
                   bias: Any, reduction_axes: tuple[int, ...], feature_axes: tuple[int, ...],
                   epsilon: Any, groups: int | None = None) -> jax.Array:
  """`apply` for complex `x`: complex mean, real variance, in complex64 or wider."""
  cdtype = _complex_of(_wide_dtype(jnp.finfo(x.dtype).dtype, var.dtype))

  def expand(s: jax.Array) -> jax.Array:
    return _group_expand(s, reduction_axes, groups, x.shape[-1])

  r = expand(_rstd(var, epsilon, jnp.finfo(cdtype).dtype))
  y = x.astype(cdtype)
  if mean is not None:
    y = y - expand(mean.astype(cdtype))
  y = y * r.astype(cdtype)
  if scale is not None:
    y = y * _broadcast_param(scale, feature_axes, x.ndim, x.shape, cdtype)
  if bias is not None:
    y = y + _broadcast_param(bias, feature_axes, x.ndim, x.shape, cdtype)
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
    renorm: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    groups: int | None = None,
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

  With `groups` (group normalization of channels-last input), the statistics are those of
  `groups` groups of consecutive last-axis channels, reduced per channel first (see
  `_stats._group_sum`): every sum above runs the same way and every statistic is broadcast back
  over its group's channels.

  `scale` and `bias` have the feature shape or any shape that broadcasts to `x` (per-example
  conditioning); their tangents enter through the same broadcast, so reverse mode sums their
  cotangents back to the shape given.

  With `renorm = (ref_mean, ref_var, r_max, d_max)` (batch renormalization, Ioffe 2017), the
  affine parameters are replaced inside the derivative by
  :math:`\gamma' = r\gamma` and :math:`\beta' = d\gamma + \beta` with
  :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})`,
  :math:`d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max})`, computed from the
  batch's moments and the reference (running) statistics :math:`\mu, \sigma^2 + \epsilon`
  and held constant (stopped gradients): :math:`y = \hat x r\gamma + d\gamma + \beta`,
  the same derivative with :math:`d\gamma' = r\,d\gamma`, :math:`d\beta' = d\,d\gamma +
  d\beta`. `r` and `d` are recomputed from the saved statistics in the backward pass.

  Returns:
    `y` (of `x`'s shape and dtype) and the batch's `Moments` (whose mean and variance are
    differentiable too, for callers that use them).
  """
  dtype = _compute_dtype(x.dtype, None)
  red, feat, shape = reduction_axes, feature_axes, x.shape
  if jnp.iscomplexobj(x):  # JAX's own (Wirtinger) derivative of the two passes and `apply`
    m = _reduce(x, red, mask, axis_name, axis_index_groups, dtype, centered, groups)
    return (apply(x, m.mean if centered else None, m.var, scale, bias, red, feat, epsilon,
                  groups), m)

  def param(p):
    return None if p is None else _broadcast_param(p, feat, x.ndim, shape, dtype)

  def total(a: jax.Array) -> jax.Array:
    return _group_sum(a, red, groups)

  def expand(s: jax.Array) -> jax.Array:
    return _group_expand(s, red, groups, shape[-1])

  def affine(mean, var, eps, scale, bias, dscale=None, dbias=None, ref=None):
    """The effective (γ, β) and their tangents (None: absent, or a zero tangent)."""
    s, b, ds, db = param(scale), param(bias), param(dscale), param(dbias)
    if ref is None:
      return s, b, ds, db
    ref_mean, ref_var, r_max, d_max = (jax.lax.stop_gradient(a) for a in ref)
    ref_rstd = _rstd(ref_var, eps, dtype)
    sigma_b = jnp.sqrt(jnp.maximum(var, jnp.zeros((), dtype)) + eps)
    r = jnp.clip(sigma_b * ref_rstd, 1 / r_max, r_max)
    d = jnp.clip((mean - ref_mean.astype(dtype)) * ref_rstd, -d_max, d_max)
    r, d = (expand(jax.lax.stop_gradient(a)) for a in (r, d))
    s_eff = r if s is None else r * s
    b_eff = d if s is None else d * s
    if b is not None:
      b_eff = b_eff + b
    ds_eff = None if ds is None else r * ds
    db_eff = None if ds is None else d * ds
    if db is not None:
      db_eff = db if db_eff is None else db_eff + db
    return s_eff, b_eff, ds_eff, db_eff

  def output(x, mean, var, scale, bias, eps):
    # y's `x - mean` goes through a barrier so that it is not the same expression as the
    # variance pass's `x - mean`: XLA:CPU would compute that once for both and write it out at
    # x's size (an extra pass over memory in batch and group norm; measured, jax 0.10.2).
    # Likewise the float32 conversion of narrower input: one shared with the statistics'
    # reductions is written out as a float32 copy of x, where each fusion can convert as it
    # reads (bfloat16 batch norm at 8192x1024: 32 MiB less temporary memory). x joins the
    # mean's barrier, so that it is not the second pass's barrier of x alone, which XLA would
    # merge with this one (see `_stats._reduce`).
    if not centered:
      mean = None
      x = x if x.dtype == dtype else _cpu_barrier(x)
    elif x.dtype == dtype:
      mean = _cpu_barrier(mean)
    else:
      x, mean = _cpu_barrier((x, mean))
    return apply(x, mean, var, scale, bias, red, feat, eps, groups)

  @jax.custom_jvp
  def fused(x, scale, bias, eps, mask, ref):
    m = _reduce(x, red, mask, axis_name, axis_index_groups, dtype, centered, groups)
    s, b, _, _ = affine(m.mean, m.var, eps, scale, bias, ref=ref)
    return output(x, m.mean, m.var, s, b, eps), m

  @fused.defjvp
  def fused_jvp(primals, tangents):
    x, scale, bias, eps, mask, ref = primals
    dx, dscale, dbias, deps, _, _ = tangents
    m = _reduce(x, red, mask, axis_name, axis_index_groups, dtype, centered, groups)
    count = checkpoint_name(m.count, _COUNT)
    mean = checkpoint_name(m.mean, _MEAN)
    var = checkpoint_name(m.var, _VAR)
    s, b, ds, db = affine(mean, var, eps, scale, bias, dscale, dbias, ref)
    y = output(x, mean, var, s, b, eps)
    rstd = _rstd(var, eps, dtype)  # as in apply: XLA computes it once.
    zero = jnp.zeros((), dtype)

    def centre(xv, mean=mean):
      xv = xv.astype(dtype)
      if centered:
        xv = xv - expand(mean)
      if mask is not None:  # a NaN/Inf at a masked position must not reach the sums' cotangents
        xv = jnp.where(jnp.isfinite(xv), xv, zero)
      return xv

    xc = centre(x)
    dxf = dx.astype(dtype)
    inv_n = 1 / jnp.maximum(count, 1).astype(dtype)
    r = expand(rstd)
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
      s_dx, s_u = _psum((total(dx_valid), total(u_dx)), axis_name,
                        axis_index_groups)
      dmean = s_dx * inv_n
      dxc = dxf - expand(dmean)
    else:
      s_u = _psum(total(u_dx), axis_name, axis_index_groups)
      dmean = jnp.zeros_like(mean)
      dxc = dxf
    if per_example:
      dvar = 2 * s_u * inv_n * jnp.sqrt(jnp.maximum(var, zero) + eps)
      k = expand(-(rstd * s_u) * inv_n - 0.5 * (rstd * rstd) * deps)  # dr / r
      # Its own broadcast of r: one that XLA:CPU shares with the forward pass's fusions is
      # materialized at x's size (measured), the barrier keeps the two apart.
      r_own = expand(_cpu_barrier(rstd))
      dy = dxc * r_own + u * k
      if s is not None:
        dy = dy * s
        if ds is not None:
          dy = dy + u * ds
    else:
      dvar = 2 * s_u * inv_n
      dr = expand(-0.5 * (rstd * rstd * rstd) * (dvar + deps))
      if s is None:
        a, c = r, dr
      else:
        a, c = r * s, (dr * s if ds is None else dr * s + r * ds)
      # (dx - dμ) a as dx a - (dμ a), whose second term is a small array: reverse mode then
      # sums the cotangent g itself for dμ (the same sum as dβ's) instead of writing g a out
      # at x's size to sum it.
      # The x - μ that multiplies c is computed from narrower input on its own (a barrier
      # with rstd, unlike any other): reverse mode sums g (x - μ) for dγ and dσ², and with the
      # x - μ of the other sum shared, XLA:CPU writes it out in float32 at x's size.
      xc_c = xc if x.dtype == dtype else centre(*_cpu_barrier((x, mean, rstd))[:2])
      dy = dxf * a + xc_c * c
      if centered:
        dy = dy - expand(dmean) * a
    if db is not None:
      dy = dy + db
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
  ref = None if renorm is None else tuple(jnp.asarray(a, dtype) for a in renorm)
  return jax.lax.platform_dependent(x, scale, bias, eps, mask, ref, cpu=on_cpu,
                                    default=elsewhere)


IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation: Any) -> None:
  """Raises a ValueError unless `implementation` is one of `IMPLEMENTATIONS`."""
  if not (implementation is None or (isinstance(implementation, str)
                                     and implementation in IMPLEMENTATIONS)):
    raise ValueError(
        f"implementation={implementation!r} is not one of None (choose), 'xla' (the XLA path) "
        f"and 'pallas' (the fused Pallas kernels)."
    )


def _pallas_obstacle(x: jax.Array, scale: Any, bias: Any, epsilon: Any, mask: Any,
                     reduction_axes: tuple[int, ...], feature_axes: tuple[int, ...],
                     axis_name: Any) -> str | None:
  """Why the Pallas kernels do not apply to a call, or None in the plain case."""
  last = (x.ndim - 1,)
  if x.ndim == 0:
    return "a scalar input"
  if reduction_axes != last:
    return f"reduction_axes={reduction_axes} (the kernels reduce over the last axis only)"
  if feature_axes != last:
    return f"feature_axes={feature_axes} (the kernels take parameters along the last axis)"
  if mask is not None:
    return "a mask"
  if axis_name is not None:
    return f"axis_name={axis_name!r} (a reduction across devices)"
  for name, a in (("scale", scale), ("bias", bias)):
    if a is not None and jnp.shape(a) != x.shape[-1:]:
      return (f"{name} of shape {jnp.shape(a)} (the kernels take parameters of the feature "
              f"shape {x.shape[-1:]}, not per-example ones)")
  for name, a in (("x", x), ("scale", scale), ("bias", bias)):
    if a is not None and jnp.dtype(jnp.result_type(a)).name not in _pallas.DTYPES:
      return (f"{name} of dtype {jnp.dtype(jnp.result_type(a)).name} (the kernels take "
              f"{', '.join(_pallas.DTYPES)})")
  if isinstance(epsilon, jax.core.Tracer):
    return "a traced epsilon (the kernels take a Python float)"
  if jax.default_backend() not in ("cpu", "gpu"):
    return f"the {jax.default_backend()} backend (the kernels are Triton kernels for GPUs)"
  return None


def dispatch(
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
    implementation: str | None,
    groups: int | None = None,
) -> jax.Array:
  """Layer (`centered`) or RMS normalization by the kernel that `implementation` picks.

  `"xla"`: `normalize_with_moments`. `"pallas"`: the fused kernels of `_pallas` in the plain
  case (reduction and parameters over the last axis, no mask, no `axis_name`, float32,
  bfloat16 or float16, a Python-float epsilon), a ValueError outside it; inputs with more than
  `_pallas.MAX_FEATURES` features, or no element, take the XLA path. `None`: the XLA path (the
  kernels are not yet measured on a GPU, so nothing chooses them by itself). `groups` (group
  normalization, always on the XLA path) goes to `normalize_with_moments`.

  Raises:
    ValueError: an unknown `implementation`, or `"pallas"` outside the plain case.
  """
  check_implementation(implementation)

  def xla(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes, mask=mask):
    return normalize_with_moments(x, scale, bias, epsilon, mask, reduction_axes=reduction_axes,
                                  feature_axes=feature_axes, axis_name=axis_name,
                                  axis_index_groups=axis_index_groups, centered=centered,
                                  groups=groups)[0]

  if implementation != "pallas":
    return xla(x, scale, bias)
  obstacle = _pallas_obstacle(x, scale, bias, epsilon, mask, reduction_axes, feature_axes,
                              axis_name)
  if obstacle is not None:
    raise ValueError(
        f"implementation='pallas' takes only the plain case (reduction and parameters over the "
        f"last axis, no mask, no axis_name, float32/bfloat16/float16, a Python-float epsilon); "
        f"got {obstacle}. Use implementation=None or 'xla' for this call."
    )
  if x.size == 0 or x.shape[-1] > _pallas.MAX_FEATURES:
    return xla(x, scale, bias)
  scale = None if scale is None else jnp.asarray(scale)
  bias = None if bias is None else jnp.asarray(bias)
  return _pallas.normalize_rows(
      x, scale, bias, float(epsilon), centered=centered,
      xla=lambda x2, s, b: xla(x2, s, b, reduction_axes=(1,), feature_axes=(1,), mask=None))
