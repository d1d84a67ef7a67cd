"""Normalization with given statistics: `(x - mean) * rsqrt(var + epsilon) * scale + bias`.

`apply` is the one place where this formula is written for the XLA path, for real and complex
input; the fused normalizer (`_fused`) calls it for its forward pass, and normalization with
given statistics (`jaxnorm.normalize`, batch norm in evaluation) through `apply_given`. The
Pallas kernels (`_pallas`) write the same formula on chip. Arguments arrive validated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._dtypes import arithmetic_dtype, real_of
from ._layout import broadcast_param, group_expand
from ._platform import Policy, by_platform

if TYPE_CHECKING:
  from ._checks import Spec


def reciprocal_std(var: jax.Array, epsilon: Any, dtype: Any) -> jax.Array:
  """`rsqrt(max(var, 0) + epsilon)` in `dtype`; the clip guards user-supplied statistics."""
  var = jnp.maximum(var.astype(dtype), jnp.zeros((), dtype))
  return jax.lax.rsqrt(var + jnp.asarray(epsilon, dtype))


def apply(
    x: jax.Array,
    mean: jax.Array | None,
    var: jax.Array,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    epsilon: Any,
    groups: int | None = None,
) -> jax.Array:
  """`(x - mean) * rsqrt(var + epsilon) * scale + bias` in float32 or wider, cast to x.dtype.

  `mean=None` skips the centring (RMS normalization). Statistics have `x`'s shape with
  `reduction_axes` removed (and, with `groups`, `groups` entries on a last axis, one per group
  of the input's last-axis channels: see `_layout.group_sum`); `scale` and `bias` have the
  feature shape or a shape that broadcasts to `x` (see `_layout.broadcast_param`). Complex
  input has a complex mean and a real variance and is normalized in complex64 or wider.
  """
  dtype = arithmetic_dtype(x.dtype, var.dtype)

  def expand(s: jax.Array) -> jax.Array:
    return group_expand(s, reduction_axes, groups, x.shape)

  def param(p: Any) -> jax.Array:
    return broadcast_param(p, feature_axes, x.shape, dtype)

  mul = expand(reciprocal_std(var, epsilon, real_of(dtype))).astype(dtype)
  if scale is not None:
    mul = mul * param(scale)
  y = x.astype(dtype)
  if mean is not None:
    y = y - expand(mean.astype(dtype))
  y = y * mul
  if bias is not None:
    y = y + param(bias)
  return y.astype(x.dtype)


def apply_given(x: jax.Array, mean: jax.Array | None, var: jax.Array, scale: ArrayLike | None,
                bias: ArrayLike | None, spec: Spec) -> jax.Array:
  """`apply` with given statistics (batch norm in evaluation, `jaxnorm.normalize`).

  JAX differentiates it. Where the policy says so (CPU), input narrower than the arithmetic
  (bfloat16 x, float32 statistics) runs under `jax.checkpoint` with nothing saved, so that
  reverse mode recomputes `x - mean` from `x` where it sums against the cotangent instead of
  keeping a float32 copy of `x` (docs/guides/internals.md, "Checkpoints"). Elsewhere XLA fuses
  the recomputation itself, and the program is plain `apply`.
  """
  axes = (spec.reduction_axes, spec.feature_axes)
  return by_platform(_given_branch, axes, x, mean, var, scale, bias, spec.epsilon)


def _given_branch(policy: Policy, axes: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
  """`apply_given`'s branch of `by_platform`."""
  def run(x, mean, var, scale, bias, epsilon):
    return apply(x, mean, var, scale, bias, reduction_axes=axes[0], feature_axes=axes[1],
                 epsilon=epsilon)
  recompute = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)

  def given(x, mean, var, scale, bias, epsilon):
    narrow = (not jnp.iscomplexobj(x)
              and x.dtype != arithmetic_dtype(x.dtype, jnp.result_type(var)))
    f = recompute if narrow and policy.recompute_given else run
    return f(x, mean, var, scale, bias, epsilon)
  return given
