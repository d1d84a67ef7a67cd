"""The fused normalizer: statistics and output of a normalization under one derivative.

Every normalizer that computes its own statistics (layer, RMS, group, instance and batch
normalization in training) goes through `normalize_with_moments`: one forward pass over the
statistics path of `_stats` and `_apply.apply`, and a hand-written `custom_jvp` tangent that
keeps only the float32 statistics as residuals. The tangent is linear, so JAX transposes it
for reverse mode, and `jax.jvp`, `jax.grad` and `jax.hessian` all work. Its derivation, and
why it is evaluated in two orders, is in docs/guides/internals.md ("The derivative").
Arguments arrive validated.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import ArrayLike

from ._apply import apply, rstd
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
              differentiated: bool = False) -> Moments:
    """The moments of `_stats.two_pass`, or, where the policy says so, moments that read x once
    where the two-pass variance reads it twice (docs/guides/internals.md, "One read on GPUs").

    Layer normalization (and group normalization of rows, a layer norm of each group's view)
    takes the policy's `row_moments` under differentiation only: its forward pass alone keeps
    the two-pass variance, which XLA fuses with the output into one kernel. Batch, instance
    and group normalization of images take its `column_moments`; reductions over the batch
    axis shift each block of it by its own leading elements, so that a batch split across
    devices finds its shifts where its data is. Masks, `axis_name`, complex input and input
    split across devices along a reduced axis keep the two-pass variance everywhere.
    """
    policy = self.policy
    if (not self.centered or mask is not None or self.axis_name is not None or x.size == 0
        or jnp.iscomplexobj(x) or _sharded(x, self.axes)):
      algorithm = "two_pass"
    elif self.per_example:
      n = math.prod(x.shape[a] for a in self.axes)
      algorithm = policy.rows_take(n, x.dtype) if differentiated else "two_pass"
    else:
      algorithm = policy.column_moments
    if algorithm == "shifted":
      # The batch axis (0) is the one split across devices: blocks of it keep shifts local.
      blocked = not self.per_example and 0 in self.axes
      return shifted_moments(x, self.axes, self.dtype, blocked=blocked, groups=self.groups,
                             sample_apart=policy.sample_apart)
    return two_pass(x, self.axes, mask, self.axis_name, self.axis_index_groups, self.dtype,
                    self.centered, self.groups, policy=policy)

  def total(self, a: jax.Array) -> jax.Array:
    return group_sum(a, self.axes, self.groups)

  def expand(self, s: jax.Array) -> jax.Array:
    return group_expand(s, self.axes, self.groups, self.shape[-1])

  def param(self, p: Any) -> jax.Array | None:
    return None if p is None else broadcast_param(p, self.features, self.shape, self.dtype)

  def psum(self, tree: Any) -> Any:
    return psum(tree, self.axis_name, self.axis_index_groups)

  @property
  def per_example(self) -> bool:
    """Every axis is a statistics or a feature axis (layer, RMS normalization)."""
    return all(i not in self.axes or i in self.features for i in range(len(self.shape)))


def _renorm_affine(r: Reduction, mean: jax.Array, var: jax.Array, eps: jax.Array,
                   ref: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
  """Batch renormalization's corrections `(r, d)`, broadcast against x and held constant."""
  ref_mean, ref_var, r_max, d_max = (jax.lax.stop_gradient(a) for a in ref)
  ref_rstd = rstd(ref_var, eps, r.dtype)
  sigma_b = jnp.sqrt(jnp.maximum(var, jnp.zeros((), r.dtype)) + eps)
  corr = jnp.clip(sigma_b * ref_rstd, 1 / r_max, r_max)
  shift = jnp.clip((mean - ref_mean.astype(r.dtype)) * ref_rstd, -d_max, d_max)
  return tuple(r.expand(jax.lax.stop_gradient(a)) for a in (corr, shift))  # type: ignore


def _affine(r: Reduction, mean: jax.Array, var: jax.Array, eps: jax.Array, scale: Any,
            bias: Any, dscale: Any = None, dbias: Any = None, ref: Any = None) -> tuple:
  """The effective (γ, β) and their tangents (None: absent, or a zero tangent).

  Batch renormalization (`ref`) replaces them by `corr γ`, `shift γ + β`: see `batch_renorm`.
  """
  s, b, ds, db = r.param(scale), r.param(bias), r.param(dscale), r.param(dbias)
  if ref is None:
    return s, b, ds, db
  corr, shift = _renorm_affine(r, mean, var, eps, ref)
  s_eff = corr if s is None else corr * s
  b_eff = shift if s is None else shift * s
  if b is not None:
    b_eff = b_eff + b
  ds_eff = None if ds is None else corr * ds
  db_eff = None if ds is None else shift * ds
  if db is not None:
    db_eff = db if db_eff is None else db_eff + db
  return s_eff, b_eff, ds_eff, db_eff


def _output(r: Reduction, x: jax.Array, mean: jax.Array | None, var: jax.Array, scale: Any,
            bias: Any, eps: jax.Array) -> jax.Array:
  """`apply` of the batch's statistics, with the XLA:CPU barriers of the output pass.

  y's `x - mean` and narrow x's conversion go through barriers so that XLA:CPU does not share
  them with the variance pass (and write them out at x's size); x joins the mean's barrier so
  that it differs from the second pass's barrier of x alone, which XLA would merge with it.
  """
  if not r.centered:
    mean = None
    x = x if x.dtype == r.dtype else barrier(r.policy, x)
  elif x.dtype == r.dtype:
    mean = barrier(r.policy, mean)
  else:
    x, mean = barrier(r.policy, (x, mean))
  return apply(x, mean, var, scale, bias, r.axes, r.features, eps, r.groups)


def _forward(r: Reduction, x, scale, bias, eps, mask, ref):
  m = r.moments(x, mask)
  s, b, _, _ = _affine(r, m.mean, m.var, eps, scale, bias, ref=ref)
  return _output(r, x, m.mean, m.var, s, b, eps), m


def _centre(r: Reduction, xv: jax.Array, mean: jax.Array, mask: Any) -> jax.Array:
  """`x - μ` in the statistics' dtype; with a mask, non-finite values (at masked positions)
  become 0 so that they cannot reach the sums' cotangents."""
  xv = xv.astype(r.dtype)
  if r.centered:
    xv = xv - r.expand(mean)
  if mask is not None:
    xv = jnp.where(jnp.isfinite(xv), xv, jnp.zeros((), r.dtype))
  return xv


def _tangent_sums(r: Reduction, xc: jax.Array, u: jax.Array, rstd_: jax.Array, dx: jax.Array,
                  mask: Any):
  """`(Σ m dx, Σ m u dx)` over the reduction and across devices (one `psum`); the first is
  None without centring.

  For layer and RMS norm, where u = (x - μ) r, programs compiled for other platforms than CPU
  sum against x - μ and multiply the sums by r: reverse mode's sum of the cotangent then does not
  wait for the statistics, and XLA:GPU computes it in the statistics' own kernel (RMS norm
  forward+backward on an H100, 7.03 -> 6.02 passes over x, as flax's; docs/guides/internals.md).
  XLA:CPU keeps the sum against u, which it fuses better.
  """
  zero = jnp.zeros((), r.dtype)

  def total_dx(v, dx):
    v_dx = v * dx
    if mask is not None:
      v_dx = jnp.where(mask, v_dx, zero)
    return r.total(v_dx)

  if r.per_example:
    s_u = (total_dx(u, dx) if r.policy.tangent_sums == "normalized"
           else rstd_ * total_dx(xc, dx))
  else:
    s_u = total_dx(u, dx)
  if not r.centered:
    return None, r.psum(s_u)
  dx_valid = dx if mask is None else jnp.where(mask, dx, zero)
  return r.psum((r.total(dx_valid), s_u))


def _tangent_per_example(r, u, xc, dxc, rstd_, var, eps, deps, s_u, inv_n, s, ds):
  """dy for layer and RMS normalization, against x̂ = u: ((dx - dμ) r + x̂ dr/r) γ, and dσ²;
  the parameters' own terms, x̂ dγ + dβ, are `_plus_param_tangents`'."""
  zero = jnp.zeros((), r.dtype)
  dvar = 2 * s_u * inv_n * jnp.sqrt(jnp.maximum(var, zero) + eps)
  k = -(rstd_ * s_u) * inv_n - 0.5 * (rstd_ * rstd_) * deps  # dr / r, per row
  # Its own broadcast of r (a barrier on XLA:CPU): one shared with the forward pass's fusions
  # would be written out at x's size.
  r_own = r.expand(barrier(r.policy, rstd_))
  # x̂ dr/r, off CPU as (x - μ)(r dr/r), a per-row factor (see `_tangent_sums`).
  u_k = (u * r.expand(k) if r.policy.tangent_sums == "normalized"
         else xc * r.expand(rstd_ * k))
  dy = dxc * r_own + u_k
  if s is not None:
    dy = dy * s
  return dy, dvar


# Rows per block of the parameters' gradient sums of layer and RMS normalization on a GPU: at
# most this many, and at least _MIN_BLOCK_ROWS (else one sum, as elsewhere).
_BLOCK_ROWS, _MIN_BLOCK_ROWS = 256, 32


def _row_blocks(r: Reduction, p: jax.Array) -> tuple[int, int] | None:
  """`(blocks, rows per block)` for the rows (the leading axes, none of them a feature axis)
  over which parameter `p` is broadcast; None if `p` varies along them or no split exists."""
  k = min(r.features, default=0)
  if (not r.features or list(r.features) != list(range(k, len(r.shape)))
      or any(d != 1 for d in p.shape[:k])):
    return None
  n = math.prod(r.shape[:k])
  rows = max(d for d in range(1, min(n, _BLOCK_ROWS) + 1) if n % d == 0)
  return None if rows < _MIN_BLOCK_ROWS or rows == n else (n // rows, rows)


def _plus_param_tangents(r: Reduction, dy: jax.Array, u: jax.Array, ds: Any, db: Any):
  """`dy + x̂ dγ + dβ` for layer and RMS normalization (None: no such term).

  Where the policy says so (GPUs), dγ and dβ are broadcast over the rows in two steps, over
  blocks of rows (then a barrier) and over each block's rows, so that reverse mode sums their
  gradients per block, then sums the blocks' partial sums. As one sum down all the rows,
  XLA:GPU writes the float32 product `dy x̂` out and reads it back for some shapes (4096x512,
  the lm1b model's layer norm: forward+backward 9.03 passes over x, 7.04 in blocks); without
  the barrier it merges the two sums back into one.
  """
  def add(expand: Any) -> jax.Array:
    out = dy
    if ds is not None:
      out = out + u * expand(ds)
    return out if db is None else out + expand(db)

  params = [p for p in (ds, db) if p is not None]
  split = (_row_blocks(r, params[0]) if params and r.policy.blocked_param_grads else None)
  if split is None or any(p.shape != params[0].shape for p in params):
    return add(lambda p: p)
  blocks, rows = split

  def blocked(p: jax.Array) -> jax.Array:
    fs = p.shape[min(r.features):]
    part = jax.lax.optimization_barrier(jnp.broadcast_to(p.reshape(fs), (blocks, *fs)))
    return jnp.broadcast_to(part[:, None], (blocks, rows, *fs)).reshape(r.shape)
  return add(blocked)


def _tangent_per_feature(r, x, dxf, mean, xc, rstd_, eps, deps, s_u, inv_n, dmean, s, ds,
                         mask):
  """dy for batch, instance and spatial group normalization, against x - μ:
  dx a - dμ a + (x - μ) c with the small factors a = r γ and c = dr γ + r dγ, and dσ²."""
  dvar = 2 * s_u * inv_n
  rr = r.expand(rstd_)
  dr = r.expand(-0.5 * (rstd_ * rstd_ * rstd_) * (dvar + deps))
  if s is None:
    a, c = rr, dr
  else:
    a, c = rr * s, (dr * s if ds is None else dr * s + rr * ds)
  # (dx - dμ) a as dx a - (dμ a), whose second term is small: reverse mode sums the cotangent
  # itself for dμ (the same sum as dβ's) instead of writing g a out. The x - μ that multiplies
  # c is computed from narrow input on its own (a barrier with rstd, unlike any other), so that
  # XLA:CPU does not share it with the other sum's and write it out in float32.
  if x.dtype == r.dtype:
    xc_c = xc
  else:
    x_own, mean_own, _ = barrier(r.policy, (x, mean, rstd_))
    xc_c = _centre(r, x_own, mean_own, mask)
  dy = dxf * a + xc_c * c
  if r.centered:
    dy = dy - r.expand(dmean) * a
  return dy, dvar


def _jvp(r: Reduction, primals, tangents):
  """The tangent of `_forward` (docs/guides/internals.md, "The derivative")."""
  x, scale, bias, eps, mask, ref = primals
  dx, dscale, dbias, deps, _, _ = tangents
  m = r.moments(x, mask, differentiated=True)
  count = checkpoint_name(m.count, _COUNT)
  mean = checkpoint_name(m.mean, _MEAN)
  var = checkpoint_name(m.var, _VAR)
  s, b, ds, db = _affine(r, mean, var, eps, scale, bias, dscale, dbias, ref)
  y = _output(r, x, mean, var, s, b, eps)
  rstd_ = rstd(var, eps, r.dtype)  # as in apply: XLA computes it once.
  xc = _centre(r, x, mean, mask)
  dxf = dx.astype(r.dtype)
  inv_n = 1 / jnp.maximum(count, 1).astype(r.dtype)
  # Layer and RMS norm sum against x̂ = (x - μ) r, the others against x - μ, so that r γ and
  # dr γ + r dγ stay small arrays: the reverse pass then reads one full-size primal array
  # besides x and dy either way.
  u = xc * r.expand(rstd_) if r.per_example else xc
  s_dx, s_u = _tangent_sums(r, xc, u, rstd_, dxf, mask)
  if r.centered:
    dmean = s_dx * inv_n
    dxc = dxf - r.expand(dmean)
  else:
    dmean, dxc = jnp.zeros_like(mean), dxf
  if r.per_example:
    dy, dvar = _tangent_per_example(r, u, xc, dxc, rstd_, var, eps, deps, s_u, inv_n, s, ds)
    dy = _plus_param_tangents(r, dy, u, ds if s is not None else None, db)
  else:
    dy, dvar = _tangent_per_feature(r, x, dxf, mean, xc, rstd_, eps, deps, s_u, inv_n, dmean,
                                    s, ds, mask)
    if db is not None:
      dy = dy + db
  dm = Moments(jnp.zeros_like(count), dmean, dvar)
  return (y, Moments(count, mean, var)), (dy.astype(x.dtype), dm)


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
  r"""Normalizes `x` by its own moments; returns `(y, moments)` (arguments validated).

  :math:`y = (x - \mu) r \gamma + \beta` with the moments of `_stats.two_pass` (count-weighted,
  masked, two-pass, at least float32, two `psum`s across devices), :math:`\mu = 0` and
  :math:`\sigma^2 = E[x^2]` with `centered=False`. The derivative is `_jvp`'s; the whole runs
  under `jax.checkpoint` saving only the statistics, so the backward pass recomputes `x - μ`
  from `x` and never repeats a reduction. With a mask, a non-finite `x - μ` at a masked
  position is taken as 0 in the tangent, so a loss that ignores the masked outputs gets finite
  gradients. Complex input takes JAX's own (Wirtinger) derivative of the same forward pass.

  `renorm = (ref_mean, ref_var, r_max, d_max)`: batch renormalization's corrections toward
  the reference statistics, held constant (`_renorm_affine`). `groups`: group normalization of
  channels-last input (`_layout.group_sum`).

  Returns:
    `y` (of `x`'s shape and dtype) and the batch's `Moments` (whose mean and variance are
    differentiable too, for callers that use them).
  """
  dtype = compute_dtype(x.dtype)
  # The Reduction's fields but its policy, which each platform's branch adds.
  static = (reduction_axes, feature_axes, x.shape, hashable(axis_name),
            hashable(axis_index_groups), centered, groups, dtype)
  scale = None if scale is None else jnp.asarray(scale)
  bias = None if bias is None else jnp.asarray(bias)
  with groups_unsupported(axis_index_groups):
    if jnp.iscomplexobj(x):
      eps = jnp.asarray(epsilon, real_of(dtype))
      return by_platform(_complex_normalizer, static, x, scale, bias, eps, mask)
    eps = jnp.asarray(epsilon, dtype)
    ref = None if renorm is None else tuple(jnp.asarray(a, dtype) for a in renorm)
    return by_platform(_normalizer, static, x, scale, bias, eps, mask, ref)


def _normalizer(policy: Policy, static: tuple[Any, ...]) -> Any:
  """The fused normalizer of `r` under `policy`: `_forward` with the derivative `_jvp`,
  under `jax.checkpoint` saving only the statistics.

  The checkpoint's CSE barrier (`prevent_cse`) keeps XLA:CPU from merging the backward pass's
  recomputation with the forward pass; elsewhere it would keep kernels apart that XLA fuses
  (docs/guides/internals.md, "Checkpoints").
  """
  r = Reduction._make((*static, policy))
  fused = jax.custom_jvp(functools.partial(_forward, r))
  fused.defjvp(functools.partial(_jvp, r))
  return jax.checkpoint(fused, policy=_CHECKPOINT_POLICY, prevent_cse=policy.prevent_cse)


def _complex_normalizer(policy: Policy, static: tuple[Any, ...]) -> Any:
  """Complex input: the two-pass moments and `apply`, differentiated by JAX itself."""
  r = Reduction._make((*static, policy))

  def run(x, scale, bias, eps, mask):
    m = r.moments(x, mask)
    return (apply(x, m.mean if r.centered else None, m.var, scale, bias, r.axes, r.features,
                  eps, r.groups), m)
  return run
