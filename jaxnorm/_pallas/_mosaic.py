"""Fused Pallas Mosaic (TPU) kernels for layer and RMS normalization over the last axis.

The TPU counterpart of the Triton kernels in `_triton`, with the same two entry points
(`forward_call`, `backward_call`: same arguments, same outputs), between which
`jaxnorm._pallas` chooses by platform. Like them it takes the plain case only: `x` flattened to
`(R, F)` rows, statistics and parameters over the last axis.

The arithmetic is `_math.forward_math` and `_math.backward_math`, called with
`keepdims=True` for Mosaic's layouts (statistics as `(rows, 1)` columns, parameters as `(1, F)`
rows, whole rows masked in the backward sums): float32 on chip whatever the input dtype, the
exact two-pass statistics, as in the Triton kernels.

Kernels (Mosaic, the Pallas TPU lowering; in Pallas interpret mode on the CPU):

* forward: a grid over blocks of `block_rows` rows with the whole feature axis in each block
  (the block's last dimension is the full `F`, so any `F` lowers; Mosaic pads the lanes to a
  multiple of 128 in VMEM only). Each step reads its rows of `x` once and writes `y` and the
  float32 statistics of its rows. The last block may be ragged: its rows past `R` are read as
  garbage and their outputs dropped.
* backward: a grid over blocks of rows that reads `x`, `dy` and the statistics once, writes `dx`
  and adds the block's float32 partial sums `Σ dy x̂` (dγ) and `Σ dy` (dβ) to a float32 row
  that stays in VMEM for the whole grid (one write at the end, no partials in HBM); rows past
  `R` in the last block are masked out of those sums by their row index.

With the forward that is five passes over arrays of `x`'s size, by construction: read `x`,
write `y`; read `x` and `dy`, write `dx`. The statistics travel through HBM as float32 vectors
(one per row, laid out `(blocks, 1, block_rows)` so that the kernel stores them lane-dense);
`forward_call` and `backward_call` convert them from and to shape `(R,)` around the kernels.

Block rows come from the default scoped VMEM limit of the TPU generations in `SCOPED_VMEM`,
the smallest of them unless a generation is named (`blocking`): nothing asks which device JAX
runs on, so a program is the same wherever it is traced. On a TPU v4 the forward kernel does
not compile (see `SCOPED_VMEM`).

Choosing between these kernels and the Triton ones by platform works with
`jax.lax.platform_dependent(..., cpu=<either, interpret=True>, cuda=<Triton>, tpu=<Mosaic>)`
(checked: each program lowers only its platform's branch; the CPU runs interpret mode), with
three caveats. Every branch is traced whatever the platform, so the `tpu` branch must be one
that traces: where `supports` is False (float16, a row too long for VMEM), give it the XLA
path instead of these kernels, which raise a `ValueError` at trace time. The `cpu`
branch must use `interpret=True`, not `pltpu.InterpretParams()`, whose ordered callbacks fail
the lowering of `platform_dependent`'s `cond`. And lowering for several platforms at once
(`lowering_platforms=("cuda", "tpu")`, as `jax.export` may) fails in the Triton `pallas_call`:
"Compiler params for platform gpu cannot be used for tpu lowering".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._math import (
  add_forward_refs,
  add_math,
  backward_math,
  backward_refs,
  forward_math,
  forward_refs,
)

SCOPED_VMEM = {"v5e": 16 << 20, "v5p": 16 << 20, "v6e": 32 << 20}
"""The TPU generations the kernels compile for, and the Mosaic compiler's default scoped VMEM
limit on each (what a kernel may use without raising `vmem_limit_bytes`). Not v4: its Mosaic
lacks the sublane gather with which the forward stores the statistics lane-dense. Not v7x: no
deviceless v7x topology to compile them for (docs/guides/gpu_kernels.md, "TPU generations")."""
DTYPES = ("float32", "bfloat16")
"""The dtypes of `x` and the parameters that the kernels take (Mosaic cannot load float16 on
v5e and v6e: "Invalid vector type for load")."""
_VMEM_FRACTION = 0.75  # of the scoped limit; the rest for Mosaic's own scratch and spills
# Blocking caps, not yet tuned on a TPU. A block of a few MiB should reach the HBM bandwidth; a
# larger one only lengthens the first read and the last write, which the pipeline cannot
# overlap with another step.
_MAX_BLOCK_BYTES = 2 << 20  # of x per block, in its dtype
_MAX_BLOCK_ROWS = 2048
# Float32 temporaries of a row block that the compiled kernels hold in VMEM besides the blocks
# of their operands (parameter rows and broadcasts included), in blocks: bounds above what the
# compiled kernels use (docs/guides/gpu_kernels.md, "VMEM of the Mosaic kernels").
_FWD_TEMPS = 2.0
_ADD_FWD_TEMPS = 3.0  # the residual forward holds the float32 sum as well
_BWD_TEMPS = 4.5
# And per row a few float32 columns (the row's mean, rstd, sums), each lane-padded to 128: they
# matter for short rows, whose forward holds more temporaries per block.
_FWD_COLUMNS = 2
_BWD_COLUMNS = 4


def _budget(generation: str | None) -> tuple[int, str]:
  """The VMEM budget of a step on `generation`, and the name of what it fits (for errors).

  Without a generation, the smallest of `SCOPED_VMEM`: blocks that fit every generation. A
  program's blocks then depend on its shapes alone, never on the device JAX would run it on,
  which need not be the one it is compiled for (`jax.export`, a CPU host compiling for TPUs).
  """
  if generation is None:
    return int(_VMEM_FRACTION * min(SCOPED_VMEM.values())), "every generation"
  if generation not in SCOPED_VMEM:
    raise ValueError(f"generation={generation!r} is not one of {sorted(SCOPED_VMEM)}, the TPU "
                     f"generations the kernels compile for. Use the XLA path on it.")
  return int(_VMEM_FRACTION * SCOPED_VMEM[generation]), generation


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _sublanes(dtype: Any) -> int:
  """Rows per VMEM tile of `dtype`: 8 for 32-bit types, 16 for 16-bit ones (packed)."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def _vmem_bytes(block_rows: int, features: int, dtype: Any, backward: bool,
                wide: Any = None) -> int:
  """VMEM a step needs: double-buffered blocks of the row arrays in `dtype` (x, y; or x, dy,
  dx; with a residual dtype `wide`, the residual kernels' x, residual, y and h, or h, dy, dh,
  dx and dr, each counted in the wider dtype), the float32 temporaries and columns,
  double-buffered parameter and float32 sum rows (a row of a tile is padded to a whole tile)
  and the statistics blocks."""
  f = _round_up(features, 128)
  rows = _round_up(block_rows, _sublanes(dtype))
  size = jnp.dtype(dtype).itemsize
  arrays, temps, columns, vectors = ((3, _BWD_TEMPS, _BWD_COLUMNS, 4) if backward
                                     else (2, _FWD_TEMPS, _FWD_COLUMNS, 2))
  if wide is not None:  # the residual kernels: x, r, y, h; or h, dy, dh, dx, dr
    arrays, size = 5 if backward else 4, max(size, jnp.dtype(wide).itemsize)
    temps = temps if backward else _ADD_FWD_TEMPS
  per_row = 2 * arrays * f * size + temps * f * 4 + columns * 128 * 4
  fixed = 2 * vectors * 8 * f * 4 + 2 * 2 * 8 * _round_up(block_rows, 128) * 4
  return int(rows * per_row) + fixed


