"""The fused normalizer: statistics and output of a normalization under one derivative.

Every normalizer that computes its own statistics (layer, RMS, group, instance and batch
normalization in training) goes through `fused_norm`: one forward pass over the
statistics path of `_stats` and `_apply.apply`, and a hand-written `custom_jvp` tangent that
keeps only the float32 statistics as residuals. The tangent is linear, so JAX transposes it
for reverse mode, and `jax.jvp`, `jax.grad` and `jax.hessian` all work. Its derivation, and
why it is evaluated in two orders, is in docs/guides/internals.md ("The derivative").
Arguments arrive validated.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import ArrayLike

from ._apply import apply, reciprocal_std
from ._dtypes import compute_dtype, real_of
from ._layout import broadcast_param, group_expand, group_sum
from ._platform import Policy, barrier, by_platform, hashable
from ._stats import (
  AxisName,
  Moments,
  groups_unsupported,
  psum,
  shifted_moments,
  two_pass,
)

if TYPE_CHECKING:
  from ._checks import Spec

# The residuals that the backward pass keeps from the forward pass: the statistics only.
_COUNT, _MEAN, _VAR = "jaxnorm_count", "jaxnorm_mean", "jaxnorm_var"
_CHECKPOINT_POLICY = jax.checkpoint_policies.save_only_these_names(_COUNT, _MEAN, _VAR)


def _sharded(x: jax.Array, axes: tuple[int, ...]) -> bool:
  """Whether `x` is known at trace time to be split across devices along one of `axes` (a mesh
  axis of type Explicit): the leading sample of `_stats.shifted_moments` would then have to be
  sent from the device that holds it to the others, where the two-pass variance's plain sums
  become local sums and all-reduces."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


class Reduction(NamedTuple):
  """What a fused normalization reduces and how (static: fixed at trace time)."""

  axes: tuple[int, ...]  # the statistics' (reduction) axes
  features: tuple[int, ...]  # the axes scale and bias run along
  shape: tuple[int, ...]  # the input's shape
  axis_name: AxisName | None
  axis_index_groups: Any
  centered: bool  # False: RMS normalization (mean 0, variance E[x²])
  groups: int | None  # group normalization of channels-last input (see _layout.group_sum)
  dtype: Any  # the statistics' dtype, at least float32
  policy: Policy  # the platform's choices (`_platform`): each branch has its own

  def moments(self, x: jax.Array, mask: jax.Array | None, *,
              differentiated: bool = False, parts: tuple[jax.Array, ...] = ()) -> Moments:
    """The moments of `_stats.two_pass`, or, where the policy says so, moments that read x once
    where the two-pass variance reads it twice (docs/guides/internals.md, "One read on GPUs").

    Layer normalization (and group normalization of rows, a layer norm of each group's view)
    takes the policy's `row_moments` under differentiation only: its forward pass alone keeps
    the two-pass variance, which XLA fuses with the output into one kernel. Batch, instance
    and group normalization of images take its `column_moments`; reductions over the batch
    axis shift each block of it by its own leading elements, so that a batch split across
    devices finds its shifts where its data is. Masks, `axis_name`, complex input and input
    split across devices along a reduced axis keep the two-pass variance everywhere.
    `parts`: x is their sum (the fused residual add), for the one-read shift's sample; its
    forward pass takes the moments of differentiation where the policy says so
    (`residual_rows_forward`).
    """
    policy = self.policy
    if (not self.centered or mask is not None or self.axis_name is not None or x.size == 0
        or jnp.iscomplexobj(x) or _sharded(x, self.axes)):
      algorithm = "two_pass"
    elif self.per_example:
      n = math.prod(x.shape[a] for a in self.axes)
      rows = differentiated or (bool(parts) and policy.residual_rows_forward)
      algorithm = policy.rows_take(n, x.dtype) if rows else "two_pass"
    else:
      algorithm = policy.column_moments
    if algorithm == "shifted":
      # The batch axis (0) is the one split across devices: blocks of it keep shifts local.
      blocked = not self.per_example and 0 in self.axes
      return shifted_moments(x, self.axes, self.dtype, blocked=blocked, groups=self.groups,
                             sample_apart=policy.sample_apart(x.size * x.dtype.itemsize),
                             parts=parts)
    return two_pass(x, mask, reduction_axes=self.axes, dtype=self.dtype, policy=policy,
                    centered=self.centered, groups=self.groups, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups)

  def total(self, a: jax.Array) -> jax.Array:
    return group_sum(a, self.axes, self.groups)

  def expand(self, s: jax.Array) -> jax.Array:
    return group_expand(s, self.axes, self.groups, self.shape)

  def param(self, p: Any) -> jax.Array | None:
    return None if p is None else broadcast_param(p, self.features, self.shape, self.dtype)

  def psum(self, tree: Any) -> Any:
    return psum(tree, self.axis_name, self.axis_index_groups)

  @property
  def per_example(self) -> bool:
    """Every axis is a statistics or a feature axis (layer, RMS normalization)."""
    return all(i not in self.axes or i in self.features for i in range(len(self.shape)))


