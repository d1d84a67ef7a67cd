"""Fused Pallas Triton kernels for layer and RMS normalization of `(rows, features)` rows.

* forward: a grid over blocks of `rows_f` rows, the whole feature axis in one block padded to a
  power of two `f_pad` (masked); each program loads its block once, computes the exact two-pass
  mean and variance in float32 on chip and writes `y`, the float32 mean (layer norm) and the
  float32 reciprocal standard deviation `rstd`. The last row block may be ragged (masked).
* backward: a grid over blocks of `chunk * steps` rows; each program walks its block `chunk`
  rows at a time, reads `x` and `dy` once, writes `dx` and accumulates float32 partial sums of
  `dγ = Σ dy x̂` and `dβ = Σ dy` over its rows in registers; the partials (one row per program,
  at most `_BWD_PROGRAMS` rows) are summed afterwards by XLA.

The arithmetic is `_math`'s. On CPU the same kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._math import (
  add_forward_refs,
  add_math,
  backward_math,
  backward_refs,
  forward_math,
  forward_refs,
)

# Blocking (not yet tuned on a GPU: tune with benchmarks/gpu.py).
_MIN_BLOCK = 16  # smallest padded feature block
_FWD_ELEMS = 8192  # elements of x per forward program (held on chip in float32)
_BWD_ELEMS = 4096  # elements of x (and of dy) per backward step
_BWD_PROGRAMS = 1024  # at most this many backward programs, i.e. rows of partial sums
_BWD_MAX_STEPS = 64  # at most this many steps of `chunk` rows per backward program


def _pow2_at_most(n: int) -> int:
  return 1 << max(n, 1).bit_length() - 1


def blocking(rows: int, features: int) -> dict[str, int]:
  """The kernels' block sizes for `(rows, features)`: powers of two, see the module doc."""
  f_pad = max(_MIN_BLOCK, pl.next_power_of_2(features))
  rows_p2 = pl.next_power_of_2(max(rows, 1))
  rows_f = max(1, min(_FWD_ELEMS // f_pad, rows_p2))
  chunk = max(1, min(_BWD_ELEMS // f_pad, rows_p2))
  steps = pl.next_power_of_2(max(1, pl.cdiv(rows, chunk * _BWD_PROGRAMS)))
  steps = max(1, min(steps, _BWD_MAX_STEPS, _pow2_at_most(pl.cdiv(rows, chunk))))
  return {"f_pad": f_pad, "rows_f": rows_f, "chunk": chunk, "steps": steps,
          "warps_f": max(1, min(16, rows_f * f_pad // 256)),
          "warps_b": max(1, min(16, chunk * f_pad // 256))}


def _masks(row0, nrows: int, f_pad: int, rows: int, features: int, ragged: bool):
  """Row and element masks of a block of `nrows` rows from row `row0`, None where not needed."""
  row_ok = (row0 + jnp.arange(nrows)) < rows if ragged else None
  col_ok = jnp.arange(f_pad) < features if f_pad != features else None
  if row_ok is None:
    if col_ok is None:
      return None, None, None
    valid = jnp.broadcast_to(col_ok[None, :], (nrows, f_pad))
  elif col_ok is None:
    valid = jnp.broadcast_to(row_ok[:, None], (nrows, f_pad))
  else:
    valid = row_ok[:, None] & col_ok[None, :]
  return row_ok, col_ok, valid


def _load(ref, mask):
  f32 = jnp.float32
  if mask is None:
    return plgpu.load(ref).astype(f32)
  return plgpu.load(ref, mask=mask, other=0).astype(f32)


def _store(ref, value, mask):
  plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def _forward_kernel(*all_refs, rows: int, features: int, eps: float, centered: bool,
                    has_scale: bool, has_bias: bool):
  x_ref, g_ref, b_ref, y_ref, stat_refs = forward_refs(all_refs, has_scale, has_bias)
  nrows, f_pad = x_ref.shape
  row0 = pl.program_id(0) * nrows
  row_ok, col_ok, valid = _masks(row0, nrows, f_pad, rows, features, rows % nrows != 0)
  x = _load(x_ref, valid)
  g = None if g_ref is None else _load(g_ref, col_ok)
  b = None if b_ref is None else _load(b_ref, col_ok)
  y, mean, rstd = forward_math(x, g, b, valid, features, eps, centered)
  _store(y_ref, y, valid)
  for ref, s in zip(stat_refs, (mean, rstd) if centered else (rstd,), strict=True):
    _store(ref, s, row_ok)


def _add_forward_kernel(*all_refs, rows: int, features: int, eps: float, centered: bool,
                        has_scale: bool, has_bias: bool):
  """`_forward_kernel` of `x + residual`: reads both rows once, writes the sum `h` too."""
  x_ref, r_ref, g_ref, b_ref, y_ref, h_ref, stat_refs = add_forward_refs(
      all_refs, has_scale, has_bias)
  nrows, f_pad = x_ref.shape
  row0 = pl.program_id(0) * nrows
  row_ok, col_ok, valid = _masks(row0, nrows, f_pad, rows, features, rows % nrows != 0)
  h, h32 = add_math(_load(x_ref, valid), _load(r_ref, valid), h_ref.dtype)
  g = None if g_ref is None else _load(g_ref, col_ok)
  b = None if b_ref is None else _load(b_ref, col_ok)
  y, mean, rstd = forward_math(h32, g, b, valid, features, eps, centered)
  _store(y_ref, y, valid)
  _store(h_ref, h, valid)
  for ref, s in zip(stat_refs, (mean, rstd) if centered else (rstd,), strict=True):
    _store(ref, s, row_ok)


def _backward_kernel(*all_refs, rows: int, features: int, chunk: int, steps: int,
                     centered: bool, has_scale: bool, has_bias: bool, has_dh: bool = False):
  x_ref, dy_ref, dh_ref, mean_ref, rstd_ref, g_ref, dx_refs, dg_ref, db_ref = backward_refs(
      all_refs, centered, has_scale, has_bias, has_dh)
  f_pad = x_ref.shape[1]
  block0 = pl.program_id(0) * (chunk * steps)
  ragged = rows % (chunk * steps) != 0
  col_ok = jnp.arange(f_pad) < features if f_pad != features else None
  g = None if g_ref is None else _load(g_ref, col_ok)

  def step(j, acc):
    start = j * chunk if steps == 1 else pl.multiple_of(j * chunk, chunk)
    rs = pl.ds(start, chunk)
    row_ok, _, valid = _masks(block0 + start, chunk, f_pad, rows, features, ragged)
    x = _load(x_ref.at[rs, :], valid)
    dy = _load(dy_ref.at[rs, :], valid)
    mean = None if mean_ref is None else _load(mean_ref.at[rs], row_ok)
    rstd = _load(rstd_ref.at[rs], row_ok)
    dx, dg, db = backward_math(x, dy, mean, rstd, g, valid, features, centered)
    if dh_ref is not None:  # the residual add's: the sum's own cotangent
      dx = dx + _load(dh_ref.at[rs, :], valid)
    for dx_ref in dx_refs:
      _store(dx_ref.at[rs, :], dx, valid)
    return acc[0] + dg, acc[1] + db

  zeros = jnp.zeros((f_pad,), jnp.float32)
  if steps == 1:
    dg, db = step(0, (zeros, zeros))
  else:
    dg, db = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
  out_mask = None if col_ok is None else col_ok[None, :]
  if dg_ref is not None:
    _store(dg_ref, dg[None, :], out_mask)
  if db_ref is not None:
    _store(db_ref, db[None, :], out_mask)


def _row_specs(x2: jax.Array, centered: bool):
  """A row kernel call's blocking: `blocking`'s dict, the block specs of a row array, of a
  feature vector and of a per-row statistic, and the statistics' outputs (float32, per row)."""
  rows, features = x2.shape
  blk = blocking(rows, features)
  f_pad, nrows = blk["f_pad"], blk["rows_f"]
  specs = (pl.BlockSpec((nrows, f_pad), lambda i: (i, 0)), pl.BlockSpec((f_pad,), lambda i: (0,)),
           pl.BlockSpec((nrows,), lambda i: (i,)))
  stats = [jax.ShapeDtypeStruct((rows,), jnp.float32)] * (2 if centered else 1)
  return blk, specs, stats


def forward_call(x2: jax.Array, params: Sequence[jax.Array], *, eps: float, centered: bool,
                  has_scale: bool, has_bias: bool, interpret: bool):
  rows, features = x2.shape
  blk, (row_spec, vec_spec, stat_spec), stats = _row_specs(x2, centered)
  kernel = functools.partial(_forward_kernel, rows=rows, features=features, eps=eps,
                             centered=centered, has_scale=has_scale, has_bias=has_bias)
  return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(x2.shape, x2.dtype)] + stats,
      grid=(pl.cdiv(rows, blk["rows_f"]),),
      in_specs=[row_spec] + [vec_spec] * len(params),
      out_specs=[row_spec] + [stat_spec] * len(stats),
      compiler_params=plgpu.CompilerParams(num_warps=blk["warps_f"], num_stages=1),
      interpret=interpret,
      name=f"jaxnorm_{'layer' if centered else 'rms'}_norm_fwd",
  )(x2, *params)


def add_forward_call(x2: jax.Array, r2: jax.Array, params: Sequence[jax.Array], *, eps: float,
                     centered: bool, has_scale: bool, has_bias: bool, y_dtype: Any,
                     h_dtype: Any, interpret: bool):
  """`(y, h, [mean,] rstd)` of `h = x2 + r2` (in `h_dtype`) and its normalization `y` (in
  `y_dtype`): `forward_call`'s kernel with the residual add in front, same blocking (the
  block holds float32 values of one array, as there)."""
  rows, features = x2.shape
  blk, (row_spec, vec_spec, stat_spec), stats = _row_specs(x2, centered)
  kernel = functools.partial(_add_forward_kernel, rows=rows, features=features, eps=eps,
                             centered=centered, has_scale=has_scale, has_bias=has_bias)
  return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(x2.shape, y_dtype), jax.ShapeDtypeStruct(x2.shape, h_dtype)]
      + stats,
      grid=(pl.cdiv(rows, blk["rows_f"]),),
      in_specs=[row_spec, row_spec] + [vec_spec] * len(params),
      out_specs=[row_spec, row_spec] + [stat_spec] * len(stats),
      compiler_params=plgpu.CompilerParams(num_warps=blk["warps_f"], num_stages=1),
      interpret=interpret,
      name=f"jaxnorm_add_{'layer' if centered else 'rms'}_norm_fwd",
  )(x2, r2, *params)


def backward_call(x2, dy2, stats, scale, *, has_bias: bool, bias_dtype: Any,
                   centered: bool, interpret: bool, dh2: jax.Array | None = None,
                   out_dtypes: Sequence[Any] = ()):
  """`(dx, dscale, dbias)` (see `_mosaic.backward_call`); with `dh2` (the residual add's, of
  `x2`'s shape) `((dx, dr), dscale, dbias)`: the sum's whole cotangent `dh2 + dx`, added on
  chip, written in each of `out_dtypes` (x's and the residual's)."""
  rows, features = x2.shape
  blk = blocking(rows, features)
  f_pad, chunk, steps = blk["f_pad"], blk["chunk"], blk["steps"]
  block = chunk * steps
  programs = pl.cdiv(rows, block)
  kernel = functools.partial(_backward_kernel, rows=rows, features=features, chunk=chunk,
                             steps=steps, centered=centered, has_scale=scale is not None,
                             has_bias=has_bias, **({} if dh2 is None else {"has_dh": True}))
  row_spec = pl.BlockSpec((block, f_pad), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((block,), lambda i: (i,))
  vec_spec = pl.BlockSpec((f_pad,), lambda i: (0,))
  part_spec = pl.BlockSpec((1, f_pad), lambda i: (i, 0))
  part = jax.ShapeDtypeStruct((programs, features), jnp.float32)
  params = [] if scale is None else [scale]
  nparts = (scale is not None) + has_bias
  dh = [] if dh2 is None else [dh2]
  outs = pl.pallas_call(
      kernel,
      out_shape=([jax.ShapeDtypeStruct(x2.shape, d) for d in (out_dtypes if dh else [x2.dtype])]
                 + [part] * nparts),
      grid=(programs,),
      in_specs=([row_spec, row_spec] + [row_spec] * len(dh) + [stat_spec] * len(stats)
                + [vec_spec] * len(params)),
      out_specs=[row_spec] * (1 + len(dh)) + [part_spec] * nparts,
      compiler_params=plgpu.CompilerParams(num_warps=blk["warps_b"], num_stages=1),
      interpret=interpret,
      name=f"jaxnorm_{'add_' if dh else ''}{'layer' if centered else 'rms'}_norm_bwd",
  )(x2, dy2, *dh, *stats, *params)
  dx, parts = (tuple(outs[:2]) if dh else outs[0]), iter(outs[1 + len(dh):])
  dscale = None if scale is None else jnp.sum(next(parts), axis=0).astype(scale.dtype)
  dbias = jnp.sum(next(parts), axis=0).astype(bias_dtype) if has_bias else None
  return dx, dscale, dbias