def _row_cap(features: int, dtype: Any) -> int:
  """At most `_MAX_BLOCK_ROWS` rows and `_MAX_BLOCK_BYTES` of `x` per block, at least a tile."""
  sub = _sublanes(dtype)
  row_bytes = _round_up(features, 128) * jnp.dtype(dtype).itemsize
  return max(sub, min(_MAX_BLOCK_ROWS, _MAX_BLOCK_BYTES // row_bytes) // sub * sub)


def blocking(rows: int, features: int, dtype: Any, generation: str | None = None,
             wide: Any = None) -> dict[str, int]:
  """Block rows of the forward (`"fwd"`) and backward (`"bwd"`) kernels for `(rows, features)`.

  The most rows whose blocks fit `_VMEM_FRACTION` of the default scoped VMEM of `generation`
  (`SCOPED_VMEM`, `_vmem_bytes`; without a generation, of every generation: see `_budget`), at
  most `_MAX_BLOCK_ROWS` and `_MAX_BLOCK_BYTES` of `x` (but at least one tile): a multiple of
  the dtype's tile rows (8 for float32, 16 for bfloat16), or all `rows` when they fit in one
  block. With a residual dtype `wide`, both are the residual kernels' (`add_forward_call`,
  `backward_call` with `dh2`).

  Raises:
    ValueError: `rows` or `features` below 1, a generation not in `SCOPED_VMEM`, or a row too
      long for one block in VMEM.
  """
  if rows < 1 or features < 1:
    raise ValueError(f"the Mosaic kernels take rows >= 1 and features >= 1; got rows={rows}, "
                     f"features={features}. Use the XLA path for empty input.")
  budget, where = _budget(generation)
  sub = _sublanes(dtype)
  out = {}
  for name, backward in (("fwd", False), ("bwd", True)):
    lo, hi = 0, _row_cap(features, dtype) // sub  # the most tiles that fit, by bisection
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if _vmem_bytes(mid * sub, features, dtype, backward, wide) <= budget:
        lo = mid
      else:
        hi = mid - 1
    if lo == 0:
      raise ValueError(
          f"features={features} in {jnp.dtype(dtype).name}: one block of {sub} rows needs "
          f"{_vmem_bytes(sub, features, dtype, backward, wide) >> 20} MiB of VMEM, more than the "
          f"{budget >> 20} MiB budget on {where}. Use the XLA path for rows this long.")
    out[name] = rows if rows <= lo * sub else lo * sub
  return out


def _forward_kernel(*refs, features: int, eps: float, centered: bool, has_scale: bool,
                    has_bias: bool):
  x_ref, g_ref, b_ref, y_ref, stat_refs = forward_refs(refs, has_scale, has_bias)
  f32 = jnp.float32
  y, mean, rstd = forward_math(
      x_ref[...].astype(f32), None if g_ref is None else g_ref[...].astype(f32),
      None if b_ref is None else b_ref[...].astype(f32), None, features, eps, centered,
      keepdims=True)
  y_ref[...] = y.astype(y_ref.dtype)
  for ref, s in zip(stat_refs, (mean, rstd) if centered else (rstd,), strict=True):
    ref[...] = s.reshape(ref.shape)  # (B, 1) -> (1, 1, B): the rows' statistics lane-dense


def _add_forward_kernel(*refs, features: int, eps: float, centered: bool, has_scale: bool,
                        has_bias: bool):
  """`_forward_kernel` of `x + residual`: reads both blocks once, writes the sum `h` too."""
  x_ref, r_ref, g_ref, b_ref, y_ref, h_ref, stat_refs = add_forward_refs(
      refs, has_scale, has_bias)
  f32 = jnp.float32
  h, h32 = add_math(x_ref[...], r_ref[...], h_ref.dtype)
  h_ref[...] = h
  y, mean, rstd = forward_math(
      h32, None if g_ref is None else g_ref[...].astype(f32),
      None if b_ref is None else b_ref[...].astype(f32), None, features, eps, centered,
      keepdims=True)
  y_ref[...] = y.astype(y_ref.dtype)
  for ref, s in zip(stat_refs, (mean, rstd) if centered else (rstd,), strict=True):
    ref[...] = s.reshape(ref.shape)


def _backward_kernel(*refs, rows: int, features: int, centered: bool, has_scale: bool,
                     has_bias: bool, has_dh: bool = False):
  x_ref, dy_ref, dh_ref, mean_ref, rstd_ref, g_ref, dx_refs, dg_ref, db_ref = backward_refs(
      refs, centered, has_scale, has_bias, has_dh)
  # dγ and dβ, each (1, F) float32, resident across the grid
  sum_refs = [r for r in (dg_ref, db_ref) if r is not None]
  block = x_ref.shape[0]
  f32 = jnp.float32
  i = pl.program_id(0)
  valid = None
  if rows % block:  # a ragged last block: mask its rows past `rows` out of the sums
    valid = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < rows
  mean = None if mean_ref is None else mean_ref[...].reshape(block, 1)
  rstd = rstd_ref[...].reshape(block, 1)
  dx, dg, db = backward_math(x_ref[...].astype(f32), dy_ref[...].astype(f32), mean, rstd,
                             None if g_ref is None else g_ref[...].astype(f32), valid,
                             features, centered, keepdims=True, mask_dy=True)
  if dh_ref is not None:  # the residual add's: the sum's own cotangent
    dx = dx + dh_ref[...].astype(f32)
  for dx_ref in dx_refs:
    dx_ref[...] = dx.astype(dx_ref.dtype)
  sums = [s for s, on in ((dg, has_scale), (db, has_bias)) if on]

  @pl.when(i == 0)
  def _():
    for ref in sum_refs:
      ref[...] = jnp.zeros_like(ref)

  for ref, s in zip(sum_refs, sums, strict=True):
    ref[...] += s


def supports(features: int, dtype: Any, generation: str | None = None,
             wide: Any = None) -> bool:
  """Whether the kernels take rows of `features` in `dtype` on `generation` (by default, on
  every generation in `SCOPED_VMEM`): a dtype in `DTYPES`, a generation in `SCOPED_VMEM`, and a
  row that `blocking` fits in VMEM (with `wide`, the residual kernels' rows of a residual of
  that dtype). A dispatch should give the XLA path wherever this is False."""
  if any(jnp.dtype(d).name not in DTYPES for d in (dtype, wide) if d is not None):
    return False
  if features < 1:
    return False
  try:
    blocking(1, features, dtype, generation, wide)
  except ValueError:
    return False
  return True


def _check_dtypes(*arrays: jax.Array) -> None:
  for a in arrays:
    if jnp.dtype(a.dtype).name not in DTYPES:
      raise ValueError(f"the Mosaic kernels take {' and '.join(DTYPES)} arrays; got one of dtype "
                       f"{jnp.dtype(a.dtype).name}. Use the XLA path for it.")


def forward_call(x2: jax.Array, params: Sequence[jax.Array], *, eps: float, centered: bool,
                 has_scale: bool, has_bias: bool, interpret: Any,
                 generation: str | None = None):
  """`(y, [mean,] rstd)` of rows `x2` `(R, F)` with `params` = `([scale,] [bias])`, `(F,)` each.

  `y` has `x2`'s dtype; the statistics are float32 of shape `(R,)` (mean only if `centered`).
  `interpret` is `pallas_call`'s: `True` runs the kernel in Pallas interpret mode on the CPU
  (`pltpu.InterpretParams()` in the TPU interpreter, which cannot sit inside a
  `jax.lax.platform_dependent`); `generation` (`"v5e"`, `"v6e"`, ...) sizes the blocks for
  that generation's VMEM, by default for every generation's (`blocking`).

  Raises:
    ValueError: a dtype not in `DTYPES`, or what `blocking` rejects.
  """
  _check_dtypes(x2, *params)
  rows, features = x2.shape
  block = blocking(rows, features, x2.dtype, generation)["fwd"]
  nblocks = pl.cdiv(rows, block)
  kernel = functools.partial(_forward_kernel, features=features, eps=eps, centered=centered,
                             has_scale=has_scale, has_bias=has_bias)
  row_spec = pl.BlockSpec((block, features), lambda i: (i, 0))
  vec_spec = pl.BlockSpec((1, features), lambda i: (0, 0))
  stat_spec = pl.BlockSpec((1, 1, block), lambda i: (i, 0, 0))
  nstats = 2 if centered else 1
  stat = jax.ShapeDtypeStruct((nblocks, 1, block), jnp.float32)
  y, *stats = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(x2.shape, x2.dtype)] + [stat] * nstats,
      grid=(nblocks,),
      in_specs=[row_spec] + [vec_spec] * len(params),
      out_specs=[row_spec] + [stat_spec] * nstats,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name=f"jaxnorm_{'layer' if centered else 'rms'}_norm_fwd",
  )(x2, *(p.reshape(1, features) for p in params))
  return (y, *(s.reshape(nblocks * block)[:rows] for s in stats))


