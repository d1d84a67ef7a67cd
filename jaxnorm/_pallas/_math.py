"""The arithmetic of the row kernels, and their operands' layout, written once for every kernel.

The Triton kernels (`_triton`) and the Mosaic kernels (`_mosaic`) apply these functions to the
blocks they load; on whole arrays they are the kernels' reference and their forward-mode
derivative (see `normalize_rows` in `jaxnorm._pallas`). Rows are float32, statistics float32.

What differs between the kernels is the layout of per-row and per-feature values. Triton and
whole arrays take vectors: statistics `(B,)`, parameters and sums over rows `(F,)`. Mosaic keeps
every value two-dimensional (`keepdims=True`), because its vector layouts tile the last two
dimensions and a `(B,)` vector would have to move between lanes and sublanes: statistics are
`(B, 1)` columns, parameters and sums over rows `(1, F)` rows. Each function writes its
formulas once and takes the layout as that argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_mean(a: jax.Array, n: int, keepdims: bool) -> jax.Array:
  """`Σ a / n` over each row: `(B, 1)` if `keepdims`, else `(B,)`."""
  return jnp.sum(a, axis=1, keepdims=keepdims) / n


def _per_row(s: jax.Array, keepdims: bool) -> jax.Array:
  """A statistic of each row, shaped to broadcast over the row's entries."""
  return s if keepdims else s[:, None]


def _per_feature(p: jax.Array, keepdims: bool) -> jax.Array:
  """A parameter of each feature, shaped to broadcast over the rows."""
  return p if keepdims else p[None, :]


def forward_math(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                 valid: jax.Array | None, n: int, eps: float, centered: bool, *,
                 keepdims: bool = False):
  """`(y, mean, rstd)` of float32 rows `x` `(B, F)`, in float32; mean None if RMS.

  Two passes: `mean = Σx / n`, `var = Σ(x - mean)² / n` (`Σx² / n` without centring),
  `rstd = rsqrt(var + eps)`, `y = (x - mean) rstd γ + β`. Entries outside `valid` (None: all
  valid) must hold 0 in `x`; they add nothing to the sums. `keepdims` as in the module doc.
  """
  mean = None
  xc = x
  if centered:
    mean = _row_mean(x, n, keepdims)
    xc = x - _per_row(mean, keepdims)
    if valid is not None:
      xc = jnp.where(valid, xc, 0.0)
  rstd = jax.lax.rsqrt(_row_mean(xc * xc, n, keepdims) + eps)
  y = xc * _per_row(rstd, keepdims)
  if scale is not None:
    y = y * _per_feature(scale, keepdims)
  if bias is not None:
    y = y + _per_feature(bias, keepdims)
  return y, mean, rstd


def add_math(x: jax.Array, residual: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """`(h, h32)`: the residual add's sum `x + residual` rounded to `dtype` (what the kernel
  stores, as `_stats.residual_sum` rounds it) and that rounded sum in float32 (what the
  statistics and the output are computed from, as the norm of the stored `h`). Adding in
  float32 and rounding once is the correctly rounded sum for every dtype the kernels take."""
  h = (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dtype)
  return h, h.astype(jnp.float32)


def backward_math(x: jax.Array, dy: jax.Array, mean: jax.Array | None, rstd: jax.Array,
                  scale: jax.Array | None, valid: jax.Array | None, n: int, centered: bool, *,
                  keepdims: bool = False, mask_dy: bool = False):
  r"""`(dx, Σ_rows dy x̂, Σ_rows dy)` in float32 from float32 rows.

  Entries outside `valid` (None: all valid) add nothing to the sums; their `dx` is for the
  caller to drop. `x` may hold anything there; `dy` must hold 0 unless `mask_dy`. The Triton
  kernels' masked loads give 0 there; the Mosaic kernels read whole blocks past the array's
  end, whose rows hold whatever the buffer held, and ask for `mask_dy`. `keepdims` as in the
  module doc.

  .. math::
    \hat x = (x - \mu) r, \quad g = dy\,\gamma, \quad
    dx = r\,\big(g - \hat x\,\overline{g\hat x} - \bar g\big)

  (the :math:`\bar g` term only with centring; bars are means over the row).
  """
  xc = x if mean is None else x - _per_row(mean, keepdims)
  xhat = xc * _per_row(rstd, keepdims)
  if valid is not None:
    xhat = jnp.where(valid, xhat, 0.0)
    if mask_dy:
      dy = jnp.where(valid, dy, 0.0)
  g = dy if scale is None else dy * _per_feature(scale, keepdims)
  t = g - xhat * _per_row(_row_mean(xhat * g, n, keepdims), keepdims)
  if centered:
    t = t - _per_row(_row_mean(g, n, keepdims), keepdims)
  return (t * _per_row(rstd, keepdims), jnp.sum(dy * xhat, axis=0, keepdims=keepdims),
          jnp.sum(dy, axis=0, keepdims=keepdims))


def forward_refs(refs, has_scale: bool, has_bias: bool):
  """`(x, scale, bias, y, stats)` of a forward kernel's refs, laid out `x, [scale], [bias],
  y, [mean], rstd` by every kernel's `forward_call` (absent ones None; `stats` a list)."""
  refs = list(refs)
  x = refs.pop(0)
  scale = refs.pop(0) if has_scale else None
  bias = refs.pop(0) if has_bias else None
  y, *stats = refs
  return x, scale, bias, y, stats


def add_forward_refs(refs, has_scale: bool, has_bias: bool):
  """`(x, residual, scale, bias, y, h, stats)` of a residual forward kernel's refs, laid out
  `x, residual, [scale], [bias], y, h, [mean], rstd` by every kernel's `add_forward_call`."""
  refs = list(refs)
  x, residual = refs.pop(0), refs.pop(0)
  scale = refs.pop(0) if has_scale else None
  bias = refs.pop(0) if has_bias else None
  y, h, *stats = refs
  return x, residual, scale, bias, y, h, stats


def backward_refs(refs, centered: bool, has_scale: bool, has_bias: bool, has_dh: bool = False):
  """`(x, dy, dh, mean, rstd, scale, dxs, dscale, dbias)` of a backward kernel's refs, laid out
  `x, dy, [dh], [mean], rstd, [scale], dx, [dr], [dscale], [dbias]` by every kernel's
  `backward_call` (absent ones None; `dxs` the list of `dx` and, with `dh`, `dr`: the residual
  add's, whose `dh` is added to `dx` and whose two inputs' cotangents are both that sum)."""
  refs = list(refs)
  x, dy = refs.pop(0), refs.pop(0)
  dh = refs.pop(0) if has_dh else None
  mean = refs.pop(0) if centered else None
  rstd = refs.pop(0)
  scale = refs.pop(0) if has_scale else None
  dxs = [refs.pop(0) for _ in range(1 + has_dh)]
  dscale = refs.pop(0) if has_scale else None
  dbias = refs.pop(0) if has_bias else None
  return x, dy, dh, mean, rstd, scale, dxs, dscale, dbias
