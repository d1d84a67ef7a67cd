"""The arithmetic of the row kernels, and their operands' layout, written once for every kernel.

The kernels (`_triton`) apply these functions to the blocks they load; on whole arrays they are
the kernels' reference and their forward-mode derivative (see `normalize_rows` in
`jaxnorm._pallas`). Rows are float32, statistics float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def forward_math(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                  valid: jax.Array | None, n: int, eps: float, centered: bool):
  """`(y, mean, rstd)` of float32 rows `x` (invalid entries 0), in float32; mean None if RMS.

  Two passes: `mean = Σx / n`, `var = Σ(x - mean)² / n` (`Σx² / n` without centring),
  `rstd = rsqrt(var + eps)`, `y = (x - mean) rstd γ + β`.
  """
  mean = None
  xc = x
  if centered:
    mean = jnp.sum(x, axis=1) / n
    xc = x - mean[:, None]
    if valid is not None:
      xc = jnp.where(valid, xc, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / n + eps)
  y = xc * rstd[:, None]
  if scale is not None:
    y = y * scale[None, :]
  if bias is not None:
    y = y + bias[None, :]
  return y, mean, rstd


def backward_math(x: jax.Array, dy: jax.Array, mean: jax.Array | None, rstd: jax.Array,
                   scale: jax.Array | None, valid: jax.Array | None, n: int, centered: bool):
  r"""`(dx, Σ_rows dy x̂, Σ_rows dy)` in float32 from float32 rows (invalid entries 0).

  .. math::
    \hat x = (x - \mu) r, \quad g = dy\,\gamma, \quad
    dx = r\,\big(g - \hat x\,\overline{g\hat x} - \bar g\big)

  (the :math:`\bar g` term only with centring; bars are means over the row).
  """
  xc = x if mean is None else x - mean[:, None]
  xhat = xc * rstd[:, None]
  if valid is not None:
    xhat = jnp.where(valid, xhat, 0.0)
  g = dy if scale is None else dy * scale[None, :]
  t = g - xhat * (jnp.sum(xhat * g, axis=1) / n)[:, None]
  if centered:
    t = t - (jnp.sum(g, axis=1) / n)[:, None]
  return t * rstd[:, None], jnp.sum(dy * xhat, axis=0), jnp.sum(dy, axis=0)


def forward_refs(refs, has_scale: bool, has_bias: bool):
  """`(x, scale, bias, y, stats)` of a forward kernel's refs, laid out `x, [scale], [bias],
  y, [mean], rstd` by every kernel's `forward_call` (absent ones None; `stats` a list)."""
  refs = list(refs)
  x = refs.pop(0)
  scale = refs.pop(0) if has_scale else None
  bias = refs.pop(0) if has_bias else None
  y, *stats = refs
  return x, scale, bias, y, stats


def backward_refs(refs, centered: bool, has_scale: bool, has_bias: bool):
  """`(x, dy, mean, rstd, scale, dx, dscale, dbias)` of a backward kernel's refs, laid out
  `x, dy, [mean], rstd, [scale], dx, [dscale], [dbias]` by every kernel's `backward_call`
  (absent ones None)."""
  refs = list(refs)
  x, dy = refs.pop(0), refs.pop(0)
  mean = refs.pop(0) if centered else None
  rstd = refs.pop(0)
  scale = refs.pop(0) if has_scale else None
  dx = refs.pop(0)
  dscale = refs.pop(0) if has_scale else None
  dbias = refs.pop(0) if has_bias else None
  return x, dy, mean, rstd, scale, dx, dscale, dbias