def add_dtypes(*dtypes: Any) -> tuple[Any, Any]:
  """`(dtype, wide)` for `blocking` and `supports` of the residual kernels, from the dtypes of
  their row arrays: the narrowest, whose tiles have the most rows, and the widest, whose blocks
  take the most bytes."""
  ordered = sorted((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)
  return ordered[0], ordered[-1]


def add_forward_call(x2: jax.Array, r2: jax.Array, params: Sequence[jax.Array], *, eps: float,
                     centered: bool, has_scale: bool, has_bias: bool, y_dtype: Any,
                     h_dtype: Any, interpret: Any, generation: str | None = None):
  """`(y, h, [mean,] rstd)` of `h = x2 + r2` (in `h_dtype`, `r2`'s dtype or `x2`'s) and its
  normalization `y` (in `y_dtype`): `forward_call` with the residual add in front, blocks
  sized for its four row arrays (`blocking`'s `wide`).

  Raises:
    ValueError: a dtype not in `DTYPES`, or what `blocking` rejects.
  """
  _check_dtypes(x2, r2, *params)
  rows, features = x2.shape
  narrow, wide = add_dtypes(x2.dtype, r2.dtype, y_dtype)
  block = blocking(rows, features, narrow, generation, wide)["fwd"]
  nblocks = pl.cdiv(rows, block)
  kernel = functools.partial(_add_forward_kernel, features=features, eps=eps,
                             centered=centered, has_scale=has_scale, has_bias=has_bias)
  row_spec = pl.BlockSpec((block, features), lambda i: (i, 0))
  vec_spec = pl.BlockSpec((1, features), lambda i: (0, 0))
  stat_spec = pl.BlockSpec((1, 1, block), lambda i: (i, 0, 0))
  nstats = 2 if centered else 1
  stat = jax.ShapeDtypeStruct((nblocks, 1, block), jnp.float32)
  y, h, *stats = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(x2.shape, y_dtype), jax.ShapeDtypeStruct(x2.shape, h_dtype)]
      + [stat] * nstats,
      grid=(nblocks,),
      in_specs=[row_spec, row_spec] + [vec_spec] * len(params),
      out_specs=[row_spec, row_spec] + [stat_spec] * nstats,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name=f"jaxnorm_add_{'layer' if centered else 'rms'}_norm_fwd",
  )(x2, r2, *(p.reshape(1, features) for p in params))
  return (y, h, *(s.reshape(nblocks * block)[:rows] for s in stats))