class _Affine(NamedTuple):
  """The affine parameters (γ, β) broadcast against x, and their tangents (None: absent, or a
  zero tangent)."""

  scale: Any
  bias: Any
  dscale: Any = None
  dbias: Any = None


def _renorm_affine(reduction: Reduction, m: Moments, eps: jax.Array,
                   ref: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
  """Batch renormalization's corrections `(r, d)`, broadcast against x and held constant."""
  ref_mean, ref_var, r_max, d_max = (jax.lax.stop_gradient(a) for a in ref)
  ref_rstd = reciprocal_std(ref_var, eps, reduction.dtype)
  sigma_b = jnp.sqrt(jnp.maximum(m.var, jnp.zeros((), reduction.dtype)) + eps)
  renorm_r = jnp.clip(sigma_b * ref_rstd, 1 / r_max, r_max)
  renorm_d = jnp.clip((m.mean - ref_mean.astype(reduction.dtype)) * ref_rstd, -d_max, d_max)
  return tuple(reduction.expand(jax.lax.stop_gradient(a))  # type: ignore
               for a in (renorm_r, renorm_d))


def _affine(reduction: Reduction, m: Moments, eps: jax.Array, given: _Affine,
            ref: Any) -> _Affine:
  """The effective (γ, β) and their tangents, broadcast against x.

  Batch renormalization (`ref`) replaces them by `r γ`, `d γ + β`: see `batch_renorm`.
  """
  s, b, ds, db = (reduction.param(p) for p in given)
  if ref is None:
    return _Affine(s, b, ds, db)
  renorm_r, renorm_d = _renorm_affine(reduction, m, eps, ref)
  s_eff = renorm_r if s is None else renorm_r * s
  b_eff = renorm_d if s is None else renorm_d * s
  if b is not None:
    b_eff = b_eff + b
  ds_eff = None if ds is None else renorm_r * ds
  db_eff = None if ds is None else renorm_d * ds
  if db is not None:
    db_eff = db if db_eff is None else db_eff + db
  return _Affine(s_eff, b_eff, ds_eff, db_eff)


def _output(reduction: Reduction, x: jax.Array, m: Moments, affine: _Affine,
            eps: jax.Array) -> jax.Array:
  """`apply` of the batch's statistics, with the XLA:CPU barriers of the output pass.

  y's `x - mean` and narrow x's conversion go through barriers so that XLA:CPU does not share
  them with the variance pass (and write them out at x's size); x joins the mean's barrier so
  that it differs from the second pass's barrier of x alone, which XLA would merge with it.
  """
  mean: jax.Array | None = m.mean
  policy = reduction.policy
  if not reduction.centered:
    mean = None
    x = x if x.dtype == reduction.dtype else barrier(policy, x)
  elif x.dtype == reduction.dtype:
    mean = barrier(policy, mean)
  else:
    x, mean = barrier(policy, (x, mean))
  return apply(x, mean, m.var, affine.scale, affine.bias, reduction_axes=reduction.axes,
               feature_axes=reduction.features, epsilon=eps, groups=reduction.groups)


def _forward(reduction: Reduction, x, scale, bias, eps, mask, ref, parts):
  m = reduction.moments(x, mask, parts=parts)
  affine = _affine(reduction, m, eps, _Affine(scale, bias), ref)
  return _output(reduction, x, m, affine, eps), m


def _centre(reduction: Reduction, xv: jax.Array, mean: jax.Array, mask: Any) -> jax.Array:
  """`x - μ` in the statistics' dtype; with a mask, non-finite values (at masked positions)
  become 0 so that they cannot reach the sums' cotangents."""
  xv = xv.astype(reduction.dtype)
  if reduction.centered:
    xv = xv - reduction.expand(mean)
  if mask is not None:
    xv = jnp.where(jnp.isfinite(xv), xv, jnp.zeros((), reduction.dtype))
  return xv


class _Point(NamedTuple):
  """The forward pass's values that the tangent's terms share (the statistics' dtype)."""

  x: jax.Array  # the input, as given
  mask: Any
  mean: jax.Array
  var: jax.Array
  eps: jax.Array
  rstd: jax.Array  # the reciprocal standard deviation rsqrt(var + eps)
  xc: jax.Array  # x - μ (`_centre`)
  inv_n: jax.Array  # 1 / count


class _Tangents(NamedTuple):
  """The tangents that the terms of dy share."""

  dx: jax.Array  # in the statistics' dtype
  deps: jax.Array  # epsilon's
  s_u: jax.Array  # Σ m u dx (`_tangent_sums`)
  dmean: jax.Array  # dμ (zeros without centring)


def _tangent_sums(reduction: Reduction, at: _Point, u: jax.Array, dx: jax.Array):
  """`(Σ m dx, Σ m u dx)` over the reduction and across devices (one `psum`); the first is
  None without centring.

  For layer and RMS norm, where u = (x - μ) rstd, programs compiled for other platforms than
  CPU sum against x - μ and multiply the sums by rstd: reverse mode's sum of the cotangent then
  does not wait for the statistics, and XLA:GPU computes it in the statistics' own kernel
  (docs/guides/internals.md). XLA:CPU keeps the sum against u, which it fuses better.
  """
  zero = jnp.zeros((), reduction.dtype)
  mask = at.mask

  def total_dx(v, dx):
    v_dx = v * dx
    if mask is not None:
      v_dx = jnp.where(mask, v_dx, zero)
    return reduction.total(v_dx)

  if reduction.per_example:
    s_u = (total_dx(u, dx) if reduction.policy.tangent_sums == "normalized"
           else at.rstd * total_dx(at.xc, dx))
  else:
    s_u = total_dx(u, dx)
  if not reduction.centered:
    return None, reduction.psum(s_u)
  dx_valid = dx if mask is None else jnp.where(mask, dx, zero)
  return reduction.psum((reduction.total(dx_valid), s_u))


def _tangent_per_example(reduction: Reduction, at: _Point, u: jax.Array, dxc: jax.Array,
                         d: _Tangents, affine: _Affine) -> tuple[jax.Array, jax.Array]:
  """dy for layer and RMS normalization, against x̂ = u:
  ((dx - dμ) rstd + x̂ drstd/rstd) γ, and dσ²; the parameters' own terms, x̂ dγ + dβ, are
  `_plus_param_tangents`'."""
  zero = jnp.zeros((), reduction.dtype)
  rstd, s_u = at.rstd, d.s_u
  dvar = 2 * s_u * at.inv_n * jnp.sqrt(jnp.maximum(at.var, zero) + at.eps)
  drstd_ratio = -(rstd * s_u) * at.inv_n - 0.5 * (rstd * rstd) * d.deps  # per row
  # Its own broadcast of rstd (a barrier on XLA:CPU): one shared with the forward pass's
  # fusions would be written out at x's size.
  rstd_own = reduction.expand(barrier(reduction.policy, rstd))
  # x̂ drstd/rstd, off CPU as (x - μ)(drstd), a per-row factor (see `_tangent_sums`).
  u_drstd = (u * reduction.expand(drstd_ratio)
             if reduction.policy.tangent_sums == "normalized"
             else at.xc * reduction.expand(rstd * drstd_ratio))
  dy = dxc * rstd_own + u_drstd
  if affine.scale is not None:
    dy = dy * affine.scale
  return dy, dvar


# Rows per block of the parameters' gradient sums of layer and RMS normalization on a GPU: at
# most this many, and at least _MIN_BLOCK_ROWS (else one sum, as elsewhere).
_BLOCK_ROWS, _MIN_BLOCK_ROWS = 256, 32


def _row_blocks(reduction: Reduction, p: jax.Array) -> tuple[int, int] | None:
  """`(blocks, rows per block)` for the rows (the leading axes, none of them a feature axis)
  over which parameter `p` is broadcast; None if `p` varies along them or no split exists."""
  k = min(reduction.features, default=0)
  if (not reduction.features or list(reduction.features) != list(range(k, len(reduction.shape)))
      or any(d != 1 for d in p.shape[:k])):
    return None
  n = math.prod(reduction.shape[:k])
  rows = max(d for d in range(1, min(n, _BLOCK_ROWS) + 1) if n % d == 0)
  return None if rows < _MIN_BLOCK_ROWS or rows == n else (n // rows, rows)


def _plus_param_tangents(reduction: Reduction, dy: jax.Array, u: jax.Array, ds: Any, db: Any):
  """`dy + x̂ dγ + dβ` for layer and RMS normalization (None: no such term).

  Where the policy says so (GPUs), dγ and dβ are broadcast over the rows in two steps, over
  blocks of rows (then a barrier) and over each block's rows, so that reverse mode sums their
  gradients per block, then sums the blocks' partial sums. As one sum down all the rows,
  XLA:GPU writes the float32 product `dy x̂` out and reads it back for some shapes
  (docs/guides/internals.md); without the barrier it merges the two sums back into one.
  """
  def add(expand: Any) -> jax.Array:
    out = dy
    if ds is not None:
      out = out + u * expand(ds)
    return out if db is None else out + expand(db)

  params = [p for p in (ds, db) if p is not None]
  split = (_row_blocks(reduction, params[0])
           if params and reduction.policy.blocked_param_grads else None)
  if split is None or any(p.shape != params[0].shape for p in params):
    return add(lambda p: p)
  blocks, rows = split

  def blocked(p: jax.Array) -> jax.Array:
    fs = p.shape[min(reduction.features):]
    part = jax.lax.optimization_barrier(jnp.broadcast_to(p.reshape(fs), (blocks, *fs)))
    return jnp.broadcast_to(part[:, None], (blocks, rows, *fs)).reshape(reduction.shape)
  return add(blocked)


def _tangent_per_feature(reduction: Reduction, at: _Point, d: _Tangents,
                         affine: _Affine) -> tuple[jax.Array, jax.Array]:
  """dy for batch, instance and spatial group normalization, against x - μ:
  dx a - dμ a + (x - μ) c with the small factors a = rstd γ and c = drstd γ + rstd dγ, and
  dσ²."""
  rstd, s, ds = at.rstd, affine.scale, affine.dscale
  dvar = 2 * d.s_u * at.inv_n
  rstd_x = reduction.expand(rstd)
  drstd_x = reduction.expand(-0.5 * (rstd * rstd * rstd) * (dvar + d.deps))
  if s is None:
    a, c = rstd_x, drstd_x
  else:
    a, c = rstd_x * s, (drstd_x * s if ds is None else drstd_x * s + rstd_x * ds)
  # (dx - dμ) a as dx a - (dμ a), whose second term is small: reverse mode sums the cotangent
  # itself for dμ (the same sum as dβ's) instead of writing g a out. The x - μ that multiplies
  # c is computed from narrow input on its own (a barrier with rstd, unlike any other), so that
  # XLA:CPU does not share it with the other sum's and write it out in float32.
  if at.x.dtype == reduction.dtype:
    xc_c = at.xc
  else:
    x_own, mean_own, _ = barrier(reduction.policy, (at.x, at.mean, rstd))
    xc_c = _centre(reduction, x_own, mean_own, at.mask)
  dy = d.dx * a + xc_c * c
  if reduction.centered:
    dy = dy - reduction.expand(d.dmean) * a
  return dy, dvar


def _jvp(reduction: Reduction, primals, tangents):
  """The tangent of `_forward` (docs/guides/internals.md, "The derivative")."""
  x, scale, bias, eps, mask, ref, parts = primals  # parts only sample the shift: held constant
  dx, dscale, dbias, deps, _, _, _ = tangents
  m = reduction.moments(x, mask, differentiated=True, parts=parts)
  count = checkpoint_name(m.count, _COUNT)
  mean = checkpoint_name(m.mean, _MEAN)
  var = checkpoint_name(m.var, _VAR)
  saved = Moments(count, mean, var)
  affine = _affine(reduction, saved, eps, _Affine(scale, bias, dscale, dbias), ref)
  y = _output(reduction, x, saved, affine, eps)
  rstd = reciprocal_std(var, eps, reduction.dtype)  # as in apply: XLA computes it once.
  xc = _centre(reduction, x, mean, mask)
  dxf = dx.astype(reduction.dtype)
  inv_n = 1 / jnp.maximum(count, 1).astype(reduction.dtype)
  at = _Point(x, mask, mean, var, eps, rstd, xc, inv_n)
  # Layer and RMS norm sum against x̂ = (x - μ) rstd, the others against x - μ, so that rstd γ
  # and drstd γ + rstd dγ stay small arrays: the reverse pass then reads one full-size primal
  # array besides x and dy either way.
  u = xc * reduction.expand(rstd) if reduction.per_example else xc
  s_dx, s_u = _tangent_sums(reduction, at, u, dxf)
  if reduction.centered:
    dmean = s_dx * inv_n
    dxc = dxf - reduction.expand(dmean)
  else:
    dmean, dxc = jnp.zeros_like(mean), dxf
  d = _Tangents(dxf, deps, s_u, dmean)
  if reduction.per_example:
    dy, dvar = _tangent_per_example(reduction, at, u, dxc, d, affine)
    ds = affine.dscale if affine.scale is not None else None
    dy = _plus_param_tangents(reduction, dy, u, ds, affine.dbias)
  else:
    dy, dvar = _tangent_per_feature(reduction, at, d, affine)
    if affine.dbias is not None:
      dy = dy + affine.dbias
  dm = Moments(jnp.zeros_like(count), dmean, dvar)
  return (y, saved), (dy.astype(x.dtype), dm)


def fused_norm(x: jax.Array, scale: ArrayLike | None, bias: ArrayLike | None, spec: Spec,
               renorm: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
               parts: tuple[jax.Array, ...] = ()) -> tuple[jax.Array, Moments]:
  r"""Normalizes `x` by its own moments; returns `(y, moments)` (arguments validated).

  :math:`y = (x - \mu)\,\mathrm{rstd}\,\gamma + \beta` with the moments of `_stats.two_pass`
  (count-weighted, masked, at least float32, two `psum`s across devices), :math:`\mu = 0` and
  :math:`\sigma^2 = E[x^2]` for RMS normalization (`spec.centered=False`). The derivative is
  `_jvp`'s; the whole runs under `jax.checkpoint` saving only the statistics, so the backward
  pass recomputes `x - μ` from `x` and never repeats a reduction. With a mask, a non-finite
  `x - μ` at a masked position is taken as 0 in the tangent, so a loss that ignores the masked
  outputs gets finite gradients. Complex input takes JAX's own (Wirtinger) derivative of the
  same forward pass.

  `renorm = (ref_mean, ref_var, r_max, d_max)`: batch renormalization's corrections toward
  the reference statistics, held constant (`_renorm_affine`). `parts`: `x` is
  `_stats.residual_sum(*parts)` (the fused residual add), whose one-read moments then sample
  their shift from the parts, so that XLA can compute x in the statistics' kernel.

  Returns:
    `y` (of `x`'s shape and dtype) and the batch's `Moments` (whose mean and variance are
    differentiable too, for callers that use them).
  """
  dtype = compute_dtype(x.dtype)
  # The Reduction's fields but its policy, which each platform's branch adds.
  static = (spec.reduction_axes, spec.feature_axes, x.shape, hashable(spec.axis_name),
            hashable(spec.axis_index_groups), spec.centered, spec.groups, dtype)
  scale = None if scale is None else jnp.asarray(scale)
  bias = None if bias is None else jnp.asarray(bias)
  with groups_unsupported(spec.axis_index_groups):
    if jnp.iscomplexobj(x):
      eps = jnp.asarray(spec.epsilon, real_of(dtype))
      return by_platform(_complex_branch, static, x, scale, bias, eps, spec.mask)
    eps = jnp.asarray(spec.epsilon, dtype)
    ref = None if renorm is None else tuple(jnp.asarray(a, dtype) for a in renorm)
    return by_platform(_fused_branch, static, x, scale, bias, eps, spec.mask, ref, parts)


def _fused_branch(policy: Policy, static: tuple[Any, ...]) -> Any:
  """`fused_norm`'s branch of `by_platform`: the fused normalizer under `policy`, `_forward`
  with the derivative `_jvp` under `jax.checkpoint` saving only the statistics.

  The checkpoint's CSE barrier (`prevent_cse`) keeps XLA:CPU from merging the backward pass's
  recomputation with the forward pass; elsewhere it would keep kernels apart that XLA fuses
  (docs/guides/internals.md, "Checkpoints").
  """
  reduction = Reduction._make((*static, policy))
  fused = jax.custom_jvp(functools.partial(_forward, reduction))
  fused.defjvp(functools.partial(_jvp, reduction))
  return jax.checkpoint(fused, policy=_CHECKPOINT_POLICY, prevent_cse=policy.prevent_cse)


def _complex_branch(policy: Policy, static: tuple[Any, ...]) -> Any:
  """`fused_norm`'s branch for complex input: the two-pass moments and `apply`, differentiated
  by JAX itself.

  With a mask, a non-finite x (at a masked position) is normalized apart, with the statistics
  and parameters held constant, and the rest with it replaced by 0 (a double `where`): JAX's
  derivative of `(x - μ) rstd γ` with respect to rstd and γ sums the cotangent against
  `x - μ`, and a zero cotangent times NaN is NaN, so every gradient would be NaN. The output is
  the same as without the split, bit for bit.
  """
  reduction = Reduction._make((*static, policy))

  def norm(x, mean, var, scale, bias, eps):
    return apply(x, mean, var, scale, bias, reduction_axes=reduction.axes,
                 feature_axes=reduction.features, epsilon=eps, groups=reduction.groups)

  def run(x, scale, bias, eps, mask):
    m = reduction.moments(x, mask)
    mean = m.mean if reduction.centered else None
    if mask is None:
      return norm(x, mean, m.var, scale, bias, eps), m
    finite = jnp.isfinite(x)
    y = norm(jnp.where(finite, x, jnp.zeros((), x.dtype)), mean, m.var, scale, bias, eps)
    held = jax.lax.stop_gradient((mean, m.var, scale, bias, eps))
    return jnp.where(finite, y, norm(x, *held)), m
  return run