def backward_call(x2: jax.Array, dy2: jax.Array, stats: Sequence[jax.Array],
                  scale: jax.Array | None, *, has_bias: bool, bias_dtype: Any, centered: bool,
                  interpret: Any, generation: str | None = None,
                  dh2: jax.Array | None = None, out_dtypes: Sequence[Any] = ()):
  """`(dx, dscale, dbias)` of the normalization of rows `x2` for the cotangent `dy2`.

  `stats` are `forward_call`'s (`([mean,] rstd)`, float32 `(R,)`); `dscale` (if `scale` is
  given) and `dbias` (if `has_bias`, in `bias_dtype`) are the float32 sums over all rows cast to
  the parameter's dtype, None otherwise. `interpret` and `generation` as in `forward_call`.
  With `dh2` (the residual add's, of `x2`'s shape and dtype: `x2` is the sum `h`) it returns
  `((dx, dr), dscale, dbias)`: the sum's whole cotangent `dh2 + dx`, added on chip and written
  in each of `out_dtypes` (x's and the residual's), in blocks sized for five row arrays.
  """
  dh = [] if dh2 is None else [dh2]
  _check_dtypes(x2, dy2, *dh, *(() if scale is None else (scale,)))
  rows, features = x2.shape
  if dh2 is None:
    block = blocking(rows, features, x2.dtype, generation)["bwd"]
  else:
    narrow, wide = add_dtypes(dy2.dtype, x2.dtype)
    block = blocking(rows, features, narrow, generation, wide)["bwd"]
  nblocks = pl.cdiv(rows, block)
  has_scale = scale is not None
  kernel = functools.partial(_backward_kernel, rows=rows, features=features, centered=centered,
                             has_scale=has_scale, has_bias=has_bias,
                             **({} if dh2 is None else {"has_dh": True}))
  row_spec = pl.BlockSpec((block, features), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((1, 1, block), lambda i: (i, 0, 0))
  vec_spec = pl.BlockSpec((1, features), lambda i: (0, 0))  # also the resident sums
  stats3 = [jnp.pad(s, (0, nblocks * block - rows)).reshape(nblocks, 1, block) for s in stats]
  params = [] if scale is None else [scale.reshape(1, features)]
  nsums = has_scale + has_bias
  outs = pl.pallas_call(
      kernel,
      out_shape=([jax.ShapeDtypeStruct(x2.shape, d) for d in (out_dtypes if dh else [x2.dtype])]
                 + [jax.ShapeDtypeStruct((1, features), jnp.float32)] * nsums),
      grid=(nblocks,),
      in_specs=([row_spec, row_spec] + [row_spec] * len(dh) + [stat_spec] * len(stats3)
                + [vec_spec] * len(params)),
      out_specs=[row_spec] * (1 + len(dh)) + [vec_spec] * nsums,
      # The sums accumulate across the grid: its steps run in order on one core.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name=f"jaxnorm_{'add_' if dh else ''}{'layer' if centered else 'rms'}_norm_bwd",
  )(x2, dy2, *dh, *stats3, *params)
  dx = tuple(outs[:2]) if dh else outs[0]
  it = iter(outs[1 + len(dh):])
  dscale = next(it).reshape(features).astype(scale.dtype) if scale is not None else None
  dbias = next(it).reshape(features).astype(bias_dtype) if has_bias else None
  return dx, dscale, dbias
